//! Overload: 1,024 single-sample requests in flight at once against each server. The refused
//! ones get RESOURCE_EXHAUSTED at once, the accepted ones are answered within the queue-delay
//! limit plus about one batch's compute, and the server serves normally afterwards. Real ONNX
//! Runtime with the zoo's ResNet-110 CN+C, real gRPC on loopback. The bounds are loose (several
//! times the expected figures): they catch an unbounded queue, not a slow machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::*;
use tonic::transport::Channel;
use tonic::Code;

const IN_FLIGHT: usize = 1024;
const QUEUE_DELAY: Duration = Duration::from_millis(300);

mod common;
use common::zoo;

fn request(n: usize) -> ModelInferRequest {
    ModelInferRequest {
        inputs: vec![model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "UINT8".into(),
            shape: vec![n as i64, 1, 28, 28],
            ..Default::default()
        }],
        // Varied pixels, so that samples go to different exits as real ones do.
        raw_input_contents: vec![(0..n * 784).map(|i| ((i * 7919) % 251) as u8).collect::<Vec<u8>>().into()],
        ..Default::default()
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// What a burst of single-sample requests got.
struct Burst {
    accepted: Vec<Duration>,
    refused: Vec<Duration>,
    other: Vec<String>,
}

async fn burst(addr: SocketAddr) -> Burst {
    // A few connections, as several clients would open.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        clients.push(GrpcInferenceServiceClient::new(ch));
    }
    let start = tokio::sync::Barrier::new(IN_FLIGHT);
    let start = std::sync::Arc::new(start);
    let calls: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut req = tonic::Request::new(request(1));
                req.set_timeout(Duration::from_secs(30));
                let t = Instant::now();
                let r = c.model_infer(req).await;
                (r.map(|_| ()), t.elapsed())
            })
        })
        .collect();
    let mut b = Burst { accepted: vec![], refused: vec![], other: vec![] };
    for c in calls {
        match c.await.unwrap() {
            (Ok(()), t) => b.accepted.push(t),
            (Err(s), t) if s.code() == Code::ResourceExhausted => b.refused.push(t),
            (Err(s), _) => b.other.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    b
}

/// Time of one full batch through the server, unloaded (the best of three).
async fn batch_time(addr: SocketAddr, batch: usize) -> Duration {
    let mut c = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        c.model_infer(request(batch)).await.unwrap();
        best = best.min(t.elapsed());
    }
    best
}

async fn check(side: &str, addr: SocketAddr, batch: usize) {
    let one_batch = batch_time(addr, batch).await;
    let mut b = burst(addr).await;
    let (n_ok, n_refused) = (b.accepted.len(), b.refused.len());
    let (ok_p50, ok_p99) = (pct(&mut b.accepted, 0.5), pct(&mut b.accepted, 0.99));
    let refused_p99 = pct(&mut b.refused, 0.99);
    println!(
        "{side}: {IN_FLIGHT} in flight: {n_ok} accepted (p50 {ok_p50:?}, p99 {ok_p99:?}), {n_refused} refused \
         (p99 {refused_p99:?}); one batch of {batch} takes {one_batch:?}; queue delay limit {QUEUE_DELAY:?}"
    );
    assert!(b.other.is_empty(), "{side}: only answers or RESOURCE_EXHAUSTED: {:?}", &b.other[..b.other.len().min(3)]);
    assert!(n_ok > 0 && n_refused > 0, "{side}: an overload both serves and sheds");
    // Accepted: the queue-delay limit plus the batch being computed and the own batch, with room
    // for a shared 2-core machine that also runs the 1,024 clients.
    let bound = (QUEUE_DELAY + one_batch * 2) * 3 + Duration::from_secs(1);
    // Without shedding the last of the burst would wait for every batch before it.
    let drain = one_batch * (IN_FLIGHT / batch) as u32;
    println!("{side}: bound {bound:?}; an unshed queue would drain in {drain:?}");
    assert!(ok_p99 <= bound, "{side}: accepted p99 {ok_p99:?} over {bound:?}");
    assert!(refused_p99 < bound, "{side}: refusals are quick, p99 {refused_p99:?}");
    // Recovered: an unloaded request is answered as fast as before the burst (with slack).
    let after = batch_time(addr, batch).await;
    assert!(after < one_batch * 3 + Duration::from_millis(200), "{side}: after the burst a batch took {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_servers_shed_an_overload_and_keep_accepted_latency_bounded() {
    let delay = QUEUE_DELAY.as_millis().to_string();
    let model = zoo("resnet110-7exit-cnc.onnx");
    let cloud = cloud_server::Config::parse_from([
        "cloud-server",
        "--model",
        model.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--max-batch",
        "64",
        "--max-queue-delay-ms",
        &delay,
    ]);
    let cloud = cloud_server::start(cloud).await.unwrap();
    check("cloud-server", cloud.addr, 64).await;

    // The edge at E2, forwarding what its exits do not answer to the cloud.
    let mut edge = edge_agent::Config::parse_from([
        "edge-agent",
        "--partition",
        "E2",
        "--server",
        &cloud.addr.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--max-queue-delay-ms",
        &delay,
    ]);
    edge.model = Some(zoo("resnet110-7exit-cnc.onnx"));
    let edge = edge_agent::start(edge).await.unwrap();
    check("edge-agent", edge.addr, 16).await;
    edge.stop().await;
    cloud.stop().await;
}
