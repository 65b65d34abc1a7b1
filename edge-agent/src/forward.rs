//! The forward step: the survivors of a batch (samples no edge exit answered) go to the cloud as
//! one ModelInfer carrying their cut tensor; each gets the cloud's answer, or the deepest local
//! exit's answer flagged degraded when the cloud cannot answer in time.
//!
//! Only these samples wait for the cloud: the batcher has already answered the rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::ModelInferRequest;
use classynet_runtime::exit::Answer;
use classynet_runtime::runner::{Forward, SampleResult};
use classynet_serving::batcher::{Forwarder, Origin};
use classynet_serving::codec::{self, string_param, PARAM_CUT, PARAM_FINGERPRINT, PARAM_POLICY_VERSION};
use classynet_serving::telemetry;

use tonic::transport::Channel;
use tonic::Code;

use crate::cloud_client::CloudLink;

/// Counters of what the edge did.
#[derive(Debug, Default)]
pub struct Stats {
    pub edge: AtomicU64,
    pub cloud: AtomicU64,
    pub degraded: AtomicU64,
    pub wire_bytes: AtomicU64,
}

/// What the forward step needs besides the batch.
pub(crate) struct ForwardContext {
    pub(crate) link: CloudLink,
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
}

impl ForwardContext {
    async fn forward(&self, fwd: Forward) -> Vec<(SampleResult, Origin)> {
        let n = fwd.rows.len();
        let (down, generation) = self.link.check();
        let answers = match (&self.link.client, down) {
            (Some(client), false) => match self.call(client.clone(), &fwd).await {
                Ok(a) => {
                    self.link.succeeded();
                    Some(a)
                }
                Err(Miss::Link(why)) => {
                    tracing::warn!("forward to the cloud failed, {n} samples answered degraded: {why}");
                    self.link.failed(generation);
                    None
                }
                Err(Miss::Refused(why)) => {
                    tracing::error!("the cloud refused {n} forwarded samples, answered degraded: {why}");
                    None
                }
            },
            _ => None,
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

    async fn call(
        &self,
        mut client: GrpcInferenceServiceClient<Channel>,
        fwd: &Forward,
    ) -> Result<Vec<(i64, i32, f32, f32)>, Miss> {
        let (input, raw) = codec::encode_tensor("cut", &fwd.cut, self.link.dtype);
        let bytes = raw.len();
        self.stats.wire_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        metrics::counter!(telemetry::WIRE_BYTES, "side" => "edge", "dtype" => self.link.dtype.label())
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
        request.set_timeout(self.link.timeout);
        tracing::debug!(trace_id, samples = fwd.rows.len(), bytes, cut = self.k, "forwarding to the cloud");
        let sent = Instant::now();
        let resp = match tokio::time::timeout(self.link.timeout, client.model_infer(request)).await {
            Err(_) => return Err(Miss::Link(format!("no answer within {:?}", self.link.timeout))),
            Ok(Err(status)) => {
                let why = format!("{:?}: {}", status.code(), status.message());
                return Err(match status.code() {
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
