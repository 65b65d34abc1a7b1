//! One forwarded batch is one trace: the trace id the edge logs when it forwards is the one the
//! cloud's work on that batch is logged under (W3C `traceparent` in the request metadata). Its
//! own test binary: it installs the process-wide log subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};

use clap::Parser;
use edge_agent::{classify, Config, Edge};

mod common;
use common::zoo;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_logs_its_work_under_the_edges_trace_id() {
    let buf = Buffer::default();
    let writer = buf.clone();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_env_filter("edge_agent=debug,cloud_server=debug")
        .with_writer(move || writer.clone())
        .init();
    let model = zoo("tiny-3exit-cn.onnx");
    let m = model.to_str().unwrap();
    let cloud = cloud_server::start(cloud_server::Config::parse_from([
        "cloud-server",
        "--model",
        m,
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
    ]))
    .await
    .unwrap();
    let server = cloud.addr.to_string();
    let cfg = Config::parse_from([
        "edge-agent",
        "--model",
        m,
        "--partition",
        "E1",
        "--server",
        &server,
        "--threads",
        "1",
        "--wire-dtype",
        "fp16",
    ]);
    let edge = Edge::load(&cfg).await.unwrap();
    classify(&edge, "fashion-mnist:test", None, Some(64), 16).await.unwrap();
    cloud.stop().await;

    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let sent: Vec<&str> = events
        .iter()
        .filter(|e| e["message"] == "forwarding to the cloud")
        .map(|e| e["trace_id"].as_str().unwrap())
        .collect();
    let served: Vec<&str> = events
        .iter()
        .filter(|e| e["message"] == "answered" && e["span"]["name"] == "model_infer")
        .map(|e| e["span"]["trace_id"].as_str().unwrap())
        .collect();
    assert!(!sent.is_empty(), "the edge forwarded batches: {text}");
    assert_eq!(sent.len(), served.len(), "one cloud request per forwarded batch");
    for id in &sent {
        assert_eq!(id.len(), 32);
        assert!(served.contains(id), "trace {id} not found on the cloud side");
    }
}
