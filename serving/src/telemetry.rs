//! What an operator sees: logs (text or JSON, through `tracing`), Prometheus metrics on their own
//! HTTP address, and the W3C `traceparent` that ties an edge's forward to the cloud's work on it.
//!
//! Metrics are recorded with the `metrics` facade into one process-wide Prometheus recorder;
//! every series carries `side="edge"` or `side="cloud"`, so one scrape config reads both.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::error::ServeError;

/// Requests received (v2 ModelInfer), by outcome.
pub const REQUESTS: &str = "classynet_requests_total";
/// Samples answered, by exit, predicted class and where (edge, cloud, degraded).
pub const ANSWERED: &str = "classynet_samples_answered_total";
/// Seconds per stage: queue (waiting for a batch), compute (ONNX Runtime), network (edge to
/// cloud and back, less the cloud's queue and compute), cloud (the cloud's queue + compute as
/// the edge sees it).
pub const STAGE_SECONDS: &str = "classynet_stage_seconds";
/// Samples per batch run.
pub const BATCH_SIZE: &str = "classynet_batch_size";
/// Samples admitted and not yet answered.
pub const QUEUE_DEPTH: &str = "classynet_queue_depth";
/// Bytes of cut tensors sent to the cloud.
pub const WIRE_BYTES: &str = "classynet_wire_bytes_total";
/// Counter: bytes the edge's forwards put on the wire (gRPC framing and compression included),
/// by compression; against [`WIRE_BYTES`] (the tensors before compression) it gives the ratio.
pub const WIRE_SENT_BYTES: &str = "classynet_wire_sent_bytes_total";
/// Gauge: the exit after which the edge forwarded its last batch (1 = E1); with `--partition
/// auto` it moves with the link and the traffic.
pub const SPLIT_CUT: &str = "classynet_split_cut";
/// Counter: batches forwarded, by cut and by why that cut (best estimate, probe, exploring).
pub const SPLIT_DECISIONS: &str = "classynet_split_decisions_total";
/// Version of the exit policy in force.
pub const POLICY_VERSION: &str = "classynet_policy_version";
/// Policies refused (invalid file on the cloud, or refused by an edge).
pub const POLICY_REJECTIONS: &str = "classynet_policy_rejections_total";

/// Requests refused before any work, by reason (queue_full, queue_delay, too_large, deadline).
pub const SHED: &str = "classynet_requests_shed_total";
/// Seconds from a request's arrival to its answer, per sample, by where it was answered (edge,
/// cloud, degraded): an early exit's answer does not wait for the cloud.
pub const ANSWER_SECONDS: &str = "classynet_answer_seconds";

/// The edge's memory plan: the planner's weights + peak activations of its head at its batch,
/// in bytes (what `--memory-budget` is compared with).
pub const EDGE_MEMORY_PLAN: &str = "classynet_edge_memory_plan_bytes";
/// The edge's resident memory before its model was read, with the engine open: the process's
/// own baseline, which the plan does not count.
pub const EDGE_MEMORY_BASELINE: &str = "classynet_edge_memory_baseline_bytes";
/// The edge's resident set now (`VmRSS`), sampled every few seconds.
pub const EDGE_RSS: &str = "classynet_edge_rss_bytes";
/// The anonymous part of the edge's resident set now (`RssAnon`: heap and stacks; the rest
/// of `VmRSS` is the mapped code of the binary and the engine library).
pub const EDGE_RSS_ANON: &str = "classynet_edge_rss_anon_bytes";
/// The edge's highest resident set since it started (`VmHWM`): what a cgroup's `MemoryMax`
/// must stay above.
pub const EDGE_PEAK_RSS: &str = "classynet_edge_peak_rss_bytes";
/// Forwards from an edge to one cloud replica, by `endpoint` (address) and outcome: ok, failed
/// (the link: retried on another replica, or answered degraded), refused (the replica serves
/// another model, or refused the samples).
pub const CLOUD_FORWARDS: &str = "classynet_cloud_forwards_total";
/// Forwards retried on another replica after the first one failed.
pub const CLOUD_RETRIES: &str = "classynet_cloud_retries_total";
/// 1 while an edge sends a cloud replica traffic (healthy, same model, not backing off), else 0.
pub const CLOUD_ENDPOINT_UP: &str = "classynet_cloud_endpoint_up";
/// Forwards in flight to one cloud replica.
pub const CLOUD_OUTSTANDING: &str = "classynet_cloud_outstanding";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for journald → log shippers).
    Json,
}

/// Logs to stderr at `RUST_LOG` (default info) in `format`. Colours only on a terminal: the
/// journal, a file or a pipe gets plain text.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder, installed on first use (every metric call before it is dropped,
/// so servers call this at start).
pub fn recorder() -> &'static PrometheusHandle {
    RECORDER.get_or_init(|| {
        let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(STAGE_SECONDS.into()), &buckets)
            .and_then(|b| {
                b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(ANSWER_SECONDS.into()), &buckets)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.into()), &sizes)
            })
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // A second recorder can only come from a test harness that installed its own.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    metrics::describe_counter!(REQUESTS, "Inference requests received, by outcome (ok, error).");
    metrics::describe_counter!(
        ANSWERED,
        "Samples answered, by exit, predicted class and where (edge, cloud, degraded)."
    );
    metrics::describe_histogram!(
        STAGE_SECONDS,
        metrics::Unit::Seconds,
        "Time per stage: queue, compute, network (edge side, less the cloud's time), cloud (as seen by the edge)."
    );
    metrics::describe_histogram!(BATCH_SIZE, "Samples per batch run.");
    metrics::describe_gauge!(QUEUE_DEPTH, "Samples admitted and not yet answered.");
    metrics::describe_counter!(
        WIRE_BYTES,
        metrics::Unit::Bytes,
        "Bytes of cut tensors sent to the cloud, before compression."
    );
    metrics::describe_counter!(
        WIRE_SENT_BYTES,
        metrics::Unit::Bytes,
        "Bytes the forwards put on the wire (gRPC framing and compression included), by compression."
    );
    metrics::describe_gauge!(SPLIT_CUT, "Exit after which the last batch was forwarded (1 = E1).");
    metrics::describe_counter!(SPLIT_DECISIONS, "Batches forwarded, by cut and reason (best, probe, explore).");
    metrics::describe_gauge!(POLICY_VERSION, "Version of the exit policy in force.");
    metrics::describe_counter!(POLICY_REJECTIONS, "Exit policies refused.");
    metrics::describe_counter!(SHED, "Requests refused before any work, by reason.");
    metrics::describe_histogram!(
        ANSWER_SECONDS,
        metrics::Unit::Seconds,
        "Time from a request's arrival to its answer, per sample, by where it was answered."
    );
}

/// Serves `GET /metrics` (Prometheus text format) on `listen`; returns the bound address.
/// Everything else gets 404. The server ends with the process.
pub async fn serve_metrics(listen: &str) -> Result<SocketAddr, ServeError> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    let handle = recorder();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| ServeError::InvalidArgument(format!("cannot listen for metrics on {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| ServeError::Unavailable(format!("metrics listener: {e}")))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                let resp = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(handle.render())))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"GET /metrics\n")))
                };
                Ok::<_, std::convert::Infallible>(resp.expect("static response parts are valid"))
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!("metrics connection: {e}");
                }
            });
        }
    });
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(addr)
}

/// A new W3C trace context: `00-<32 hex trace id>-<16 hex span id>-01`.
pub fn new_traceparent() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Unique, not secret: RandomState is seeded per process, the counter separates calls.
    let mut ids = [0u64; 3];
    for id in &mut ids {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        *id = h.finish() | 1; // all-zero ids are invalid
    }
    format!("00-{:016x}{:016x}-{:016x}-01", ids[0], ids[1], ids[2])
}

/// The trace id of a `traceparent` value, if it is well formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let parts: Vec<&str> = traceparent.split('-').collect();
    match parts.as_slice() {
        [v, t, s, f]
            if v.len() == 2
                && t.len() == 32
                && s.len() == 16
                && f.len() == 2
                && t.bytes().all(|b| b.is_ascii_hexdigit())
                && *t != "0".repeat(32) =>
        {
            Some(t)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_well_formed_and_distinct() {
        let a = new_traceparent();
        let b = new_traceparent();
        assert_ne!(a, b);
        assert_eq!(trace_id(&a).unwrap().len(), 32, "{a}");
        assert!(trace_id("00-xyz-0000000000000001-01").is_none());
        assert!(trace_id(&format!("00-{}-0000000000000001-01", "0".repeat(32))).is_none());
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_prometheus_text() {
        let addr = serve_metrics("127.0.0.1:0").await.unwrap();
        metrics::counter!(REQUESTS, "side" => "test", "outcome" => "ok").increment(3);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("classynet_requests_total{side=\"test\",outcome=\"ok\"} 3"), "{body}");
    }
}
