//! The edge side of the split: runs the head partition `Ek` of a ClassyNet model with its early
//! exits, answers what exits at once, and forwards the survivors of each batch to cloud-server
//! as one Open Inference Protocol ModelInfer carrying the cut tensor.
//!
//! * Local clients use the same v2 API (`inference.GRPCInferenceService`) on a loopback address.
//! * Requests are batched dynamically (16 samples by default, as in the paper). The next batch's
//!   head runs while the previous batch's round trip to the cloud is in flight.
//! * The exit policy comes from the cloud's `WatchPolicy` stream and is applied between batches.
//! * When the cloud cannot be reached (an error, or no answer within `--cloud-timeout-ms`), the
//!   samples that needed it get the deepest local exit's answer, flagged degraded, and the link
//!   is retried with capped exponential backoff and jitter. Every request gets one answer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use classynet_proto::control::control_client::ControlClient;
use classynet_proto::control::{GetPartitionRequest, WatchPolicyRequest};
use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use classynet_proto::inference::*;
use classynet_runtime::backend::Tensor;
use classynet_runtime::exit::{Answer, Policy, PolicyFile};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::{parse_partition, Model};
use classynet_runtime::ort_backend::{init_ort, OrtBackend, Provider, SessionOptions};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::planner::{choose, parse_size, plan, Formula};
use classynet_runtime::report::RunReport;
use classynet_runtime::runner::{BatchOutcome, SampleResult, SegmentedRunner};
use classynet_runtime::worker::Worker;
use classynet_serving::batcher::{BatchConfig, Batcher, Finisher, Origin, Served};
use classynet_serving::codec::{
    self, string_param, Payload, WireDtype, PARAM_CUT, PARAM_FINGERPRINT, PARAM_POLICY_VERSION,
};
use classynet_serving::security::{self, BearerAuth, TlsFiles};
use classynet_serving::telemetry::{self, LogFormat};
use classynet_serving::{systemd, ServeError, ServeResult};
use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Edge side of the ClassyNet split runtime.
#[derive(Debug, Clone, Parser)]
#[command(name = "edge-agent", version)]
pub struct Config {
    /// cloud-server address, host:port (http:// is added when missing).
    #[arg(long, env = "EDGE_AGENT_SERVER")]
    pub server: Option<String>,
    /// Exits kept on this device: E2 runs exits E1 and E2 here and forwards the rest.
    #[arg(long, env = "EDGE_AGENT_PARTITION", conflicts_with = "memory_budget")]
    pub partition: Option<String>,
    /// Pick the deepest partition whose weights + activations fit, e.g. 5.54MB (needs --model).
    #[arg(long, env = "EDGE_AGENT_MEMORY_BUDGET", value_name = "SIZE")]
    pub memory_budget: Option<String>,
    /// The full model or a head partition file; without it the head is downloaded from the
    /// cloud (GetPartition).
    #[arg(long, env = "EDGE_AGENT_MODEL", value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Address of the local v2 API (keep it on loopback unless clients are elsewhere).
    #[arg(long, env = "EDGE_AGENT_LISTEN", default_value = "127.0.0.1:8001")]
    pub listen: String,
    /// Most samples the head runs together (the paper's edge batch is 16).
    #[arg(long, env = "EDGE_AGENT_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// Longest a sample waits for others to fill its batch, in milliseconds.
    #[arg(long, env = "EDGE_AGENT_MAX_DELAY_MS", default_value_t = 2)]
    pub max_delay_ms: u64,
    /// Most samples admitted and not yet answered; more are refused.
    #[arg(long, env = "EDGE_AGENT_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,
    /// How cut tensors travel: fp32 (exact), fp16 (half the bytes) or int8 (a quarter, per-tensor
    /// scale and zero point).
    #[arg(long, env = "EDGE_AGENT_WIRE_DTYPE", value_enum, default_value_t = Wire::Fp32)]
    pub wire_dtype: Wire,
    /// After this many milliseconds without the cloud's answer, answer locally (degraded).
    #[arg(long, env = "EDGE_AGENT_CLOUD_TIMEOUT_MS", default_value_t = 2000)]
    pub cloud_timeout_ms: u64,
    /// ONNX Runtime intra-op threads (0: one per core).
    #[arg(long, env = "EDGE_AGENT_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, the project's .venv, the system).
    #[arg(long, env = "EDGE_AGENT_ORT_LIB")]
    pub ort_lib: Option<PathBuf>,
    /// PEM certificate of this edge: its client identity towards the cloud (mutual TLS) and the
    /// certificate of its own local listener.
    #[arg(long, env = "EDGE_AGENT_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "EDGE_AGENT_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA that signed the cloud's certificate; turns on TLS towards the cloud.
    #[arg(long, env = "EDGE_AGENT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Name checked in the cloud's certificate (default: the host of --server).
    #[arg(long, env = "EDGE_AGENT_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Allow a non-loopback --listen without TLS (refused otherwise).
    #[arg(long, env = "EDGE_AGENT_INSECURE")]
    pub insecure: bool,
    /// Bearer token every call to the local v2 API must carry (`authorization: Bearer TOKEN`).
    #[arg(long, env = "EDGE_AGENT_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Address of the Prometheus endpoint (GET /metrics), e.g. 127.0.0.1:9102; off when not given.
    #[arg(long, env = "EDGE_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Log format on stderr: text, or json (one object per line, for log shippers).
    #[arg(long, env = "EDGE_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// On SIGTERM or SIGINT: seconds accepted requests get to be answered (by the cloud, or
    /// degraded) before the agent exits anyway.
    #[arg(long, env = "EDGE_AGENT_SHUTDOWN_TIMEOUT_S", default_value_t = 10)]
    pub shutdown_timeout_s: u64,
    /// ONNX Runtime execution provider: cpu, cuda or tensorrt. A provider the loaded library
    /// lacks (the PyPI wheel is CPU-only) falls back to the CPU with a warning; see docs/jetson.md.
    #[arg(long, env = "EDGE_AGENT_EXECUTION_PROVIDER", value_enum, default_value_t = Provider::Cpu)]
    pub execution_provider: Provider,
    #[command(subcommand)]
    pub command: Option<Verb>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Wire {
    Fp32,
    Fp16,
    Int8,
}

impl From<Wire> for WireDtype {
    fn from(w: Wire) -> WireDtype {
        match w {
            Wire::Fp32 => WireDtype::Fp32,
            Wire::Fp16 => WireDtype::Fp16,
            Wire::Int8 => WireDtype::Int8,
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Verb {
    /// Run a labelled dataset through the edge (and the cloud) and report like `classynet run`,
    /// plus where samples were answered, latency and bytes on the wire.
    Classify {
        /// fashion-mnist:test|train, cifar10:..., npz:FILE, idx:IMAGES,LABELS.
        #[arg(long, default_value = "fashion-mnist:test")]
        dataset: String,
        #[arg(long, env = "CLASSYNET_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        limit: Option<usize>,
        /// Requests in flight at once (each request is one sample, as from a camera).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn init_logging(format: LogFormat) {
    telemetry::init_logging(format);
}

/// Counters of what the edge did.
#[derive(Debug, Default)]
pub struct Stats {
    pub edge: AtomicU64,
    pub cloud: AtomicU64,
    pub degraded: AtomicU64,
    pub wire_bytes: AtomicU64,
}

/// The link to the cloud, with backoff after failures.
struct CloudLink {
    client: Option<GrpcInferenceServiceClient<Channel>>,
    timeout: Duration,
    dtype: WireDtype,
    /// While set and in the future, the cloud is considered down: answer degraded at once.
    down_until: Mutex<Option<Instant>>,
    backoff: Mutex<Duration>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl CloudLink {
    fn dtype_label(&self) -> &'static str {
        match self.dtype {
            WireDtype::Fp32 => "fp32",
            WireDtype::Fp16 => "fp16",
            WireDtype::Int8 => "int8",
        }
    }

    fn is_down(&self) -> bool {
        matches!(*self.down_until.lock().expect("no code panics while holding the link state lock"), Some(t) if Instant::now() < t)
    }

    fn failed(&self) {
        let mut b = self.backoff.lock().expect("no code panics while holding the link state lock");
        // Full jitter keeps many edges from retrying in step after a cloud restart.
        let jitter =
            (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
                % 1000) as f64
                / 1000.0;
        let wait = b.mul_f64(0.5 + 0.5 * jitter);
        *self.down_until.lock().expect("no code panics while holding the link state lock") =
            Some(Instant::now() + wait);
        *b = (*b * 2).min(BACKOFF_MAX);
    }

    fn succeeded(&self) {
        *self.backoff.lock().expect("no code panics while holding the link state lock") = BACKOFF_MIN;
        *self.down_until.lock().expect("no code panics while holding the link state lock") = None;
    }
}

/// A loaded edge: head model, runner thread, batcher and cloud link.
pub struct Edge {
    pub head: Model,
    /// Exits on this device.
    pub k: usize,
    worker: Arc<Worker>,
    batcher: Batcher,
    pub stats: Arc<Stats>,
    policy_version: Arc<AtomicU64>,
    /// Set once the first update of the cloud's policy stream has been dealt with, so that a run
    /// can start under the cloud's policy instead of switching to it part-way.
    policy_seen: tokio::sync::watch::Sender<bool>,
    server: Option<String>,
    cloud: Option<Endpoint>,
}

/// The cloud's endpoint: https with the TLS settings when a CA is given, http otherwise.
fn cloud_endpoint(config: &Config) -> anyhow::Result<Option<Endpoint>> {
    let Some(addr) = &config.server else { return Ok(None) };
    let tls = TlsFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone(), ca: config.tls_ca.clone() };
    // The edge's own certificate alone does not turn on TLS to the cloud: that needs the CA.
    let client_tls = if config.tls_ca.is_some() { tls.client(config.tls_server_name.as_deref())? } else { None };
    let scheme = if client_tls.is_some() { "https" } else { "http" };
    let uri = match addr.split_once("://") {
        Some((_, rest)) => format!("{scheme}://{rest}"),
        None => format!("{scheme}://{addr}"),
    };
    let mut ep = Endpoint::from_shared(uri.clone()).map_err(|e| anyhow::anyhow!("--server {addr}: {e}"))?;
    if let Some(t) = client_tls {
        ep = ep.tls_config(t).map_err(|e| anyhow::anyhow!("TLS settings for {uri}: {e}"))?;
    }
    Ok(Some(ep.connect_timeout(Duration::from_millis(config.cloud_timeout_ms))))
}

/// Finds the head this edge runs: from a local file (full model or head partition), or from the
/// cloud.
async fn load_head(config: &Config) -> anyhow::Result<(Model, usize)> {
    let wanted = |m: usize| -> anyhow::Result<Option<usize>> {
        Ok(match &config.partition {
            Some(p) => Some(parse_partition(p, m)?),
            None => None,
        })
    };
    if let Some(path) = &config.model {
        let model = Model::load(path)?;
        let m = model.num_exits();
        if model.meta.partition.is_some() {
            anyhow::ensure!(model.starts_at_input(), "{} is a tail partition; the edge runs a head", path.display());
            let k = model.present.end;
            if let Some(w) = wanted(m)? {
                anyhow::ensure!(w == k, "{} holds partition E{k}, but --partition asks for E{w}", path.display());
            }
            return Ok((model, k));
        }
        let segs = segments(&model)?;
        let k = match (wanted(m)?, &config.memory_budget) {
            (Some(k), _) => k,
            (None, Some(b)) => {
                let costs = plan(&model, &segs, config.max_batch);
                let (i, why) = choose(&costs, parse_size(b)?, Formula::Runtime)?;
                tracing::info!("{why}");
                i + 1
            }
            (None, None) => anyhow::bail!("give --partition Ek or --memory-budget SIZE"),
        };
        let head = extract_side(&model, &segs, &Side::parse(&format!("E{k}"), PartitionRole::Head, m)?)?;
        return Ok((Model::from_bytes(&head.encode_to_vec(), &format!("{} head E{k}", path.display()))?, k));
    }
    let server = config.server.as_deref().ok_or_else(|| anyhow::anyhow!("give --model FILE or --server ADDR"))?;
    let ep = cloud_endpoint(config)?.expect("--server is set");
    let partition = config.partition.clone().ok_or_else(|| {
        anyhow::anyhow!("downloading the head from the cloud needs --partition Ek (--memory-budget needs --model)")
    })?;
    let channel = ep.connect().await.map_err(|e| anyhow::anyhow!("cannot reach the cloud at {server}: {e:?}"))?;
    let mut client = ControlClient::new(channel);
    let mut stream = client.get_partition(GetPartitionRequest { partition: partition.clone() }).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk?.data);
    }
    let model = Model::from_bytes(&bytes, &format!("{server} partition {partition}"))?;
    let k = model.present.end;
    tracing::info!(partition, bytes = bytes.len(), "head partition downloaded from the cloud");
    Ok((model, k))
}

impl Edge {
    /// Loads the head, starts its runner thread and the link to the cloud.
    pub async fn load(config: &Config) -> anyhow::Result<Arc<Edge>> {
        let cfg = config.clone();
        tokio::task::spawn_blocking(move || init_ort(cfg.ort_lib.as_deref(), cfg.threads)).await??;
        let (head, k) = load_head(config).await?;
        let m = head.num_exits();
        anyhow::ensure!(
            k == m || config.server.is_some(),
            "partition E{k} leaves exits E{}..E{m} to the cloud: give --server ADDR",
            k + 1
        );
        let policy = Policy::defaults(&head.meta);
        let sample = head.meta.input.shape.clone();
        let (h, p) = (head.clone(), policy.clone());
        let opts = SessionOptions { provider: config.execution_provider, ..SessionOptions::default() };
        let worker = tokio::task::spawn_blocking(move || {
            Worker::spawn("edge-head", 2, move || SegmentedRunner::new(OrtBackend::new(&h, opts)?, 0, &p, Some(sample)))
        })
        .await??;
        let n: usize = head.meta.input.shape.iter().product();
        let mut dims = vec![1];
        dims.extend(&head.meta.input.shape);
        worker.run(Tensor { shape: dims, data: vec![0.0; n] }).await?; // warm-up
        let worker = Arc::new(worker);
        let cloud = cloud_endpoint(config)?;
        let client = match &cloud {
            Some(ep) if k < m => {
                Some(GrpcInferenceServiceClient::new(ep.connect_lazy()).max_decoding_message_size(usize::MAX))
            }
            _ => None,
        };
        let link = Arc::new(CloudLink {
            client,
            timeout: Duration::from_millis(config.cloud_timeout_ms),
            dtype: config.wire_dtype.into(),
            down_until: Mutex::new(None),
            backoff: Mutex::new(BACKOFF_MIN),
        });
        let stats = Arc::new(Stats::default());
        let policy_version = Arc::new(AtomicU64::new(0));
        let names = Arc::new(Names {
            exits: head.meta.exits.iter().map(|e| e.name.clone()).collect(),
            classes: head.meta.classes.clone(),
        });
        let finisher = forwarder(link, stats.clone(), k, head.fingerprint.clone(), policy_version.clone(), names);
        let batcher = Batcher::spawn_with(
            worker.clone(),
            BatchConfig {
                max_batch: config.max_batch.max(1),
                max_delay: Duration::from_millis(config.max_delay_ms),
                max_queue: config.max_queue.max(config.max_batch),
                side: "edge",
            },
            finisher,
        );
        let edge = Arc::new(Edge {
            head,
            k,
            worker,
            batcher,
            stats,
            policy_version,
            policy_seen: tokio::sync::watch::Sender::new(false),
            server: config.server.clone(),
            cloud,
        });
        // Also with every exit on the edge: the cloud still owns the class sets and thresholds.
        if edge.server.is_some() {
            // The task holds a weak reference: dropping the last Edge ends it.
            tokio::spawn(watch_policy(Arc::downgrade(&edge)));
        }
        Ok(edge)
    }

    /// Waits until the cloud's policy has been received (true), or `timeout` passed or there is
    /// no cloud (false).
    pub async fn wait_for_policy(&self, timeout: Duration) -> bool {
        if self.server.is_none() {
            return false;
        }
        let mut rx = self.policy_seen.subscribe();
        let seen = tokio::time::timeout(timeout, rx.wait_for(|seen| *seen)).await.is_ok_and(|r| r.is_ok());
        seen
    }

    /// Version of the exit policy in force on this edge.
    pub fn policy_version(&self) -> u64 {
        self.policy_version.load(Ordering::SeqCst)
    }

    /// Classifies a normalised image batch; answers in order, with where each came from.
    /// Requests larger than the edge batch are split into batch-sized pieces that run
    /// concurrently, so a client need not know the device's batch size.
    pub async fn infer(&self, input: Tensor) -> ServeResult<Served> {
        let max = self.batcher.max_batch();
        let n = input.batch();
        if n <= max {
            return self.batcher.infer(input).await;
        }
        let pieces: Vec<_> = (0..n)
            .step_by(max)
            .map(|f| {
                let rows: Vec<usize> = (f..(f + max).min(n)).collect();
                let b = self.batcher.clone();
                let part = input.gather(&rows);
                async move { b.infer(part).await }
            })
            .collect();
        let mut results = Vec::with_capacity(n);
        let mut origin = Vec::with_capacity(n);
        for piece in futures_join(pieces).await {
            let s = piece?;
            results.extend(s.outcome.results);
            origin.extend(s.origin);
        }
        Ok(Served { outcome: BatchOutcome { results, forward: None }, origin })
    }

    async fn apply_policy(&self, json: &str) -> Result<u64, String> {
        let file = PolicyFile::from_json(json).map_err(|e| e.to_string())?;
        let policy = Policy::resolve(&self.head.meta, &file).map_err(|e| e.to_string())?;
        self.worker.set_policy(policy).await.map_err(|e| e.to_string())?;
        self.policy_version.store(file.version, Ordering::SeqCst);
        Ok(file.version)
    }
}

/// Keeps a WatchPolicy stream open, applying every update; reconnects with backoff.
async fn watch_policy(weak: std::sync::Weak<Edge>) {
    let Some((server, ep)) = weak.upgrade().and_then(|e| e.server.clone().zip(e.cloud.clone())) else { return };
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(edge) = weak.upgrade() else { return };
        let fingerprint = edge.head.fingerprint.clone();
        drop(edge);
        let attempt = async {
            let mut client = ControlClient::new(ep.connect().await.map_err(|e| format!("{e:?}"))?);
            let mut stream = client
                .watch_policy(WatchPolicyRequest { fingerprint })
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            while let Some(update) = stream.next().await {
                let update = update.map_err(|e| e.message().to_string())?;
                let Some(edge) = weak.upgrade() else { return Ok(()) };
                match edge.apply_policy(&update.policy_json).await {
                    Ok(v) => {
                        metrics::gauge!(telemetry::POLICY_VERSION, "side" => "edge").set(v as f64);
                        tracing::info!(version = v, "exit policy from the cloud in force")
                    }
                    Err(e) => {
                        metrics::counter!(telemetry::POLICY_REJECTIONS, "side" => "edge").increment(1);
                        tracing::error!(version = update.version, "policy refused, the previous one stays: {e}")
                    }
                }
                edge.policy_seen.send_replace(true);
            }
            Ok::<(), String>(())
        };
        match attempt.await {
            Ok(()) if weak.strong_count() == 0 => return,
            Ok(()) => backoff = BACKOFF_MIN,
            Err(e) => {
                tracing::warn!("policy stream from {server}: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The batch-level finisher: one ModelInfer for all survivors of a batch.
fn forwarder(
    link: Arc<CloudLink>,
    stats: Arc<Stats>,
    k: usize,
    fingerprint: String,
    version: Arc<AtomicU64>,
    names: Arc<Names>,
) -> Finisher {
    Arc::new(move |outcome: BatchOutcome| {
        let (link, stats, fingerprint, version) = (link.clone(), stats.clone(), fingerprint.clone(), version.clone());
        let names = names.clone();
        Box::pin(async move {
            let served = finish_batch(outcome, &link, &stats, k, &fingerprint, &version).await;
            if let Ok(s) = &served {
                names.count(s);
            }
            served
        })
    })
}

/// Exit and class names, for metric labels.
struct Names {
    exits: Vec<String>,
    classes: Vec<String>,
}

impl Names {
    fn count(&self, served: &Served) {
        for (r, o) in served.outcome.results.iter().zip(&served.origin) {
            if let SampleResult::Answered(a) = r {
                let place = match o {
                    Origin::Local => "edge",
                    Origin::Remote => "cloud",
                    Origin::Degraded => "degraded",
                };
                let exit = self.exits.get(a.exit).cloned().unwrap_or_else(|| format!("E{}", a.exit + 1));
                let class = self.classes.get(a.class as usize).cloned().unwrap_or_else(|| a.class.to_string());
                metrics::counter!(telemetry::ANSWERED, "side" => "edge", "where" => place, "exit" => exit, "class" => class)
                    .increment(1);
            }
        }
    }
}

/// Answers what the head decided, forwards the survivors in one ModelInfer, and falls back to
/// the deepest local exit (degraded) when the cloud does not answer.
async fn finish_batch(
    mut outcome: BatchOutcome,
    link: &CloudLink,
    stats: &Stats,
    k: usize,
    fingerprint: &str,
    version: &AtomicU64,
) -> ServeResult<Served> {
    {
        {
            let mut origin = vec![Origin::Local; outcome.results.len()];
            let Some(fwd) = outcome.forward.take() else {
                stats.edge.fetch_add(origin.len() as u64, Ordering::Relaxed);
                return Ok(Served { outcome, origin });
            };
            let local = origin.len() - fwd.rows.len();
            stats.edge.fetch_add(local as u64, Ordering::Relaxed);
            let answers = match (&link.client, link.is_down()) {
                (Some(client), false) => {
                    let (input, raw) = codec::encode_tensor("cut", &fwd.cut, link.dtype);
                    stats.wire_bytes.fetch_add(raw.len() as u64, Ordering::Relaxed);
                    metrics::counter!(telemetry::WIRE_BYTES, "side" => "edge", "dtype" => link.dtype_label())
                        .increment(raw.len() as u64);
                    let bytes = raw.len();
                    let req = ModelInferRequest {
                        parameters: [
                            (PARAM_CUT.to_string(), string_param(format!("E{k}"))),
                            (PARAM_FINGERPRINT.to_string(), string_param(fingerprint.to_string())),
                            (PARAM_POLICY_VERSION.to_string(), codec::int_param(version.load(Ordering::SeqCst) as i64)),
                        ]
                        .into(),
                        inputs: vec![input],
                        raw_input_contents: vec![raw],
                        ..Default::default()
                    };
                    let mut client = client.clone();
                    // W3C trace context: the cloud logs its work on this batch under the same trace.
                    let traceparent = telemetry::new_traceparent();
                    let trace_id = telemetry::trace_id(&traceparent).unwrap_or("").to_string();
                    let mut request = tonic::Request::new(req);
                    if let Ok(v) = traceparent.parse() {
                        request.metadata_mut().insert("traceparent", v);
                    }
                    tracing::debug!(trace_id, samples = fwd.rows.len(), bytes, cut = k, "forwarding to the cloud");
                    let sent = Instant::now();
                    match tokio::time::timeout(link.timeout, client.model_infer(request)).await {
                        Ok(Ok(resp)) => match codec::read_answers(resp.get_ref()) {
                            Ok(a) if a.len() == fwd.rows.len() => {
                                link.succeeded();
                                let rtt = sent.elapsed().as_secs_f64();
                                let server = codec::param_int(&resp.get_ref().parameters, codec::PARAM_SERVER_MICROS)
                                    .map(|us| us as f64 / 1e6)
                                    .unwrap_or(0.0)
                                    .min(rtt);
                                metrics::histogram!(telemetry::STAGE_SECONDS, "side" => "edge", "stage" => "cloud")
                                    .record(server);
                                metrics::histogram!(telemetry::STAGE_SECONDS, "side" => "edge", "stage" => "network")
                                    .record(rtt - server);
                                tracing::debug!(trace_id, rtt, server, "answered by the cloud");
                                Some(a)
                            }
                            Ok(a) => {
                                tracing::error!("the cloud answered {} samples for {} sent", a.len(), fwd.rows.len());
                                None
                            }
                            Err(e) => {
                                tracing::error!("unreadable answer from the cloud: {e}");
                                None
                            }
                        },
                        Ok(Err(status)) => {
                            tracing::warn!(code = ?status.code(), "cloud refused the forward: {}", status.message());
                            link.failed();
                            None
                        }
                        Err(_) => {
                            tracing::warn!("no answer from the cloud within {:?}", link.timeout);
                            link.failed();
                            None
                        }
                    }
                }
                _ => None,
            };
            match answers {
                Some(a) => {
                    for (i, &row) in fwd.rows.iter().enumerate() {
                        let (label, exit, entropy, probability) = a[i];
                        outcome.results[row] = if label < 0 || exit < 0 {
                            SampleResult::Failed("the cloud could not answer this sample".into())
                        } else {
                            SampleResult::Answered(Answer {
                                class: label as u32,
                                exit: exit as usize,
                                entropy,
                                probability,
                            })
                        };
                        origin[row] = Origin::Remote;
                    }
                    stats.cloud.fetch_add(fwd.rows.len() as u64, Ordering::Relaxed);
                }
                None => {
                    for (i, &row) in fwd.rows.iter().enumerate() {
                        outcome.results[row] = match fwd.fallback[i] {
                            Some(ans) => SampleResult::Answered(ans),
                            None => SampleResult::Failed("non-finite logits and no cloud to go on to".into()),
                        };
                        origin[row] = Origin::Degraded;
                    }
                    stats.degraded.fetch_add(fwd.rows.len() as u64, Ordering::Relaxed);
                }
            }
            Ok(Served { outcome, origin })
        }
    }
}

/// Awaits all futures concurrently, keeping their order.
async fn futures_join<F: std::future::Future + Send + 'static>(futs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("inference pieces do not panic"));
    }
    out
}

/// Filled once the head is loaded and warm; until then calls are UNAVAILABLE.
type EdgeSlot = Arc<std::sync::OnceLock<Arc<Edge>>>;

struct LocalApi(EdgeSlot);

impl LocalApi {
    fn edge(&self) -> Result<&Arc<Edge>, Status> {
        self.0.get().ok_or_else(|| Status::unavailable("edge-agent is warming up: the head is still loading"))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for LocalApi {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }
    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }
    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        Ok(Response::new(ModelReadyResponse { ready: self.0.get().is_some_and(|e| r.get_ref().name == e.head.name()) }))
    }
    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(codec::server_metadata("classynet-edge-agent")))
    }
    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let head = &self.edge()?.head;
        Ok(Response::new(codec::model_metadata(head, head.name(), &r.get_ref().name)?))
    }
    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let e = self.edge()?;
        let req = r.into_inner();
        let run = async {
            if !req.model_name.is_empty() && req.model_name != e.head.name() {
                return Err(ServeError::NotFound(format!(
                    "model {:?} is not served here (this edge serves {:?})",
                    req.model_name,
                    e.head.name()
                )));
            }
            let [input] = req.inputs.as_slice() else {
                return Err(ServeError::InvalidArgument(format!(
                    "expected exactly one input tensor, found {}",
                    req.inputs.len()
                )));
            };
            let (mut t, payload) = codec::decode_input(input, req.raw_input_contents.first())?;
            if payload == Payload::Pixels {
                codec::normalise(&mut t, &e.head);
            }
            let served = e.infer(t).await?;
            let mut resp = codec::answers_response(e.head.name(), &req.id, &served.outcome.results, e.policy_version());
            let degraded: Vec<String> = served
                .origin
                .iter()
                .enumerate()
                .filter(|(_, o)| **o == Origin::Degraded)
                .map(|(i, _)| i.to_string())
                .collect();
            if !degraded.is_empty() {
                resp.parameters.insert("classynet_degraded".into(), string_param(degraded.join(",")));
            }
            Ok(resp)
        };
        let out = run.await;
        metrics::counter!(telemetry::REQUESTS, "side" => "edge", "outcome" => if out.is_ok() { "ok" } else { "error" })
            .increment(1);
        out.map(Response::new).map_err(Status::from)
    }
}

/// A running edge server.
pub struct Handle {
    pub addr: std::net::SocketAddr,
    pub edge: Arc<Edge>,
    health: tonic_health::server::HealthReporter,
    drain: Duration,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn set_health(health: &tonic_health::server::HealthReporter, status: tonic_health::ServingStatus) {
    for service in ["", "inference.GRPCInferenceService"] {
        health.set_service_status(service, status).await;
    }
}

impl Handle {
    /// Reports NOT_SERVING, stops accepting, and waits (at most `--shutdown-timeout-s`) until
    /// every accepted request is answered: by the cloud, or degraded when it is gone.
    pub async fn stop(mut self) {
        set_health(&self.health, tonic_health::ServingStatus::NotServing).await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(self.drain, &mut self.task).await.is_err() {
            tracing::warn!("requests still unanswered after {:?}; closing anyway", self.drain);
            self.task.abort();
        }
    }
}

/// Serves the local v2 API on `config.listen` at once (health NOT_SERVING), loads and warms
/// the head, then reports SERVING and returns.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    telemetry::recorder();
    let tls = TlsFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone(), ca: None };
    let server_tls = tls.server()?;
    let listen = &config.listen;
    let listener = TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    security::check_listener(&addr, server_tls.is_some(), config.insecure, "EDGE_AGENT")?;
    if let Some(m) = &config.metrics_listen {
        telemetry::serve_metrics(m).await?;
    }
    tracing::info!(%addr, "accepting connections; health is NOT_SERVING until the head is loaded and warm");
    let slot: EdgeSlot = Arc::default();
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, tonic_health::ServingStatus::NotServing).await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = server_tls {
        builder = builder.tls_config(t)?;
    }
    let api =
        GrpcInferenceServiceServer::with_interceptor(LocalApi(slot.clone()), BearerAuth::new(config.api_token.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(builder.add_service(health_service).add_service(api).serve_with_incoming_shutdown(
        // No Nagle: a batch's reply must not wait for a delayed ACK (40 ms on Linux).
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        async {
            let _ = rx.await;
        },
    ));
    let edge = match Edge::load(&config).await {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(());
            let _ = task.await;
            return Err(e);
        }
    };
    let _ = slot.set(edge.clone());
    set_health(&health, tonic_health::ServingStatus::Serving).await;
    tracing::info!(%addr, partition = edge.k, tls = tls.enabled(), "edge-agent ready");
    Ok(Handle { addr, edge, health, drain: Duration::from_secs(config.shutdown_timeout_s), shutdown: Some(tx), task })
}

/// Runs the agent: the classify verb, or the local server until SIGINT/SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    match config.command.clone() {
        Some(Verb::Classify { dataset, data_dir, limit, concurrency, json }) => {
            let edge = Edge::load(&config).await?;
            let out = classify(&edge, &dataset, data_dir, limit, concurrency).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out.json)?);
            } else {
                println!("{}", out.text);
            }
            Ok(())
        }
        None => {
            let handle = start(config).await?;
            println!("edge-agent listening on {}", handle.addr);
            systemd::ready(&format!("serving partition E{} on {}", handle.edge.k, handle.addr));
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down: NOT_SERVING, no new connections, answering accepted requests");
            systemd::stopping("answering accepted requests");
            handle.stop().await;
            tracing::info!("stopped");
            Ok(())
        }
    }
}

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
    use classynet_runtime::cli::{make_batch, open_dataset, DataArgs};
    let args = DataArgs { dataset: dataset.into(), data_dir, limit, batch: 1 };
    let ds = Arc::new(open_dataset(&args, &edge.head)?);
    let n = ds.len();
    if edge.server.is_some() && !edge.wait_for_policy(POLICY_WAIT).await {
        tracing::warn!("no exit policy from the cloud within {POLICY_WAIT:?}; starting with the model's defaults");
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let bytes_before = edge.stats.wire_bytes.load(Ordering::Relaxed);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (edge, ds) = (edge.clone(), ds.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let x = make_batch(&ds, &edge.head, i..i + 1);
            let t0 = Instant::now();
            let r = edge.infer(x).await;
            (r, t0.elapsed())
        }));
    }
    let mut report = RunReport::new(&edge.head, &ds.name, edge.batcher_max(), 0);
    let mut latencies = Vec::with_capacity(n);
    let (mut at_edge, mut at_cloud, mut degraded) = (0u64, 0u64, 0u64);
    let mut answers = Vec::with_capacity(n);
    for (i, t) in tasks.into_iter().enumerate() {
        let (r, lat) = t.await?;
        let served = r?;
        latencies.push(lat.as_secs_f64() * 1000.0);
        match (&served.outcome.results[0], served.origin[0]) {
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
    latencies.sort_by(|a, b| a.partial_cmp(b).expect("latencies are finite"));
    let pct = |p: f64| latencies[((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1];
    let mut json = report.json();
    let obj = json.as_object_mut().expect("the report is a JSON object");
    obj.insert("answered".into(), serde_json::json!({"edge": at_edge, "cloud": at_cloud, "degraded": degraded}));
    obj.insert("latency_ms".into(), serde_json::json!({"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}));
    obj.insert("wire_bytes_per_sample".into(), serde_json::json!(wire as f64 / n as f64));
    obj.insert("partition".into(), serde_json::json!(format!("E{}", edge.k)));
    let text = format!(
        "{}\nanswered on the edge {at_edge}, in the cloud {at_cloud}, degraded {degraded} · partition E{}\nlatency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms · {:.0} bytes on the wire per sample",
        report.table(""),
        edge.k,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        wire as f64 / n as f64
    );
    Ok(ClassifyOutput { json, text, answers })
}

impl Edge {
    fn batcher_max(&self) -> usize {
        self.batcher.max_batch()
    }
}
