//! The forward step: the survivors of a batch (samples no edge exit answered) go to the cloud as
//! one ModelInfer carrying their cut tensor; each gets the cloud's answer, or the deepest local
//! exit's answer flagged degraded when the cloud cannot answer in time.
//!
//! Only these samples wait for the cloud: the batcher has already answered the rest.
//!
//! With several cloud replicas, a forward goes to the one `replicas` picks; one that fails on the
//! link (or turns out to serve another model) is retried once on another replica before its
//! samples are answered degraded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::ModelInferRequest;
use classynet_runtime::exit::Answer;
use classynet_runtime::runner::{Forward, SampleResult};
use classynet_serving::batcher::{Forwarder, Origin};
use classynet_serving::codec::{self, string_param, WireDtype, PARAM_CUT, PARAM_FINGERPRINT, PARAM_POLICY_VERSION};
use classynet_serving::telemetry;

use tonic::transport::Channel;
use tonic::Code;

use crate::replicas::CloudPool;

/// Counters of what the edge did.
#[derive(Debug, Default)]
pub struct Stats {
    pub edge: AtomicU64,
    pub cloud: AtomicU64,
    pub degraded: AtomicU64,
    pub wire_bytes: AtomicU64,
    /// Forwards retried on a second cloud replica after the first failed.
    pub retried: AtomicU64,
    /// Policy updates a cloud replica offered that were older than the policy in force (after
    /// a failover to a replica that has not re-read the shared file yet), ignored.
    pub older_policies_ignored: AtomicU64,
}

/// What the forward step needs besides the batch.
pub(crate) struct ForwardContext {
    /// The cloud replicas; none when every exit runs here.
    pub(crate) pool: Option<Arc<CloudPool>>,
    /// Longest wait for one replica's answer.
    pub(crate) timeout: Duration,
    pub(crate) dtype: WireDtype,
    pub(crate) stats: Arc<Stats>,
    /// Exits held on this edge (the cut is after exit k).
    pub(crate) k: usize,
    pub(crate) fingerprint: String,
    pub(crate) policy_version: Arc<AtomicU64>,
}

/// The batcher's forwarder for this edge.
pub(crate) fn forwarder(ctx: Arc<ForwardContext>) -> Forwarder {
    Arc::new(move |fwd: Forward| {
        let ctx = ctx.clone();
        Box::pin(async move { ctx.forward(fwd).await })
    })
}

/// Why the cloud did not answer, and whether that says the link is unhealthy.
enum Miss {
    /// Unreachable, overloaded, too slow or broken: back off and answer degraded.
    Link(String),
    /// The cloud is up but refused these samples: answer degraded, keep the link.
    Refused(String),
    /// This replica serves another model than our head: refuse it, try another.
    OtherModel(String),
}

impl ForwardContext {
    async fn forward(&self, fwd: Forward) -> Vec<(SampleResult, Origin)> {
        let n = fwd.rows.len();
        let answers = match &self.pool {
            Some(pool) => self.balanced(pool, &fwd).await,
            None => None,
        };
        match answers {
            Some(a) => {
                self.stats.cloud.fetch_add(n as u64, Ordering::Relaxed);
                a.into_iter()
                    .map(|(label, exit, entropy, probability)| {
                        let r = if label < 0 || exit < 0 {
                            SampleResult::Failed("the cloud could not answer this sample".into())
                        } else {
                            SampleResult::Answered(Answer {
                                class: label as u32,
                                exit: exit as usize,
                                entropy,
                                probability,
                            })
                        };
                        (r, Origin::Remote)
                    })
                    .collect()
            }
            None => {
                self.stats.degraded.fetch_add(n as u64, Ordering::Relaxed);
                fwd.fallback
                    .iter()
                    .map(|f| match f {
                        Some(a) => (SampleResult::Answered(*a), Origin::Degraded),
                        None => (
                            SampleResult::Failed("non-finite logits and no cloud to go on to".into()),
                            Origin::Degraded,
                        ),
                    })
                    .collect()
            }
        }
    }

    /// Sends the batch to a replica, and once more to another if that fails; None when neither
    /// answered (the samples are then answered degraded).
    async fn balanced(&self, pool: &CloudPool, fwd: &Forward) -> Option<Vec<(i64, i32, f32, f32)>> {
        let n = fwd.rows.len();
        let mut failed = None;
        for attempt in 0..2 {
            let Some(replica) = pool.pick(failed.as_deref()) else {
                match &failed {
                    None => {
                        tracing::debug!("no cloud replica usable ({}); {n} samples answered degraded", pool.describe())
                    }
                    Some(_) => tracing::warn!("no other cloud replica usable; {n} samples answered degraded"),
                }
                return None;
            };
            if attempt > 0 {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::CLOUD_RETRIES, "side" => "edge").increment(1);
            }
            let generation = replica.generation();
            let in_flight = replica.begin();
            let result = self.call(replica.client(), fwd).await;
            drop(in_flight);
            match result {
                Ok(a) => {
                    replica.succeeded();
                    return Some(a);
                }
                Err(Miss::Link(why)) => {
                    tracing::warn!(replica = %replica.label, "forward of {n} samples failed{}: {why}",
                        if attempt == 0 { ", retrying on another replica" } else { ", answered degraded" });
                    replica.failed(generation);
                }
                Err(Miss::OtherModel(why)) => replica.refuse(why),
                Err(Miss::Refused(why)) => {
                    // The samples, not the replica: another would refuse them too.
                    tracing::error!(replica = %replica.label, "the cloud refused {n} forwarded samples, answered degraded: {why}");
                    return None;
                }
            }
            failed = Some(replica);
        }
        None
    }

    async fn call(
        &self,
        mut client: GrpcInferenceServiceClient<Channel>,
        fwd: &Forward,
    ) -> Result<Vec<(i64, i32, f32, f32)>, Miss> {
        let (input, raw) = codec::encode_tensor("cut", &fwd.cut, self.dtype);
        let bytes = raw.len();
        self.stats.wire_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        metrics::counter!(telemetry::WIRE_BYTES, "side" => "edge", "dtype" => self.dtype.label())
            .increment(bytes as u64);
        let req = ModelInferRequest {
            parameters: [
                (PARAM_CUT.to_string(), string_param(format!("E{}", self.k))),
                (PARAM_FINGERPRINT.to_string(), string_param(self.fingerprint.clone())),
                (PARAM_POLICY_VERSION.to_string(), codec::int_param(self.policy_version.load(Ordering::SeqCst) as i64)),
            ]
            .into(),
            inputs: vec![input],
            raw_input_contents: vec![raw],
            ..Default::default()
        };
        // W3C trace context: the cloud logs its work on this batch under the same trace.
        let traceparent = telemetry::new_traceparent();
        let trace_id = telemetry::trace_id(&traceparent).unwrap_or("").to_string();
        let mut request = tonic::Request::new(req);
        if let Ok(v) = traceparent.parse() {
            request.metadata_mut().insert("traceparent", v);
        }
        // The cloud sees our deadline (grpc-timeout) and does not compute what we gave up on.
        request.set_timeout(self.timeout);
        tracing::debug!(trace_id, samples = fwd.rows.len(), bytes, cut = self.k, "forwarding to the cloud");
        let sent = Instant::now();
        let resp = match tokio::time::timeout(self.timeout, client.model_infer(request)).await {
            Err(_) => return Err(Miss::Link(format!("no answer within {:?}", self.timeout))),
            Ok(Err(status)) => {
                let why = format!("{:?}: {}", status.code(), status.message());
                return Err(match status.code() {
                    // The cloud's model check (see cloud-server's infer): another model's tail.
                    Code::FailedPrecondition if status.message().contains("fingerprint") => Miss::OtherModel(why),
                    Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::OutOfRange => {
                        Miss::Refused(why)
                    }
                    _ => Miss::Link(why),
                });
            }
            Ok(Ok(resp)) => resp,
        };
        let a = codec::read_answers(resp.get_ref()).map_err(|e| Miss::Link(format!("unreadable answer: {e}")))?;
        if a.len() != fwd.rows.len() {
            return Err(Miss::Link(format!("the cloud answered {} samples for {} sent", a.len(), fwd.rows.len())));
        }
        let rtt = sent.elapsed().as_secs_f64();
        let server = codec::param_int(&resp.get_ref().parameters, codec::PARAM_SERVER_MICROS)
            .map(|us| us as f64 / 1e6)
            .unwrap_or(0.0)
            .min(rtt);
        metrics::histogram!(telemetry::STAGE_SECONDS, "side" => "edge", "stage" => "cloud").record(server);
        metrics::histogram!(telemetry::STAGE_SECONDS, "side" => "edge", "stage" => "network").record(rtt - server);
        tracing::debug!(trace_id, rtt, server, "answered by the cloud");
        Ok(a)
    }
}
