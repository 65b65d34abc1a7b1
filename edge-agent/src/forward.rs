//! The forward step: the survivors of a batch (samples no edge exit answered) go to the cloud as
//! one ModelInfer carrying their cut tensor; each gets the cloud's answer, or the deepest local
//! exit's answer flagged degraded when the cloud cannot answer in time.
//!
//! Only these samples wait for the cloud: the batcher has already answered the rest.
//!
//! With several cloud replicas, a forward goes to the one `replicas` picks; one that fails on the
//! link (or turns out to serve another model) is retried once on another replica before its
//! samples are answered degraded.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::ModelInferRequest;
use classynet_runtime::exit::Answer;
use classynet_runtime::runner::{Forward, SampleResult};
use classynet_runtime::split::SplitPlanner;
use classynet_serving::batcher::{Forwarder, Origin};
use classynet_serving::codec::{self, string_param, WireDtype, PARAM_CUT, PARAM_FINGERPRINT, PARAM_POLICY_VERSION};
use classynet_serving::telemetry;
use classynet_serving::wire::{self, Metered, SentBytes, WireCompression};
use tonic::codec::CompressionEncoding;

use tonic::transport::Channel;
use tonic::Code;

use crate::replicas::CloudPool;

/// Counters of what the edge did.
#[derive(Debug, Default)]
pub struct Stats {
    pub edge: AtomicU64,
    pub cloud: AtomicU64,
    pub degraded: AtomicU64,
    /// Bytes of the forwarded cut tensors, before compression.
    pub wire_bytes: AtomicU64,
    /// Bytes the forwards put on the wire: the messages after gRPC compression and framing.
    pub wire_sent_bytes: AtomicU64,
    /// Forwards by cut (exit count): batches and samples.
    pub by_cut: Mutex<BTreeMap<usize, (u64, u64)>>,
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
    /// Codes per range of an INT8 wire.
    pub(crate) int8_levels: u16,
    pub(crate) compression: WireCompression,
    /// Set when a cloud refused our compression: what it accepts instead (`None`: nothing).
    pub(crate) compression_fallback: Mutex<Option<Option<CompressionEncoding>>>,
    pub(crate) stats: Arc<Stats>,
    /// `--partition auto`: told what each forward cost, to choose the next cuts.
    pub(crate) split: Option<Arc<SplitPlanner>>,
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

/// A call that did not give answers: a miss, or a refusal of our compression (retried with what
/// the cloud accepts).
enum Refusal {
    Miss(Miss),
    Compression(Vec<CompressionEncoding>),
}

impl From<Miss> for Refusal {
    fn from(m: Miss) -> Refusal {
        Refusal::Miss(m)
    }
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
        let cut = format!("E{}", fwd.after_exit);
        metrics::gauge!(telemetry::SPLIT_CUT, "side" => "edge").set(fwd.after_exit as f64);
        metrics::counter!(telemetry::SPLIT_DECISIONS, "side" => "edge", "cut" => cut, "reason" => fwd.reason.label())
            .increment(1);
        {
            let mut by_cut = self.stats.by_cut.lock().expect("no code panics while holding the cut counts");
            let e = by_cut.entry(fwd.after_exit).or_default();
            e.0 += 1;
            e.1 += n as u64;
        }
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
            let result = self.call(replica.client(), replica.addr.ip(), fwd).await;
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

    /// The encoding of a forward to a cloud at `ip`: the flag's, unless a cloud refused it.
    fn encoding(&self, ip: IpAddr) -> Option<CompressionEncoding> {
        let fallback = *self.compression_fallback.lock().expect("no code panics while holding the fallback");
        fallback.unwrap_or_else(|| self.compression.encoding_for(ip))
    }

    async fn call(
        &self,
        client: GrpcInferenceServiceClient<Metered<Channel>>,
        ip: IpAddr,
        fwd: &Forward,
    ) -> Result<Vec<(i64, i32, f32, f32)>, Miss> {
        let (input, raw) = codec::encode_tensor_with("cut", &fwd.cut, self.dtype, self.int8_levels);
        let bytes = raw.len();
        self.stats.wire_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        metrics::counter!(telemetry::WIRE_BYTES, "side" => "edge", "dtype" => self.dtype.label())
            .increment(bytes as u64);
        let req = ModelInferRequest {
            parameters: [
                (PARAM_CUT.to_string(), string_param(format!("E{}", fwd.after_exit))),
                (PARAM_FINGERPRINT.to_string(), string_param(self.fingerprint.clone())),
                (PARAM_POLICY_VERSION.to_string(), codec::int_param(self.policy_version.load(Ordering::SeqCst) as i64)),
            ]
            .into(),
            inputs: vec![input],
            raw_input_contents: vec![raw],
            ..Default::default()
        };
        // A cloud that refuses our compression (an older or foreign server) says what it
        // accepts: the same forward goes again with that, once, and later forwards keep it.
        let mut encoding = self.encoding(ip);
        for _ in 0..2 {
            match self.call_once(client.clone(), req.clone(), encoding, fwd, bytes).await {
                Err(Refusal::Compression(accepted)) => {
                    let instead = [CompressionEncoding::Zstd, CompressionEncoding::Gzip]
                        .into_iter()
                        .find(|e| accepted.contains(e) && Some(*e) != encoding);
                    tracing::warn!(
                        "the cloud refused {}-compressed forwards; sending {} from now on",
                        wire::encoding_label(encoding),
                        wire::encoding_label(instead)
                    );
                    *self.compression_fallback.lock().expect("no code panics while holding the fallback") =
                        Some(instead);
                    encoding = instead;
                }
                Err(Refusal::Miss(m)) => return Err(m),
                Ok(a) => return Ok(a),
            }
        }
        Err(Miss::Link("the cloud refused every compression offered".into()))
    }

    async fn call_once(
        &self,
        client: GrpcInferenceServiceClient<Metered<Channel>>,
        req: ModelInferRequest,
        encoding: Option<CompressionEncoding>,
        fwd: &Forward,
        bytes: usize,
    ) -> Result<Vec<(i64, i32, f32, f32)>, Refusal> {
        let rows = fwd.rows.len();
        let mut client = match encoding {
            Some(e) => client.send_compressed(e),
            None => client,
        };
        let sent_bytes = SentBytes::default();
        // W3C trace context: the cloud logs its work on this batch under the same trace.
        let traceparent = telemetry::new_traceparent();
        let trace_id = telemetry::trace_id(&traceparent).unwrap_or("").to_string();
        let mut request = tonic::Request::new(req);
        request.extensions_mut().insert(sent_bytes.clone());
        if let Ok(v) = traceparent.parse() {
            request.metadata_mut().insert("traceparent", v);
        }
        // The cloud sees our deadline (grpc-timeout) and does not compute what we gave up on.
        request.set_timeout(self.timeout);
        tracing::debug!(trace_id, samples = rows, bytes, cut = fwd.after_exit, "forwarding to the cloud");
        let sent = Instant::now();
        let result = tokio::time::timeout(self.timeout, client.model_infer(request)).await;
        // Counted whatever the outcome: the bytes went out.
        let on_wire = sent_bytes.get();
        self.stats.wire_sent_bytes.fetch_add(on_wire, Ordering::Relaxed);
        metrics::counter!(telemetry::WIRE_SENT_BYTES, "side" => "edge", "compression" => wire::encoding_label(encoding))
            .increment(on_wire);
        let resp = match result {
            Err(_) => return Err(Miss::Link(format!("no answer within {:?}", self.timeout)).into()),
            Ok(Err(status)) => {
                if let Some(accepted) = wire::refused_encoding(&status).filter(|_| encoding.is_some()) {
                    return Err(Refusal::Compression(accepted));
                }
                let why = format!("{:?}: {}", status.code(), status.message());
                return Err(match status.code() {
                    // The cloud's model check (see cloud-server's infer): another model's tail.
                    Code::FailedPrecondition if status.message().contains("fingerprint") => Miss::OtherModel(why),
                    Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::OutOfRange => {
                        Miss::Refused(why)
                    }
                    _ => Miss::Link(why),
                }
                .into());
            }
            Ok(Ok(resp)) => resp,
        };
        let a = codec::read_answers(resp.get_ref()).map_err(|e| Miss::Link(format!("unreadable answer: {e}")))?;
        if a.len() != rows {
            return Err(Miss::Link(format!("the cloud answered {} samples for {rows} sent", a.len())).into());
        }
        let rtt = sent.elapsed().as_secs_f64();
        let server = codec::param_int(&resp.get_ref().parameters, codec::PARAM_SERVER_MICROS)
            .map(|us| us as f64 / 1e6)
            .unwrap_or(0.0)
            .min(rtt);
        metrics::histogram!(telemetry::STAGE_SECONDS, "side" => "edge", "stage" => "cloud").record(server);
        metrics::histogram!(telemetry::STAGE_SECONDS, "side" => "edge", "stage" => "network").record(rtt - server);
        tracing::debug!(trace_id, rtt, server, sent = on_wire, "answered by the cloud");
        if let Some(split) = &self.split {
            let exits: Vec<usize> = a.iter().filter(|r| r.1 >= 0).map(|r| r.1 as usize).collect();
            split.record_forward(fwd.after_exit, rows, on_wire, rtt, server, &exits);
        }
        Ok(a)
    }
}
