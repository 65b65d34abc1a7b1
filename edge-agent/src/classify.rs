//! `edge-agent classify`: a labelled dataset through the edge (and the cloud), reported like
//! `classynet run` plus where and how soon each sample was answered.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use classynet_runtime::dataset::Dataset;
use classynet_runtime::report::RunReport;
use classynet_runtime::runner::SampleResult;
use classynet_serving::batcher::{Admission, Origin};

use crate::Edge;

/// What `classify` prints.
pub struct ClassifyOutput {
    pub json: serde_json::Value,
    pub text: String,
    /// Per sample: (label, exit, origin), in dataset order.
    pub answers: Vec<Option<(u32, usize, Origin)>>,
}

/// How long `classify` waits for the cloud's policy before it starts.
const POLICY_WAIT: Duration = Duration::from_secs(10);

/// Sends every sample as its own request (at most `concurrency` in flight) and tallies.
pub async fn classify(
    edge: &Arc<Edge>,
    dataset: &str,
    data_dir: Option<PathBuf>,
    limit: Option<usize>,
    concurrency: usize,
) -> anyhow::Result<ClassifyOutput> {
    let ds = Arc::new(Dataset::open_for(dataset, data_dir.as_deref(), limit, &edge.head)?);
    let n = ds.len();
    if edge.server.is_some() && !edge.wait_for_policy(POLICY_WAIT).await {
        tracing::warn!("no exit policy from the cloud within {POLICY_WAIT:?}; starting with the model's defaults");
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let bytes_before = edge.stats.wire_bytes.load(Ordering::Relaxed);
    let sent_before = edge.stats.wire_sent_bytes.load(Ordering::Relaxed);
    let replicas_before = edge.forwards_per_replica();
    let cuts_before = edge.stats.by_cut.lock().expect("no code panics while holding the cut counts").clone();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (edge, ds) = (edge.clone(), ds.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let x = ds.batch(&edge.head, i..i + 1);
            let t0 = Instant::now();
            let r = edge.infer(x, Admission::Job).await;
            (r, t0.elapsed())
        }));
    }
    let mut report = RunReport::new(&edge.head, &ds.name, edge.batcher_max(), 0);
    let mut latencies = Vec::with_capacity(n);
    // Time to answer by where the answer came from: an early exit's answer must not wait for
    // the cloud.
    let mut by_place: [Vec<f64>; 3] = Default::default();
    let (mut at_edge, mut at_cloud, mut degraded) = (0u64, 0u64, 0u64);
    let mut answers = Vec::with_capacity(n);
    for (i, t) in tasks.into_iter().enumerate() {
        let (r, lat) = t.await?;
        let served = r?;
        let ms = lat.as_secs_f64() * 1000.0;
        latencies.push(ms);
        let place = match served.origin[0] {
            Origin::Local => 0,
            Origin::Remote => 1,
            Origin::Degraded => 2,
        };
        by_place[place].push(ms);
        match (&served.results[0], served.origin[0]) {
            (SampleResult::Answered(a), o) => {
                report.answered(a, ds.labels[i]);
                answers.push(Some((a.class, a.exit, o)));
                match o {
                    Origin::Local => at_edge += 1,
                    Origin::Remote => at_cloud += 1,
                    Origin::Degraded => degraded += 1,
                }
            }
            _ => {
                report.failed();
                answers.push(None);
            }
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.policy_version = edge.policy_version();
    let wire = edge.stats.wire_bytes.load(Ordering::Relaxed) - bytes_before;
    let sent = edge.stats.wire_sent_bytes.load(Ordering::Relaxed) - sent_before;
    // Per sample that crossed the link (answered by the cloud, or degraded after trying).
    let forwarded = (at_cloud + degraded).max(1) as f64;
    let (p50, p90, p99) =
        (percentile(&mut latencies, 0.5), percentile(&mut latencies, 0.9), percentile(&mut latencies, 0.99));
    let mut place_json = serde_json::Map::new();
    let mut place_text = Vec::new();
    for (place, mut l) in ["edge", "cloud", "degraded"].into_iter().zip(by_place) {
        if l.is_empty() {
            continue;
        }
        let (p50, p99) = (percentile(&mut l, 0.5), percentile(&mut l, 0.99));
        place_json.insert(place.into(), serde_json::json!({"n": l.len(), "p50": p50, "p99": p99}));
        place_text.push(format!("{place} p50 {p50:.2} ms p99 {p99:.2} ms"));
    }
    let mut json = report.json();
    let obj = json.as_object_mut().expect("the report is a JSON object");
    obj.insert("answered".into(), serde_json::json!({"edge": at_edge, "cloud": at_cloud, "degraded": degraded}));
    obj.insert("latency_ms".into(), serde_json::json!({"p50": p50, "p90": p90, "p99": p99}));
    obj.insert("latency_ms_by_place".into(), serde_json::Value::Object(place_json));
    obj.insert("wire_bytes_per_sample".into(), serde_json::json!(wire as f64 / n as f64));
    // Before compression (the tensors) and after (the messages on the wire, gRPC framing and
    // compression included).
    obj.insert(
        "wire".into(),
        serde_json::json!({
            "tensor_bytes": wire,
            "sent_bytes": sent,
            "tensor_bytes_per_forwarded_sample": wire as f64 / forwarded,
            "sent_bytes_per_forwarded_sample": sent as f64 / forwarded,
            "compression_ratio": if sent > 0 { wire as f64 / sent as f64 } else { 0.0 },
        }),
    );
    obj.insert(
        "partition".into(),
        serde_json::json!(if edge.adaptive { format!("auto:E{}", edge.k) } else { format!("E{}", edge.k) }),
    );
    // Where the batches were cut (one cut with a static partition; with `auto`, the planner's
    // choices).
    let by_cut = edge.stats.by_cut.lock().expect("no code panics while holding the cut counts").clone();
    let mut cuts = serde_json::Map::new();
    let mut cut_text = Vec::new();
    for (cut, (batches, samples)) in by_cut {
        let (b0, s0) = cuts_before.get(&cut).copied().unwrap_or_default();
        if batches > b0 {
            cuts.insert(format!("E{cut}"), serde_json::json!({"batches": batches - b0, "samples": samples - s0}));
            cut_text.push(format!("E{cut} {}", batches - b0));
        }
    }
    obj.insert("forwards_by_cut".into(), serde_json::Value::Object(cuts));
    // Where the forwards went: with several cloud replicas, how evenly they were spread.
    let mut replicas = serde_json::Map::new();
    for (addr, n) in edge.forwards_per_replica() {
        let before = replicas_before.iter().find(|(a, _)| *a == addr).map_or(0, |(_, b)| *b);
        replicas.insert(addr, serde_json::json!(n - before));
    }
    let replica_text = if replicas.len() > 1 {
        let each: Vec<String> = replicas.iter().map(|(a, n)| format!("{a} {n}")).collect();
        format!("\nforwards answered per cloud replica: {}", each.join(" · "))
    } else {
        String::new()
    };
    obj.insert("cloud_replicas".into(), serde_json::Value::Object(replicas));
    let text = format!(
        "{}\nanswered on the edge {at_edge}, in the cloud {at_cloud}, degraded {degraded} · partition {} (batches forwarded per cut: {})\nlatency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms · per forwarded sample {:.0} bytes of tensor, {:.0} sent ({:.2}x)\ntime to answer: {}{replica_text}",
        report.table(""),
        if edge.adaptive { format!("auto:E{}", edge.k) } else { format!("E{}", edge.k) },
        if cut_text.is_empty() { "none".to_string() } else { cut_text.join(", ") },
        p50,
        p90,
        p99,
        wire as f64 / forwarded,
        sent as f64 / forwarded,
        if sent > 0 { wire as f64 / sent as f64 } else { 0.0 },
        place_text.join(" · ")
    );
    Ok(ClassifyOutput { json, text, answers })
}

/// The p-quantile (nearest rank) of `values`, sorting them in place; 0 when there are none.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1]
}
