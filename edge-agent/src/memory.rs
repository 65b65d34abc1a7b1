//! The edge's resident memory against its plan.
//!
//! The planner's number (weights + peak activations of the head at its batch) is what
//! `--memory-budget` is compared with; the process also holds the engine, the binary, tokio and
//! gRPC (its baseline), the model file it parsed to cut the head, and whatever the engine keeps
//! per session (ONNX Runtime copies and pre-packs the weights). So the agent measures itself:
//! `VmRSS` and `VmHWM` from `/proc/self/status` once after warm-up and every [`PERIOD`], exported
//! as gauges next to the plan and the baseline, and one warning when the peak passes plan +
//! baseline by more than [`margin`].

use std::sync::Weak;
use std::time::Duration;

use classynet_runtime::planner::{human, resident, Resident};
use classynet_serving::telemetry;

use crate::Edge;

/// Between samples. The kernel keeps the peak (`VmHWM`) itself, so a spike between two samples is
/// reported late, never missed.
const PERIOD: Duration = Duration::from_secs(5);

/// What the planner and the start-up measurement say this edge needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryPlan {
    /// The head's batch.
    pub batch: usize,
    /// Weights + peak activations of the head at `batch`.
    pub plan_bytes: Option<u64>,
    /// Resident set with the engine open and no model read yet.
    pub baseline_bytes: Option<u64>,
}

/// How far the peak may pass plan + baseline before the warning. Beyond the plan the process
/// holds the parsed model file (the full model when it cuts its own head) and the engine's copy
/// of the weights, a few times the weights; a quarter of the expectation, at least 16 MiB, keeps
/// the warning for a plan that is wrong rather than for that known overhead of small heads.
pub(crate) fn margin(expected: u64) -> u64 {
    (expected / 4).max(16 << 20)
}

/// Samples the resident set until the edge is dropped. Call it once the head is warm: the first
/// sample is the after-warm-up figure that the log line reports.
pub(crate) async fn watch(edge: Weak<Edge>, plan: MemoryPlan) {
    describe();
    if let Some(p) = plan.plan_bytes {
        metrics::gauge!(telemetry::EDGE_MEMORY_PLAN, "side" => "edge").set(p as f64);
    }
    if let Some(b) = plan.baseline_bytes {
        metrics::gauge!(telemetry::EDGE_MEMORY_BASELINE, "side" => "edge").set(b as f64);
    }
    let mut first = true;
    let mut warned = false;
    while edge.strong_count() > 0 {
        let Some(now) = resident() else {
            tracing::debug!("no /proc/self/status here: the edge's memory is not sampled");
            return;
        };
        metrics::gauge!(telemetry::EDGE_RSS, "side" => "edge").set(now.rss_bytes as f64);
        metrics::gauge!(telemetry::EDGE_PEAK_RSS, "side" => "edge").set(now.peak_bytes as f64);
        if let Some(anon) = now.anon_bytes {
            metrics::gauge!(telemetry::EDGE_RSS_ANON, "side" => "edge").set(anon as f64);
        }
        if first {
            report(now, plan);
            first = false;
        }
        if !warned {
            if let Some(msg) = over(now, plan) {
                tracing::warn!(peak_rss_bytes = now.peak_bytes, "{msg}");
                warned = true;
            }
        }
        tokio::time::sleep(PERIOD).await;
    }
}

/// The after-warm-up log line: resident set and peak against plan + baseline.
fn report(now: Resident, plan: MemoryPlan) {
    let expected = match (plan.plan_bytes, plan.baseline_bytes) {
        (Some(p), Some(b)) => format!(
            "plan {} (weights + activations at batch {}) + baseline {} = {}",
            human(p),
            plan.batch,
            human(b),
            human(p + b)
        ),
        (Some(p), None) => format!("plan {} (weights + activations at batch {})", human(p), plan.batch),
        _ => "no plan for this head".into(),
    };
    // The code pages are most of a small head's resident set; say how much is the process's own.
    let anon = now.anon_bytes.map(|a| format!(" ({} anonymous, the rest mapped code)", human(a))).unwrap_or_default();
    tracing::info!(
        rss_bytes = now.rss_bytes,
        rss_anon_bytes = now.anon_bytes,
        peak_rss_bytes = now.peak_bytes,
        plan_bytes = plan.plan_bytes,
        baseline_bytes = plan.baseline_bytes,
        batch = plan.batch,
        "memory after warm-up: resident {}{anon}, peak {}; {expected}",
        human(now.rss_bytes),
        human(now.peak_bytes)
    );
}

/// The warning, when the peak passed plan + baseline by more than the margin.
fn over(now: Resident, plan: MemoryPlan) -> Option<String> {
    let expected = plan.plan_bytes? + plan.baseline_bytes?;
    let limit = expected + margin(expected);
    (now.peak_bytes > limit).then(|| {
        format!(
            "peak resident memory {} is above plan {} + baseline {} by {} (more than the {} margin): the planner \
             does not account for all of it; size MemoryMax from the measured peak (deploy/README.md)",
            human(now.peak_bytes),
            human(plan.plan_bytes.unwrap_or(0)),
            human(plan.baseline_bytes.unwrap_or(0)),
            human(now.peak_bytes - expected),
            human(margin(expected))
        )
    })
}

fn describe() {
    metrics::describe_gauge!(
        telemetry::EDGE_MEMORY_PLAN,
        metrics::Unit::Bytes,
        "The planner's weights + peak activations of the edge's head at its batch."
    );
    metrics::describe_gauge!(
        telemetry::EDGE_MEMORY_BASELINE,
        metrics::Unit::Bytes,
        "Resident memory of the edge with its engine open, before the model was read."
    );
    metrics::describe_gauge!(telemetry::EDGE_RSS, metrics::Unit::Bytes, "Resident memory of the edge now (VmRSS).");
    metrics::describe_gauge!(
        telemetry::EDGE_RSS_ANON,
        metrics::Unit::Bytes,
        "Anonymous part of the edge's resident memory now (RssAnon: heap and stacks, without mapped code)."
    );
    metrics::describe_gauge!(
        telemetry::EDGE_PEAK_RSS,
        metrics::Unit::Bytes,
        "Highest resident memory of the edge since it started (VmHWM)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_comes_only_past_plan_baseline_and_margin() {
        let plan = MemoryPlan { batch: 16, plan_bytes: Some(1 << 20), baseline_bytes: Some(40 << 20) };
        let expected = 41u64 << 20;
        let at = |peak: u64| Resident { rss_bytes: peak, peak_bytes: peak, anon_bytes: None };
        assert!(over(at(expected + margin(expected)), plan).is_none());
        let msg = over(at(expected + margin(expected) + 1), plan).expect("past the margin");
        assert!(msg.contains("above plan 1.05 MB + baseline 41.94 MB"), "{msg}");
        assert!(over(at(u64::MAX / 2), MemoryPlan { plan_bytes: None, ..plan }).is_none(), "no plan, no verdict");
    }
}
