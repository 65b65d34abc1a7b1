//! edge-agent and cloud-server over real sockets on 127.0.0.1 (port 0), on the zoo's tiny model
//! and the Fashion-MNIST test set.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::*;
use classynet_runtime::dataset::{Dataset, Pixels};
use classynet_runtime::exit::Policy;
use classynet_runtime::model::Model;
use classynet_runtime::ort_backend::{init_ort, OrtEngine, SessionOptions};
use classynet_runtime::runner::{SampleResult, SegmentedRunner};
use classynet_serving::batcher::Origin;
use classynet_serving::codec;
use edge_agent::{classify, Config, Edge, WireDtype};

const SAMPLES: usize = 600;

mod common;
use common::{answers, zoo};

fn cloud_config(model: PathBuf, listen: &str, policy: Option<PathBuf>) -> cloud_server::Config {
    let mut c = common::cloud_config(&model, listen, &[]);
    c.policy = policy;
    c
}

fn edge_config(model: Option<PathBuf>, partition: &str, server: String) -> Config {
    common::edge_config(model.as_deref(), partition, &server, 1000, &[])
}

/// What `classynet run` answers for the same samples and policy.
fn local(model: &Model, policy: &Policy) -> Vec<(u32, usize)> {
    init_ort(None, 1).unwrap();
    let ds = Dataset::open_for("fashion-mnist:test", None, Some(SAMPLES), model).unwrap();
    let mut r =
        SegmentedRunner::new(OrtEngine::backend(model, SessionOptions::default()).unwrap(), 0, policy, None).unwrap();
    let mut out = Vec::new();
    for f in (0..ds.len()).step_by(64) {
        for s in r.run(ds.batch(model, f..(f + 64).min(ds.len()))).unwrap().results {
            match s {
                SampleResult::Answered(a) => out.push((a.class, a.exit)),
                other => panic!("{other:?}"),
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_execution_answers_like_the_local_runner_at_every_partition() {
    let path = zoo("tiny-3exit-cn.onnx");
    let model = Model::load(&path).unwrap();
    let want = local(&model, &Policy::defaults(&model.meta));
    let cloud = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", None)).await.unwrap();
    for (partition, source) in [("E1", Some(path.clone())), ("E2", None)] {
        // E1 cuts the local model file; E2 downloads its head from the cloud.
        let edge = Edge::load(&edge_config(source, partition, cloud.addr.to_string())).await.unwrap();
        let out = classify(&edge, "fashion-mnist:test", None, Some(SAMPLES), 32).await.unwrap();
        assert_eq!(answers(&out), want, "partition {partition}");
        let j = &out.json;
        let k = edge.k;
        let (e, c) = (j["answered"]["edge"].as_u64().unwrap(), j["answered"]["cloud"].as_u64().unwrap());
        assert_eq!(e + c, SAMPLES as u64);
        assert_eq!(j["answered"]["degraded"], 0);
        assert_eq!(e as usize, want.iter().filter(|a| a.1 < k).count(), "edge answers exactly its exits' samples");
        assert!(j["wire_bytes_per_sample"].as_f64().unwrap() > 0.0);
        assert!(j["latency_ms"]["p50"].as_f64().unwrap() <= j["latency_ms"]["p99"].as_f64().unwrap());
        assert_eq!(j["samples"], SAMPLES as u64);
    }
    cloud.stop().await;
}

/// A tract edge (the JetPack 4.6 build's engine) with an ONNX Runtime cloud answers what
/// `classynet run` answers on ONNX Runtime, sample for sample, at shallow and deep cuts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tract_edge_with_an_ort_cloud_answers_like_the_local_runner() {
    use classynet_runtime::engine::BackendChoice;
    let path = zoo("resnet110-7exit-cnc.onnx");
    let model = Model::load(&path).unwrap();
    let want = local(&model, &Policy::defaults(&model.meta));
    let mut cc = cloud_config(path.clone(), "127.0.0.1:0", None);
    cc.backend = BackendChoice::Ort;
    let cloud = cloud_server::start(cc).await.unwrap();
    for partition in ["E1", "E2", "E4"] {
        let mut cfg = edge_config(Some(path.clone()), partition, cloud.addr.to_string());
        cfg.backend = BackendChoice::Tract;
        let edge = Edge::load(&cfg).await.unwrap();
        let out = classify(&edge, "fashion-mnist:test", None, Some(SAMPLES), 32).await.unwrap();
        assert_eq!(answers(&out), want, "partition {partition}");
        assert_eq!(out.json["answered"]["degraded"], 0);
        let edge_answers = out.json["answered"]["edge"].as_u64().unwrap() as usize;
        assert_eq!(edge_answers, want.iter().filter(|a| a.1 < edge.k).count(), "{partition}: the edge's exits");
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_and_fp16_wires_send_fewer_bytes() {
    let path = zoo("tiny-3exit-cn.onnx");
    let cloud = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", None)).await.unwrap();
    let mut bytes = Vec::new();
    for wire in WireDtype::ALL {
        let mut cfg = edge_config(Some(path.clone()), "E1", cloud.addr.to_string());
        cfg.wire_dtype = wire;
        let edge = Edge::load(&cfg).await.unwrap();
        let out = classify(&edge, "fashion-mnist:test", None, Some(300), 32).await.unwrap();
        bytes.push(out.json["wire_bytes_per_sample"].as_f64().unwrap());
        assert!(out.json["accuracy"].as_f64().unwrap() > 0.6);
    }
    assert!((bytes[0] / bytes[1] - 2.0).abs() < 0.01, "{bytes:?}");
    assert!((bytes[0] / bytes[2] - 4.0).abs() < 0.01, "{bytes:?}");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_on_the_cloud_reaches_the_edge_within_a_second() {
    let path = zoo("tiny-3exit-cn.onnx");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "version = 1\n").unwrap();
    let cloud = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", Some(policy.clone()))).await.unwrap();
    let edge = Edge::load(&edge_config(Some(path.clone()), "E2", cloud.addr.to_string())).await.unwrap();
    let wait_for = |v: u64| {
        let edge = edge.clone();
        async move {
            let t = Instant::now();
            while edge.policy_version() != v {
                assert!(t.elapsed() < Duration::from_secs(1), "policy v{v} not in force on the edge after 1 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            t.elapsed()
        }
    };
    wait_for(1).await;
    let before = classify(&edge, "fashion-mnist:test", None, Some(300), 32).await.unwrap();
    assert!(before.answers.iter().any(|a| a.unwrap().1 == 0), "E1 answers some samples by default");

    // Disable E1 and restrict E2 to Bag (8): the edge now answers only bags, at E2.
    std::fs::write(
        &policy,
        "version = 2\n[[exits]]\nname = \"E1\"\ndisabled = true\n[[exits]]\nname = \"E2\"\nclasses = [8]\n",
    )
    .unwrap();
    let took = wait_for(2).await;
    let after = classify(&edge, "fashion-mnist:test", None, Some(300), 32).await.unwrap();
    assert!(after.answers.iter().all(|a| a.unwrap().1 != 0), "E1 is disabled");
    assert!(after.answers.iter().filter(|a| a.unwrap().1 == 1).all(|a| a.unwrap().0 == 8));
    assert_eq!(after.json["policy_version"], 2);
    eprintln!("policy reached the edge in {took:?}");

    // An invalid policy (class out of range) is refused; version 2 stays in force everywhere.
    std::fs::write(&policy, "version = 3\n[[exits]]\nname = \"E2\"\nclasses = [42]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(cloud.cloud.policy_version(), 2);
    assert_eq!(edge.policy_version(), 2);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_starts_under_the_clouds_policy_even_with_every_exit_on_the_edge() {
    let path = zoo("tiny-3exit-cn.onnx");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    // E1 off, E2 only for Bag (8): with the model's defaults E1 answers some of the first samples.
    std::fs::write(
        &policy,
        "version = 7\n[[exits]]\nname = \"E1\"\ndisabled = true\n[[exits]]\nname = \"E2\"\nclasses = [8]\n",
    )
    .unwrap();
    let cloud = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", Some(policy))).await.unwrap();
    // E3 is the whole model: nothing is forwarded, but the class sets still come from the cloud.
    let edge = Edge::load(&edge_config(Some(path.clone()), "E3", cloud.addr.to_string())).await.unwrap();
    let out = classify(&edge, "fashion-mnist:test", None, Some(300), 32).await.unwrap();
    assert_eq!(out.json["policy_version"], 7);
    assert!(out.answers.iter().all(|a| a.unwrap().1 != 0), "E1 is disabled from the first sample on");
    assert!(out.answers.iter().filter(|a| a.unwrap().1 == 1).all(|a| a.unwrap().0 == 8));
    assert_eq!(out.json["answered"]["edge"], 300);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_cloud_degrades_then_recovers_and_every_request_is_answered() {
    let path = zoo("tiny-3exit-cn.onnx");
    let cloud = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", None)).await.unwrap();
    let addr = cloud.addr;
    let mut cfg = edge_config(Some(path.clone()), "E1", addr.to_string());
    cfg.cloud_timeout_ms = 300;
    let edge = Edge::load(&cfg).await.unwrap();
    let ok = classify(&edge, "fashion-mnist:test", None, Some(200), 32).await.unwrap();
    assert_eq!(ok.json["answered"]["degraded"], 0);

    cloud.stop().await;
    let down = classify(&edge, "fashion-mnist:test", None, Some(200), 32).await.unwrap();
    assert_eq!(down.answers.len(), 200);
    assert!(down.answers.iter().all(|a| a.is_some()), "every request gets an answer");
    let degraded = down.answers.iter().filter(|a| a.unwrap().2 == Origin::Degraded).count();
    let local = down.answers.iter().filter(|a| a.unwrap().2 == Origin::Local).count();
    assert_eq!(degraded + local, 200);
    assert!(degraded > 0 && down.answers.iter().all(|a| a.unwrap().1 == 0), "degraded answers come from E1");

    // The cloud comes back on the same address: full service again after the backoff.
    let cloud = cloud_server::start(cloud_config(path.clone(), &addr.to_string(), None)).await.unwrap();
    let t = Instant::now();
    loop {
        let out = classify(&edge, "fashion-mnist:test", None, Some(100), 32).await.unwrap();
        if out.json["answered"]["degraded"] == 0 {
            assert!(out.json["answered"]["cloud"].as_u64().unwrap() > 0);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "the edge did not reconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_client_uses_the_edge() {
    let path = zoo("tiny-3exit-cn.onnx");
    let cloud = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", None)).await.unwrap();
    let edge = edge_agent::start(edge_config(Some(path.clone()), "E1", cloud.addr.to_string())).await.unwrap();
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", edge.addr)).await.unwrap();
    assert!(client.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let meta = client
        .model_metadata(ModelMetadataRequest { name: "tiny-3exit-cn".into(), version: String::new() })
        .await
        .unwrap();
    assert_eq!(meta.get_ref().inputs[0].shape, vec![-1, 1, 28, 28]);
    // Raw UINT8 pixels straight from the dataset: the edge normalises them.
    let model = Model::load(&path).unwrap();
    let ds = Dataset::open_for("fashion-mnist:test", None, Some(8), &model).unwrap();
    let pixels: Vec<u8> = match &ds.pixels {
        Pixels::U8(p) => p[..8 * 784].to_vec(),
        _ => unreachable!("Fashion-MNIST pixels are bytes"),
    };
    let req = ModelInferRequest {
        model_name: "tiny-3exit-cn".into(),
        inputs: vec![model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "UINT8".into(),
            shape: vec![8, 1, 28, 28],
            ..Default::default()
        }],
        raw_input_contents: vec![pixels.into()],
        ..Default::default()
    };
    let resp = client.model_infer(req).await.unwrap().into_inner();
    let got: Vec<(u32, usize)> =
        codec::read_answers(&resp).unwrap().iter().map(|a| (a.0 as u32, a.1 as usize)).collect();
    let want = local(&model, &Policy::defaults(&model.meta));
    assert_eq!(got, want[..8].to_vec());
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_budget_picks_the_deepest_partition_that_fits() {
    let path = zoo("tiny-3exit-cn.onnx");
    let mut cfg = edge_config(Some(path.clone()), "E1", "127.0.0.1:9".into());
    cfg.partition = None;
    cfg.memory_budget = Some("100MB".into());
    let edge = Edge::load(&cfg).await.unwrap();
    assert_eq!(edge.k, 3, "everything fits in 100 MB: the edge runs every exit and needs no cloud");
    let out = classify(&edge, "fashion-mnist:test", None, Some(50), 8).await.unwrap();
    assert_eq!(out.json["answered"]["edge"], 50);
    cfg.memory_budget = Some("10kB".into());
    let e = Edge::load(&cfg).await.err().unwrap().to_string();
    assert!(e.contains("no partition fits a budget of 10.0 kB"), "{e}");
}

/// The zoo's cn+c ResNet-110 split at every cut gives, sample for sample, what the local runner
/// gives with the same policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnet110_cnc_splits_like_the_local_runner_at_every_partition() {
    let path = zoo("resnet110-7exit-cnc.onnx");
    let model = Model::load(&path).unwrap();
    let want = local(&model, &Policy::defaults(&model.meta));
    let cloud = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", None)).await.unwrap();
    for k in 1..model.num_exits() {
        let edge =
            Edge::load(&edge_config(Some(path.clone()), &format!("E{k}"), cloud.addr.to_string())).await.unwrap();
        let out = classify(&edge, "fashion-mnist:test", None, Some(SAMPLES), 32).await.unwrap();
        assert_eq!(answers(&out), want, "partition E{k}");
        assert_eq!(out.json["answered"]["edge"].as_u64().unwrap() as usize, want.iter().filter(|a| a.1 < k).count());
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_edge_keeps_the_newer_policy_and_the_other_replica_serves() {
    // Two replicas of one model whose policy files disagree, as while a rollout of the policy
    // ConfigMap reaches the pods one after the other: A has version 2, B still version 1.
    let path = zoo("tiny-3exit-cn.onnx");
    let dir = tempfile::tempdir().unwrap();
    let (new, old) = (dir.path().join("new.toml"), dir.path().join("old.toml"));
    std::fs::write(&new, "version = 2\n[[exits]]\nname = \"E1\"\ndisabled = true\n").unwrap();
    std::fs::write(&old, "version = 1\n").unwrap();
    // B's address first (then B stops), so that the edge's stream can only start on A.
    let b = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", Some(old.clone()))).await.unwrap();
    let b_addr = b.addr;
    b.stop().await;
    let a = cloud_server::start(cloud_config(path.clone(), "127.0.0.1:0", Some(new))).await.unwrap();
    let edge = Edge::load(&edge_config(Some(path.clone()), "E1", format!("{},{b_addr}", a.addr))).await.unwrap();
    assert!(edge.wait_for_policy(Duration::from_secs(5)).await);
    assert_eq!(edge.policy_version(), 2);
    let b = cloud_server::start(cloud_config(path.clone(), &b_addr.to_string(), Some(old))).await.unwrap();
    // B back: the edge sends it forwards again (its health follower sees it SERVING).
    let t = Instant::now();
    loop {
        let out = classify(&edge, "fashion-mnist:test", None, Some(50), 16).await.unwrap();
        if out.json["cloud_replicas"][b_addr.to_string()].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the edge never used the restarted replica");
    }
    a.stop().await;
    // The stream moves to B, which offers version 1: ignored.
    let t = Instant::now();
    while edge.stats.older_policies_ignored.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the policy stream did not move to the other replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(edge.policy_version(), 2, "an older version was applied after the failover");
    let out = classify(&edge, "fashion-mnist:test", None, Some(100), 16).await.unwrap();
    assert_eq!(out.json["answered"]["degraded"], 0, "B serves every forward");
    assert_eq!(out.json["answered"]["cloud"], 100, "E1 stays off (version 2): every sample goes to the cloud");
    assert!(out.json["cloud_replicas"][b.addr.to_string()].as_u64().unwrap() > 0);
    b.stop().await;
}
