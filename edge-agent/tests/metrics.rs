//! The Prometheus endpoints after a short split run: counts per exit add up to the samples sent,
//! and every stage has observations. Its own test binary: the metrics registry is per process.

use std::collections::HashMap;

use clap::Parser;
use edge_agent::{classify, Config, Edge};

mod common;
use common::{scrape, zoo};

/// Sums the samples of `metric` whose labels include every `want` pair, grouped by `by`.
fn sum_by(text: &str, metric: &str, want: &[(&str, &str)], by: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with(&format!("{metric}{{"))) {
        let (labels, value) = line[metric.len() + 1..].rsplit_once("} ").unwrap();
        let labels: HashMap<&str, &str> = labels
            .split("\",")
            .map(|kv| {
                let (k, v) = kv.split_once("=\"").unwrap();
                (k, v.trim_end_matches('"'))
            })
            .collect();
        if want.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            *out.entry(labels.get(by).copied().unwrap_or("").to_string()).or_insert(0.0) +=
                value.parse::<f64>().unwrap();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_answer_by_exit_class_and_place() {
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
        "--max-delay-ms",
        "1",
    ]))
    .await
    .unwrap();
    let metrics = classynet_serving::telemetry::serve_metrics("127.0.0.1:0").await.unwrap();
    let server = cloud.addr.to_string();
    let edge = Edge::load(&Config::parse_from([
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
        "int8",
    ]))
    .await
    .unwrap();
    let out = classify(&edge, "fashion-mnist:test", None, Some(300), 32).await.unwrap();
    let text = scrape(metrics).await;

    let answered = "classynet_samples_answered_total";
    let by_place = sum_by(&text, answered, &[("side", "edge")], "where");
    assert_eq!(by_place.values().sum::<f64>(), 300.0, "every sample sent is counted once: {by_place:?}");
    assert_eq!(by_place.get("edge").copied().unwrap_or(0.0), out.json["answered"]["edge"].as_f64().unwrap());
    assert_eq!(by_place.get("cloud").copied().unwrap_or(0.0), out.json["answered"]["cloud"].as_f64().unwrap());
    // Per exit, the edge's counts are the run's; the cloud counted exactly what it answered.
    let by_exit = sum_by(&text, answered, &[("side", "edge")], "exit");
    for e in out.json["exits"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert_eq!(by_exit.get(name).copied().unwrap_or(0.0), e["count"].as_f64().unwrap(), "{name}: {by_exit:?}");
    }
    let cloud_side = sum_by(&text, answered, &[("side", "cloud")], "where");
    assert_eq!(cloud_side.get("cloud"), by_place.get("cloud"));
    let by_class = sum_by(&text, answered, &[("side", "edge")], "class");
    assert!(by_class.contains_key("Ankle boot") && by_class.values().sum::<f64>() == 300.0, "{by_class:?}");

    for stage in ["queue", "compute", "network", "cloud"] {
        let n = sum_by(&text, "classynet_stage_seconds_count", &[("side", "edge"), ("stage", stage)], "stage");
        assert!(n.get(stage).copied().unwrap_or(0.0) > 0.0, "no observations of the edge's {stage} stage");
    }
    let wire = sum_by(&text, "classynet_wire_bytes_total", &[("side", "edge"), ("dtype", "int8")], "dtype");
    assert!(wire["int8"] > 0.0);
    assert!(text.contains("classynet_batch_size_count{side=\"edge\"}"), "batch sizes");
    assert!(text.contains("classynet_queue_depth{side=\"edge\"}"), "queue depth");
    assert!(text.contains("# HELP classynet_samples_answered_total"), "metrics are described");
    cloud.stop().await;
}
