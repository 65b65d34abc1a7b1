//! The wire between edge and cloud over real sockets: gRPC message compression of the cut
//! tensors, a client that compresses with gzip only, and `--partition auto` choosing its cut
//! over a slow link (the project's delay relay with a small in-flight window).

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::ModelInferRequest;
use classynet_runtime::backend::Tensor;
use classynet_runtime::dataset::Dataset;
use classynet_runtime::model::Model;
use classynet_serving::codec::{self, WireDtype};
use edge_agent::{classify, Config, Edge};
use tonic::codec::CompressionEncoding;

mod common;
use common::{answers, zoo};

fn cloud_config(model: &Path) -> cloud_server::Config {
    common::cloud_config(model, "127.0.0.1:0", &[])
}

fn edge_config(model: &Path, partition: &str, server: String, extra: &[&str]) -> Config {
    common::edge_config(Some(model), partition, &server, 5000, extra)
}

/// Compression is lossless: for every wire dtype the answers with zstd and gzip are those
/// without, and the bytes on the wire drop below the tensor bytes where the tensor compresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_forwards_answer_like_uncompressed_ones_with_fewer_bytes_sent() {
    let path = zoo("tiny-3exit-cn.onnx");
    let cloud = cloud_server::start(cloud_config(&path)).await.unwrap();
    for dtype in WireDtype::ALL {
        let mut plain = None;
        for compression in ["none", "zstd", "gzip"] {
            let cfg = edge_config(
                &path,
                "E1",
                cloud.addr.to_string(),
                &["--wire-dtype", dtype.label(), "--wire-compression", compression],
            );
            let edge = Edge::load(&cfg).await.unwrap();
            let out = classify(&edge, "fashion-mnist:test", None, Some(300), 32).await.unwrap();
            let w = &out.json["wire"];
            let (tensor, sent) = (w["tensor_bytes"].as_f64().unwrap(), w["sent_bytes"].as_f64().unwrap());
            assert_eq!(out.json["answered"]["degraded"], 0, "{dtype:?} {compression}");
            assert!(tensor > 0.0, "{dtype:?} {compression}: something was forwarded");
            match compression {
                // Uncompressed: the tensor plus the message around it (INT8 adds a scale and
                // zero point per sample and channel as text, about 8 % of this small cut, and a
                // loaded machine makes more, smaller batches, each with its own message).
                "none" => {
                    assert!(sent > tensor && sent < tensor * 1.25, "{dtype:?}: {sent} sent for {tensor}");
                    plain = Some(answers(&out));
                }
                _ => {
                    assert_eq!(Some(answers(&out)), plain, "{dtype:?} {compression}: the same answers");
                    // ReLU outputs: zeros (and for INT8 a narrow alphabet) compress.
                    assert!(sent < tensor * 0.9, "{dtype:?} {compression}: {sent} sent for {tensor} tensor bytes");
                }
            }
        }
    }
    cloud.stop().await;
}

/// A v2 client that only knows gzip (or no compression) is served by the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_serves_gzip_and_uncompressed_clients() {
    let path = zoo("tiny-3exit-cn.onnx");
    let model = Model::load(&path).unwrap();
    let cloud = cloud_server::start(cloud_config(&path)).await.unwrap();
    let ds = Dataset::open_for("fashion-mnist:test", None, Some(8), &model).unwrap();
    let batch: Tensor = ds.batch(&model, 0..8);
    let mut labels = Vec::new();
    for encoding in [None, Some(CompressionEncoding::Gzip), Some(CompressionEncoding::Zstd)] {
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", cloud.addr)).await.unwrap();
        if let Some(e) = encoding {
            client = client.send_compressed(e);
        }
        let (input, raw) = codec::encode_tensor("input", &batch, WireDtype::Fp32);
        // A plain v2 request (no cut parameter): the whole model runs in the cloud.
        let req = ModelInferRequest { inputs: vec![input], raw_input_contents: vec![raw], ..Default::default() };
        let resp = client.model_infer(req).await.unwrap_or_else(|s| panic!("{encoding:?}: {s:?}"));
        labels.push(codec::read_answers(resp.get_ref()).unwrap().iter().map(|a| a.0).collect::<Vec<_>>());
    }
    assert_eq!(labels[0], labels[1]);
    assert_eq!(labels[0], labels[2]);
    cloud.stop().await;
}

/// Over a slow link (20 ms each way, 16 kB in flight: about 0.8 MB/s), forwarding at E1 sends
/// 50 kB per sample of ResNet-110 and a deep cut an eighth of that: `--partition auto` settles
/// on a deep cut within its exploration, and answers what the static partitions answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_split_settles_on_the_cut_a_slow_link_favours_and_answers_like_a_static_run() {
    let path = zoo("resnet110-7exit-cnc.onnx");
    let cloud = cloud_server::start(cloud_config(&path)).await.unwrap();
    let mut relay_cfg =
        link_relay::Config::new("127.0.0.1:0".parse().unwrap(), cloud.addr.to_string(), Duration::from_millis(20));
    relay_cfg.max_buffer = 16 * 1024;
    let relay = link_relay::start(relay_cfg).await.unwrap();
    let n = 800;
    // The relay listens on loopback; compression off so that the link, not zstd, decides.
    let extra = ["--wire-compression", "none", "--max-batch", "16"];
    let edge = Edge::load(&edge_config(&path, "auto", relay.addr.to_string(), &extra)).await.unwrap();
    assert_eq!(edge.k, 6, "auto without a budget holds every exit but the last");
    let out = classify(&edge, "fashion-mnist:test", None, Some(n), 16).await.unwrap();
    let by_cut = out.json["forwards_by_cut"].as_object().unwrap().clone();
    let batches = |cut: &str| by_cut.get(cut).map_or(0, |c| c["batches"].as_u64().unwrap());
    let total: u64 = by_cut.values().map(|c| c["batches"].as_u64().unwrap()).sum();
    let deep: u64 = ["E4", "E5", "E6"].iter().map(|c| batches(c)).sum();
    assert!(batches("E1") <= 3, "E1 only explored or probed: {by_cut:?}");
    assert!(deep as f64 >= 0.75 * total as f64, "settles on a deep cut: {by_cut:?}");
    assert_eq!(out.json["answered"]["degraded"], 0);
    assert_eq!(out.json["partition"], "auto:E6", "adaptive within the head it holds");
    // Static runs at the shallowest and the deepest cut give the same answers: the cut does not
    // change what a sample is answered, only where.
    let adaptive = answers(&out);
    for partition in ["E1", "E6"] {
        let edge = Edge::load(&edge_config(&path, partition, cloud.addr.to_string(), &extra)).await.unwrap();
        let out = classify(&edge, "fashion-mnist:test", None, Some(n), 32).await.unwrap();
        assert_eq!(answers(&out), adaptive, "static {partition}");
    }
    relay.stop().await;
    cloud.stop().await;
}

/// Bad values of the new flags are refused with what was expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_split_and_wire_flags_are_explained() {
    let e = Config::try_parse_from(["edge-agent", "--wire-compression", "lz4"]).unwrap_err().to_string();
    assert!(e.contains("lz4") && e.contains("zstd") && e.contains("gzip"), "{e}");
    let path = zoo("tiny-3exit-cn.onnx");
    let cfg = edge_config(&path, "E9", "127.0.0.1:1".into(), &[]);
    let e = Edge::load(&cfg).await.err().unwrap().to_string();
    assert!(e.contains("E9") && e.contains("auto"), "{e}");
    let mut cfg = edge_config(&path, "E1", "127.0.0.1:1".into(), &[]);
    cfg.memory_budget = Some("1MB".into());
    let e = Edge::load(&cfg).await.err().unwrap().to_string();
    assert!(e.contains("--partition auto"), "{e}");
    let mut cfg = edge_config(&path, "auto", "127.0.0.1:1".into(), &[]);
    cfg.model = None;
    let e = Edge::load(&cfg).await.err().unwrap().to_string();
    assert!(e.contains("--partition auto needs --model"), "{e}");
    let mut cfg = edge_config(&path, "auto", "127.0.0.1:1".into(), &[]);
    cfg.server = None;
    let e = Edge::load(&cfg).await.err().unwrap().to_string();
    assert!(e.contains("--server"), "{e}");
    let e = Edge::load(&edge_config(&path, "auto:E7", "127.0.0.1:1".into(), &[])).await.err().unwrap().to_string();
    assert!(e.contains("--partition auto:E7") && e.contains("auto:Ek holds the head Ek"), "{e}");
    let mut cfg = edge_config(&path, "auto:E1", "127.0.0.1:1".into(), &[]);
    cfg.memory_budget = Some("1MB".into());
    let e = Edge::load(&cfg).await.err().unwrap().to_string();
    assert!(e.contains("both choose the partition"), "{e}");
}

/// `auto:Ek` holds the head Ek and chooses among its cuts: here E1 and E2 of a 3-exit model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_within_a_given_head_holds_that_head() {
    let path = zoo("tiny-3exit-cn.onnx");
    let cloud = cloud_server::start(cloud_config(&path)).await.unwrap();
    let edge = Edge::load(&edge_config(&path, "auto:E1", cloud.addr.to_string(), &[])).await.unwrap();
    assert_eq!(edge.k, 1);
    let out = classify(&edge, "fashion-mnist:test", None, Some(64), 16).await.unwrap();
    assert_eq!(out.json["partition"], "auto:E1");
    let cuts: Vec<&String> = out.json["forwards_by_cut"].as_object().unwrap().keys().collect();
    assert!(!cuts.is_empty() && cuts.iter().all(|c| *c == "E1"), "a head E1 can only cut after E1: {cuts:?}");
    cloud.stop().await;
}
