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
use classynet_runtime::ort_backend::{init_ort, OrtBackend, SessionOptions};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::planner::{choose, parse_size, plan, Formula};
use classynet_runtime::report::RunReport;
use classynet_runtime::runner::{BatchOutcome, SampleResult, SegmentedRunner};
use classynet_runtime::worker::Worker;
use classynet_serving::batcher::{BatchConfig, Batcher, Finisher, Origin, Served};
use classynet_serving::codec::{
    self, string_param, Payload, WireDtype, PARAM_CUT, PARAM_FINGERPRINT, PARAM_POLICY_VERSION,
};
use classynet_serving::{ServeError, ServeResult};
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

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
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
}

fn endpoint(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
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
    let partition = config.partition.clone().ok_or_else(|| {
        anyhow::anyhow!("downloading the head from the cloud needs --partition Ek (--memory-budget needs --model)")
    })?;
    let mut client = ControlClient::connect(endpoint(server)).await?;
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
        let worker = tokio::task::spawn_blocking(move || {
            Worker::spawn("edge-head", 2, move || {
                SegmentedRunner::new(OrtBackend::new(&h, SessionOptions::default())?, 0, &p, Some(sample))
            })
        })
        .await??;
        let n: usize = head.meta.input.shape.iter().product();
        let mut dims = vec![1];
        dims.extend(&head.meta.input.shape);
        worker.run(Tensor { shape: dims, data: vec![0.0; n] }).await?; // warm-up
        let worker = Arc::new(worker);
        let client = match &config.server {
            Some(s) if k < m => {
                let ep =
                    Endpoint::from_shared(endpoint(s))?.connect_timeout(Duration::from_millis(config.cloud_timeout_ms));
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
        let finisher = forwarder(link, stats.clone(), k, head.fingerprint.clone(), policy_version.clone());
        let batcher = Batcher::spawn_with(
            worker.clone(),
            BatchConfig {
                max_batch: config.max_batch.max(1),
                max_delay: Duration::from_millis(config.max_delay_ms),
                max_queue: config.max_queue.max(config.max_batch),
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
    let Some(server) = weak.upgrade().and_then(|e| e.server.clone()) else { return };
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(edge) = weak.upgrade() else { return };
        let fingerprint = edge.head.fingerprint.clone();
        drop(edge);
        let attempt = async {
            let mut client = ControlClient::connect(endpoint(&server)).await.map_err(|e| e.to_string())?;
            let mut stream = client
                .watch_policy(WatchPolicyRequest { fingerprint })
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            while let Some(update) = stream.next().await {
                let update = update.map_err(|e| e.message().to_string())?;
                let Some(edge) = weak.upgrade() else { return Ok(()) };
                match edge.apply_policy(&update.policy_json).await {
                    Ok(v) => tracing::info!(version = v, "exit policy from the cloud in force"),
                    Err(e) => tracing::error!(version = update.version, "policy refused, the previous one stays: {e}"),
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
) -> Finisher {
    Arc::new(move |mut outcome: BatchOutcome| {
        let (link, stats, fingerprint, version) = (link.clone(), stats.clone(), fingerprint.clone(), version.clone());
        Box::pin(async move {
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
                    let req = ModelInferRequest {
                        parameters: [
                            (PARAM_CUT.to_string(), string_param(format!("E{k}"))),
                            (PARAM_FINGERPRINT.to_string(), string_param(fingerprint.clone())),
                            (PARAM_POLICY_VERSION.to_string(), codec::int_param(version.load(Ordering::SeqCst) as i64)),
                        ]
                        .into(),
                        inputs: vec![input],
                        raw_input_contents: vec![raw],
                        ..Default::default()
                    };
                    let mut client = client.clone();
                    match tokio::time::timeout(link.timeout, client.model_infer(req)).await {
                        Ok(Ok(resp)) => match codec::read_answers(resp.get_ref()) {
                            Ok(a) if a.len() == fwd.rows.len() => {
                                link.succeeded();
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
        })
    })
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

struct LocalApi(Arc<Edge>);

#[tonic::async_trait]
impl GrpcInferenceService for LocalApi {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }
    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }
    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        Ok(Response::new(ModelReadyResponse { ready: r.get_ref().name == self.0.head.name() }))
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
        let head = &self.0.head;
        Ok(Response::new(codec::model_metadata(head, head.name(), &r.get_ref().name)?))
    }
    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let e = &self.0;
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
        run.await.map(Response::new).map_err(Status::from)
    }
}

/// A running edge server.
pub struct Handle {
    pub addr: std::net::SocketAddr,
    pub edge: Arc<Edge>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Handle {
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// Loads the edge and serves the local v2 API on `config.listen`.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    let edge = Edge::load(&config).await?;
    serve(edge, &config.listen).await
}

async fn serve(edge: Arc<Edge>, listen: &str) -> anyhow::Result<Handle> {
    let listener = TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GrpcInferenceServiceServer<LocalApi>>().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(GrpcInferenceServiceServer::new(LocalApi(edge.clone())))
            .serve_with_incoming_shutdown(
                // No Nagle: a batch's reply must not wait for a delayed ACK (40 ms on Linux).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = rx.await;
                },
            ),
    );
    tracing::info!(%addr, partition = edge.k, "edge-agent ready");
    Ok(Handle { addr, edge, shutdown: Some(tx), task })
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
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            handle.stop().await;
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
