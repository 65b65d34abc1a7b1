//! The forward step: the survivors of a batch (samples no edge exit answered) go to the cloud as
//! one ModelInfer carrying their cut tensor; each gets the cloud's answer, or the deepest local
//! exit's answer flagged degraded when the cloud cannot answer in time.
//!
//! Only these samples wait for the cloud: the batcher has already answered the rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// Counters of what the edge did.
#[derive(Debug, Default)]
pub struct Stats {
    pub edge: AtomicU64,
    pub cloud: AtomicU64,
    pub degraded: AtomicU64,
    pub wire_bytes: AtomicU64,
}

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Capped exponential backoff with full jitter, so that many edges do not retry in step after a
/// cloud restart.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    /// How long to wait now; the next wait doubles (up to the cap).
    pub(crate) fn wait(&mut self) -> Duration {
        let jitter =
            (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
                % 1000) as f64
                / 1000.0;
        let wait = self.next.mul_f64(0.5 + 0.5 * jitter);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// The link to the cloud, with backoff after failures.
pub(crate) struct CloudLink {
    pub(crate) client: Option<GrpcInferenceServiceClient<Channel>>,
    pub(crate) timeout: Duration,
    pub(crate) dtype: WireDtype,
    state: Mutex<LinkState>,
}

struct LinkState {
    /// While set and in the future, the cloud is considered down: answer degraded at once.
    down_until: Option<Instant>,
    backoff: Backoff,
    /// Changes whenever the link is marked down or up again. A forward remembers it when sent:
    /// its failure counts only if nothing changed meanwhile, so the several forwards in flight
    /// when a link dies (the pipeline keeps two or three) double the backoff once, not each.
    generation: u64,
}

impl CloudLink {
    pub(crate) fn new(
        client: Option<GrpcInferenceServiceClient<Channel>>,
        timeout: Duration,
        dtype: WireDtype,
    ) -> Self {
        let state = LinkState { down_until: None, backoff: Backoff::new(), generation: 0 };
        CloudLink { client, timeout, dtype, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().expect("no code panics while holding the link state")
    }

    /// Whether to answer degraded without trying, and the generation a forward sent now carries.
    fn check(&self) -> (bool, u64) {
        let s = self.state();
        (matches!(s.down_until, Some(t) if Instant::now() < t), s.generation)
    }

    /// A forward sent at `generation` failed.
    fn failed(&self, generation: u64) {
        let mut s = self.state();
        if s.generation != generation {
            return; // this outage is already being waited out
        }
        let wait = s.backoff.wait();
        s.down_until = Some(Instant::now() + wait);
        s.generation += 1;
    }

    fn succeeded(&self) {
        let mut s = self.state();
        if s.down_until.is_some() {
            s.down_until = None;
            s.backoff.reset();
            s.generation += 1;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwards_in_flight_when_a_link_dies_count_as_one_failure() {
        let link = CloudLink::new(None, Duration::from_secs(1), WireDtype::Fp32);
        let (down, g) = link.check();
        assert!(!down);
        // Three pipelined forwards, all sent before the link died, fail one after another.
        for _ in 0..3 {
            link.failed(g);
        }
        let s = link.state();
        let wait = s.down_until.unwrap() - Instant::now();
        assert!(wait <= BACKOFF_MIN, "one doubling at most: the wait is {wait:?}");
        assert_eq!(s.generation, g + 1);
        drop(s);
        // A probe after the wait fails too: that is a second failure, and the wait doubles.
        let (_, g2) = link.check();
        link.failed(g2);
        assert!(link.state().down_until.unwrap() - Instant::now() <= BACKOFF_MIN * 2);
        link.succeeded();
        assert!(!link.check().0, "one success ends the outage");
    }
}
