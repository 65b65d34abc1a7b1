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

mod forward;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use classynet_proto::control::control_client::ControlClient;
use classynet_proto::control::{GetPartitionRequest, WatchPolicyRequest};
use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use classynet_proto::inference::*;
use classynet_runtime::backend::Tensor;
use classynet_runtime::exit::{Policy, PolicyFile};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::{parse_partition, Model};
use classynet_runtime::ort_backend::{init_ort, OrtBackend, Provider, SessionOptions};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::planner::{choose, parse_size, plan, Formula};
use classynet_runtime::report::RunReport;
use classynet_runtime::runner::{SampleResult, SegmentedRunner};
use classynet_runtime::worker::Worker;
use classynet_serving::batcher::{Admission, BatchConfig, Batcher, Origin, Served};
pub use classynet_serving::codec::WireDtype;
use classynet_serving::codec::{self, string_param, Payload};
use classynet_serving::request::{self, InputSpec};
use classynet_serving::security::{self, BearerAuth, TlsFiles};
use classynet_serving::telemetry::{self, LogFormat};
use classynet_serving::transport::Keepalive;
use classynet_serving::{systemd, ServeResult};
pub use forward::Stats;
use forward::{forwarder, Backoff, CloudLink, ForwardContext};
use prost::Message;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;
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
    #[arg(long, env = "EDGE_AGENT_WIRE_DTYPE", value_enum, default_value_t = WireDtype::Fp32)]
    pub wire_dtype: WireDtype,
    /// After this many milliseconds without the cloud's answer, answer locally (degraded).
    #[arg(long, env = "EDGE_AGENT_CLOUD_TIMEOUT_MS", default_value_t = 2000)]
    pub cloud_timeout_ms: u64,
    /// Refuse a request (RESOURCE_EXHAUSTED) when its expected wait for the head exceeds this
    /// many milliseconds, from the samples ahead of it and the measured batch time; accepted
    /// requests so keep a bounded latency under overload. 0: no limit (only --max-queue).
    #[arg(long, env = "EDGE_AGENT_MAX_QUEUE_DELAY_MS", default_value_t = 500)]
    pub max_queue_delay_ms: u64,
    /// Seconds between HTTP/2 PINGs (and TCP keepalive probes) on the connection to the cloud,
    /// also while idle. A link that silently stops carrying packets is noticed within this plus
    /// --keepalive-timeout-s and redialled. 0: off.
    #[arg(long, env = "EDGE_AGENT_KEEPALIVE_INTERVAL_S", default_value_t = 10)]
    pub keepalive_interval_s: u64,
    /// Seconds to wait for a PING's answer before the connection counts as dead.
    #[arg(long, env = "EDGE_AGENT_KEEPALIVE_TIMEOUT_S", default_value_t = 5)]
    pub keepalive_timeout_s: u64,
    /// Longest the download of the head from the cloud (no --model) may take, in seconds; the
    /// agent then exits with an error instead of staying unready.
    #[arg(long, env = "EDGE_AGENT_HEAD_TIMEOUT_S", default_value_t = 120)]
    pub head_timeout_s: u64,
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

/// A loaded edge: head model, runner thread, batcher and cloud link.
pub struct Edge {
    pub head: Model,
    /// Exits on this device.
    pub k: usize,
    worker: Arc<Worker>,
    batcher: Batcher,
    pub stats: Arc<Stats>,
    names: Names,
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
    Ok(Some(keepalive(ep.connect_timeout(Duration::from_millis(config.cloud_timeout_ms)), config)))
}

/// HTTP/2 PINGs (also while no call is open) and TCP keepalive on the cloud channel: a
/// connection that silently stops carrying packets (a NAT timeout, a Wi-Fi drop) is closed after
/// `--keepalive-interval-s` + `--keepalive-timeout-s` at most, and the next call or policy
/// stream dials a new one.
fn keepalive(ep: Endpoint, config: &Config) -> Endpoint {
    if config.keepalive_interval_s == 0 {
        return ep;
    }
    let interval = Duration::from_secs(config.keepalive_interval_s);
    ep.http2_keep_alive_interval(interval)
        .keep_alive_timeout(Duration::from_secs(config.keepalive_timeout_s.max(1)))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(interval))
}

/// Largest head partition the edge accepts from the cloud (far above any model it can run).
const MAX_HEAD_BYTES: usize = 1 << 31;

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
    let limit = Duration::from_secs(config.head_timeout_s.max(1));
    let download = async {
        let channel = ep.connect().await.map_err(|e| anyhow::anyhow!("cannot reach the cloud at {server}: {e:?}"))?;
        let mut client = ControlClient::new(channel);
        let mut stream = client
            .get_partition(GetPartitionRequest { partition: partition.clone() })
            .await
            .map_err(|s| anyhow::anyhow!("the cloud at {server} refused partition {partition}: {}", s.message()))?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| anyhow::anyhow!("head download from {server} broke off: {}", s.message()))?;
            anyhow::ensure!(
                bytes.len() + chunk.data.len() <= MAX_HEAD_BYTES,
                "the cloud at {server} sent more than {MAX_HEAD_BYTES} bytes for partition {partition}"
            );
            bytes.extend_from_slice(&chunk.data);
        }
        Ok::<_, anyhow::Error>(bytes)
    };
    let bytes = tokio::time::timeout(limit, download).await.map_err(|_| {
        anyhow::anyhow!(
            "the head partition {partition} did not arrive from {server} within {limit:?} (--head-timeout-s); \
             is the cloud up and serving?"
        )
    })??;
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
        // Warm-up: the first run allocates and picks kernels. The second, timed, seeds the
        // queue-delay estimate (a full batch costs at most max_batch single runs).
        worker.run(Tensor { shape: dims.clone(), data: vec![0.0; n] }).await?;
        let t = Instant::now();
        worker.run(Tensor { shape: dims, data: vec![0.0; n] }).await?;
        let one = t.elapsed();
        let worker = Arc::new(worker);
        let cloud = cloud_endpoint(config)?;
        let client = match &cloud {
            Some(ep) if k < m => {
                Some(GrpcInferenceServiceClient::new(ep.connect_lazy()).max_decoding_message_size(usize::MAX))
            }
            _ => None,
        };
        let stats = Arc::new(Stats::default());
        let policy_version = Arc::new(AtomicU64::new(0));
        let names = Names {
            exits: head.meta.exits.iter().map(|e| e.name.clone()).collect(),
            classes: head.meta.classes.clone(),
        };
        let context = ForwardContext {
            link: CloudLink::new(client, Duration::from_millis(config.cloud_timeout_ms), config.wire_dtype),
            stats: stats.clone(),
            k,
            fingerprint: head.fingerprint.clone(),
            policy_version: policy_version.clone(),
        };
        let batcher = Batcher::spawn(
            worker.clone(),
            BatchConfig {
                max_batch: config.max_batch.max(1),
                max_delay: Duration::from_millis(config.max_delay_ms),
                max_queue: config.max_queue.max(config.max_batch),
                max_queue_delay: (config.max_queue_delay_ms > 0)
                    .then(|| Duration::from_millis(config.max_queue_delay_ms)),
                side: "edge",
            },
            Some(forwarder(Arc::new(context))),
        );
        batcher.seed_batch_time(one * config.max_batch.max(1) as u32);
        let edge = Arc::new(Edge {
            head,
            k,
            worker,
            batcher,
            stats,
            names,
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

    /// Classifies a normalised image batch; answers in order, with where each came from. Samples
    /// an edge exit answers do not wait for the cloud (unless the same request also holds samples
    /// that go there). Requests larger than the edge batch run as several batches, so a client
    /// need not know the device's batch size.
    pub async fn infer(&self, input: Tensor, admission: impl Into<Admission>) -> ServeResult<Served> {
        let started = Instant::now();
        let served = self.batcher.infer(input, admission).await?;
        let local = served.origin.iter().filter(|o| **o == Origin::Local).count();
        self.stats.edge.fetch_add(local as u64, Ordering::Relaxed);
        self.names.count(&served, started.elapsed());
        Ok(served)
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
    let mut backoff = Backoff::new();
    loop {
        let Some(edge) = weak.upgrade() else { return };
        let fingerprint = edge.head.fingerprint.clone();
        drop(edge);
        let backoff = &mut backoff;
        let attempt = async {
            let mut client = ControlClient::new(ep.connect().await.map_err(|e| format!("{e:?}"))?);
            let mut stream = client
                .watch_policy(WatchPolicyRequest { fingerprint })
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            while let Some(update) = stream.next().await {
                let update = update.map_err(|e| e.message().to_string())?;
                // The stream works: the next outage starts again from the shortest wait.
                backoff.reset();
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
        let result = attempt.await;
        if weak.strong_count() == 0 {
            return;
        }
        let wait = backoff.wait();
        match result {
            Ok(()) => tracing::info!("policy stream from {server} ended; reconnecting in {wait:?}"),
            Err(e) => tracing::warn!("policy stream from {server}: {e}; retrying in {wait:?}"),
        }
        tokio::time::sleep(wait).await;
    }
}

/// Exit and class names, for metric labels.
struct Names {
    exits: Vec<String>,
    classes: Vec<String>,
}

impl Names {
    /// Counts each answer, and its time to answer, by where it was answered.
    fn count(&self, served: &Served, took: Duration) {
        for (r, o) in served.results.iter().zip(&served.origin) {
            let place = o.label("edge");
            metrics::histogram!(telemetry::ANSWER_SECONDS, "side" => "edge", "where" => place)
                .record(took.as_secs_f64());
            if let SampleResult::Answered(a) = r {
                let exit = self.exits.get(a.exit).cloned().unwrap_or_else(|| format!("E{}", a.exit + 1));
                let class = self.classes.get(a.class as usize).cloned().unwrap_or_else(|| a.class.to_string());
                metrics::counter!(telemetry::ANSWERED, "side" => "edge", "where" => place, "exit" => exit, "class" => class)
                    .increment(1);
            }
        }
    }
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
        // Ready means what grpc.health.v1 says: the head is loaded and warm.
        Ok(Response::new(ServerReadyResponse { ready: self.0.get().is_some() }))
    }
    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = r.get_ref();
        Ok(Response::new(ModelReadyResponse {
            ready: self.0.get().is_some_and(|e| request::check_model(&r.name, &r.version, e.head.name()).is_ok()),
        }))
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
        Ok(Response::new(codec::model_metadata(head, head.name(), &r.get_ref().name, &r.get_ref().version)?))
    }
    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let e = self.edge()?;
        let deadline = request::deadline(r.metadata(), r.get_ref());
        let req = r.into_inner();
        let run = async {
            request::check_envelope(&req, e.head.name())?;
            let what = format!("an image batch of model {}", e.head.name());
            let spec = InputSpec {
                name: "input",
                sample: Some(&e.head.meta.input.shape),
                max_samples: e.batcher.max_queue(),
                pixels: true,
                what: &what,
            };
            let mut decoded = request::decode(&req, &spec)?;
            if decoded.payload == Payload::Pixels {
                codec::normalise(&mut decoded.tensor, &e.head);
            }
            let input = std::mem::replace(&mut decoded.tensor, Tensor { shape: vec![0], data: vec![] });
            let served = decoded.merge(e.infer(input, deadline).await?);
            let resp = codec::answers_response(e.head.name(), &req.id, &served.results, e.policy_version());
            let mut resp = request::select_outputs(&req, resp);
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
            Ok::<_, classynet_serving::ServeError>(resp)
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
    let keepalive = Keepalive { interval_s: config.keepalive_interval_s, timeout_s: config.keepalive_timeout_s };
    let mut builder = keepalive.server();
    if let Some(t) = server_tls {
        builder = builder.tls_config(t)?;
    }
    let api =
        GrpcInferenceServiceServer::with_interceptor(LocalApi(slot.clone()), BearerAuth::new(config.api_token.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(builder.add_service(health_service).add_service(api).serve_with_incoming_shutdown(
        keepalive.incoming(listener),
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
    obj.insert("partition".into(), serde_json::json!(format!("E{}", edge.k)));
    let text = format!(
        "{}\nanswered on the edge {at_edge}, in the cloud {at_cloud}, degraded {degraded} · partition E{}\nlatency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms · {:.0} bytes on the wire per sample\ntime to answer: {}",
        report.table(""),
        edge.k,
        p50,
        p90,
        p99,
        wire as f64 / n as f64,
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

impl Edge {
    fn batcher_max(&self) -> usize {
        self.batcher.max_batch()
    }
}
