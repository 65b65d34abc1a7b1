//! The edge's memory against its plan: with `--memory-budget` and `--max-batch auto` it runs the
//! batch the planner chose, and exports the plan, its baseline, and its measured resident set
//! and peak as Prometheus gauges. Real servers on 127.0.0.1:0; its own test binary, because the
//! metrics registry is per process.

use std::collections::HashMap;

use clap::Parser;
use classynet_runtime::model::Model;
use classynet_runtime::partition::segments;
use classynet_runtime::planner::{choose_batch, plan, Formula};
use edge_agent::{classify, Config};

mod common;
use common::{scrape, zoo};

/// The value of every `name{side="edge"} value` line.
fn gauges(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once("{side=\"edge\"} ")?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_exports_its_memory_against_the_plan() {
    let path = zoo("tiny-3exit-cn.onnx");
    let m = path.to_str().unwrap();
    // A budget that fits E1 at batch 4 and nothing at 5: auto must come down to 4.
    let model = Model::load(&path).unwrap();
    let segs = segments(&model).unwrap();
    let budget = plan(&model, &segs, 4)[0].total();
    let want = choose_batch(16, budget, Formula::Runtime, |b| plan(&model, &segs, b)).unwrap();
    assert_eq!(want.batch, 4, "{}", want.why);

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
    let metrics = classynet_serving::telemetry::serve_metrics("127.0.0.1:0").await.unwrap();
    let server = cloud.addr.to_string();
    let edge = edge_agent::start(Config::parse_from([
        "edge-agent",
        "--model",
        m,
        "--memory-budget",
        &budget.to_string(),
        "--max-batch",
        "auto",
        "--server",
        &server,
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
    ]))
    .await
    .unwrap();
    assert_eq!(edge.edge.k, want.index + 1);
    let out = classify(&edge.edge, "fashion-mnist:test", None, Some(100), 16).await.unwrap();
    assert_eq!(out.json["answered"]["degraded"], 0, "{}", out.json);

    let text = scrape(metrics).await;
    let g = gauges(&text);
    let get = |name: &str| *g.get(name).unwrap_or_else(|| panic!("{name} is exported:\n{text}"));
    assert_eq!(get("classynet_edge_memory_plan_bytes"), want.chosen().total() as f64, "the plan of the chosen head");
    let rss = get("classynet_edge_rss_bytes");
    let peak = get("classynet_edge_peak_rss_bytes");
    let baseline = get("classynet_edge_memory_baseline_bytes");
    assert!(rss > 0.0 && peak >= rss, "rss {rss}, peak {peak}");
    // Sampled a moment apart from VmRSS, so bounded by the peak rather than the sample.
    let anon = get("classynet_edge_rss_anon_bytes");
    assert!(anon > 0.0 && anon <= peak, "anonymous {anon}, peak {peak}");
    assert!(baseline > 0.0 && peak >= baseline, "baseline {baseline}, peak {peak}");
    assert!(text.contains("# HELP classynet_edge_peak_rss_bytes"), "the gauges are described");
    // The batcher runs the chosen batch: no batch above it.
    let over: f64 = text
        .lines()
        .filter(|l| l.starts_with("classynet_batch_size_bucket{side=\"edge\",le=\"4\"}"))
        .chain(text.lines().filter(|l| l.starts_with("classynet_batch_size_count{side=\"edge\"}")))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .fold(f64::NAN, |first, x| if first.is_nan() { x } else { x - first });
    assert_eq!(over, 0.0, "every edge batch has at most 4 samples:\n{text}");
    edge.stop().await;
    cloud.stop().await;
}
