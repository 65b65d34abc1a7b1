//! An early exit's answer does not wait for the cloud: against a cloud that accepts connections
//! and never answers, a sample that leaves at E1 is answered within the batching delay plus the
//! head's compute, while the samples of its batch that go on wait out the cloud timeout and come
//! back degraded. Real ONNX Runtime, the zoo's ResNet-110 CN+C at E2, real gRPC on loopback.

use std::time::{Duration, Instant};

use clap::Parser;
use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::*;
use classynet_runtime::dataset::Dataset;
use classynet_runtime::exit::Policy;
use classynet_runtime::model::Model;
use classynet_runtime::ort_backend::{init_ort, OrtEngine, SessionOptions};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::runner::{SampleResult, SegmentedRunner};
use classynet_serving::codec;
use prost::Message;

mod common;
use common::zoo;

/// The first test images the E2 head answers at E1 and the first it forwards.
fn pick_samples(model: &Model, early: usize, forwarded: usize) -> (Vec<usize>, Vec<usize>, Dataset) {
    init_ort(None, 1).unwrap();
    let ds = Dataset::open_for("fashion-mnist:test", None, Some(400), model).unwrap();
    let segs = segments(model).unwrap();
    let head =
        extract_side(model, &segs, &Side::parse("E2", classynet_runtime::format::PartitionRole::Head, 7).unwrap())
            .unwrap();
    let head = Model::from_bytes(&head.encode_to_vec(), "head E2").unwrap();
    let mut r = SegmentedRunner::new(
        OrtEngine::backend(&head, SessionOptions::default()).unwrap(),
        0,
        &Policy::defaults(&head.meta),
        None,
    )
    .unwrap();
    let out = r.run(ds.batch(model, 0..ds.len())).unwrap();
    let at_e1: Vec<usize> = (0..ds.len())
        .filter(|&i| matches!(out.results[i], SampleResult::Answered(a) if a.exit == 0))
        .take(early)
        .collect();
    let on: Vec<usize> = (0..ds.len()).filter(|&i| out.results[i] == SampleResult::Forwarded).take(forwarded).collect();
    assert_eq!((at_e1.len(), on.len()), (early, forwarded), "the test set has such samples");
    (at_e1, on, ds)
}

fn pixels_request(ds: &Dataset, model: &Model, i: usize) -> ModelInferRequest {
    let x = ds.batch(model, i..i + 1);
    let (input, raw) = codec::encode_tensor("input", &x, codec::WireDtype::Fp32);
    ModelInferRequest { id: i.to_string(), inputs: vec![input], raw_input_contents: vec![raw], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_e1_answer_does_not_wait_for_a_cloud_that_never_answers() {
    let model = Model::load(&zoo("resnet110-7exit-cnc.onnx")).unwrap();
    let (early, forwarded, ds) = pick_samples(&model, 1, 7);

    // A cloud that accepts every connection and never sends a byte.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let cloud_timeout = Duration::from_millis(3000);
    let batch_delay = Duration::from_millis(50);
    let mut config = edge_agent::Config::parse_from([
        "edge-agent",
        "--partition",
        "E2",
        "--server",
        &hole_addr.to_string(),
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--cloud-timeout-ms",
        &cloud_timeout.as_millis().to_string(),
        "--max-delay-ms",
        &batch_delay.as_millis().to_string(),
    ]);
    config.model = Some(zoo("resnet110-7exit-cnc.onnx"));
    let handle = edge_agent::start(config).await.unwrap();
    let client = GrpcInferenceServiceClient::connect(format!("http://{}", handle.addr)).await.unwrap();

    // The head's compute for one batch of 8, measured here on a warm edge, through the same API:
    // all eight are E1 samples, so nothing waits for the cloud.
    let (all_early, _, _) = pick_samples(&model, 8, 0);
    let t = Instant::now();
    let calls: Vec<_> = all_early
        .iter()
        .map(|&i| {
            let mut c = client.clone();
            let req = pixels_request(&ds, &model, i);
            tokio::spawn(async move { c.model_infer(req).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let head_compute = t.elapsed();

    // One E1 sample in the same batch as seven that go on to the cloud.
    let started = Instant::now();
    let mut calls = Vec::new();
    for &i in forwarded.iter().chain(&early) {
        let mut c = client.clone();
        let req = pixels_request(&ds, &model, i);
        calls.push((i, tokio::spawn(async move { (c.model_infer(req).await, started.elapsed()) })));
    }
    let mut e1_took = None;
    for (i, call) in calls {
        let (resp, took) = call.await.unwrap();
        let resp = resp.unwrap().into_inner();
        let answers = codec::read_answers(&resp).unwrap();
        let degraded = resp.parameters.contains_key("classynet_degraded");
        if early.contains(&i) {
            assert_eq!(answers[0].1, 0, "sample {i} leaves at E1");
            assert!(!degraded, "an E1 answer is not degraded");
            e1_took = Some(took);
        } else {
            assert!(degraded, "sample {i} needed the cloud, which never answered: degraded");
            assert!(took >= cloud_timeout, "a degraded answer comes after the cloud timeout, got {took:?}");
        }
    }
    let e1_took = e1_took.unwrap();
    println!(
        "E1 answer in {e1_took:?} (batch delay {batch_delay:?}, head compute {head_compute:?}); \
         its batch mates waited the cloud timeout {cloud_timeout:?}"
    );
    // "Within the batching delay plus the head's compute", with room for a shared machine, and
    // far under the cloud timeout the old edge made it wait.
    assert!(
        e1_took < batch_delay + head_compute * 3 + Duration::from_millis(300),
        "the E1 answer took {e1_took:?}: it waited for the cloud"
    );
    assert!(e1_took < cloud_timeout / 3);
    handle.stop().await;
}
