//! The cloud side of the split: loads a ClassyNet model once, prepares the tail after every cut
//! and serves
//! * the Open Inference Protocol (`inference.GRPCInferenceService`): ModelInfer on image batches
//!   (the whole model with its exits) or on forwarded cut tensors (`classynet_cut` = `E2`);
//! * `classynet.v1.Control`: the exit policy stream and partition downloads for edges;
//! * `grpc.health.v1`, SERVING once every tail is loaded and warmed up.
//!
//! Inference runs on one dedicated thread per cut, behind a dynamic batcher per cut.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use classynet_proto::control::control_server::{Control, ControlServer};
use classynet_proto::control::{GetPartitionRequest, PartitionChunk, PolicyUpdate, WatchPolicyRequest};
use classynet_proto::inference::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use classynet_proto::inference::*;
use classynet_runtime::backend::Tensor;
use classynet_runtime::exit::{Policy, PolicyFile};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::{parse_partition, Dim, Model};
use classynet_runtime::ort_backend::{init_ort, OrtBackend, Provider, SessionOptions};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::runner::SegmentedRunner;
use classynet_runtime::worker::Worker;
use classynet_serving::batcher::{BatchConfig, Batcher};
use classynet_serving::codec::{self, Payload, PARAM_CUT, PARAM_FINGERPRINT};
use classynet_serving::request::{self, InputSpec};
use classynet_serving::security::{self, TlsFiles};
use classynet_serving::telemetry::{self, LogFormat};
use classynet_serving::transport::Keepalive;
use classynet_serving::{systemd, ServeError, ServeResult};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Cloud side of the ClassyNet split runtime.
#[derive(Debug, Clone, Parser)]
#[command(name = "cloud-server", version)]
pub struct Config {
    /// ClassyNet ONNX model (the full model; tails for every cut are prepared from it).
    #[arg(long, env = "CLOUD_SERVER_MODEL", value_name = "FILE")]
    pub model: PathBuf,
    /// Name clients use in ModelInfer; default: the file name without .onnx.
    #[arg(long, env = "CLOUD_SERVER_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Address to listen on (port 0 picks a free port, printed at start).
    #[arg(long, env = "CLOUD_SERVER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Exit policy file (TOML or JSON: per exit threshold or disabled, allowed classes). It is
    /// re-read when it changes or on SIGHUP, validated, and pushed to every edge.
    #[arg(long, env = "CLOUD_SERVER_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Most samples run together per cut. Bigger batches raise throughput and the latency of the
    /// first sample in them; requests larger than this are refused.
    #[arg(long, env = "CLOUD_SERVER_MAX_BATCH", default_value_t = 64)]
    pub max_batch: usize,
    /// Longest a sample waits for others to fill its batch, in milliseconds.
    #[arg(long, env = "CLOUD_SERVER_MAX_DELAY_MS", default_value_t = 2)]
    pub max_delay_ms: u64,
    /// Most samples admitted per cut and not yet answered; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "CLOUD_SERVER_MAX_QUEUE", default_value_t = 4096)]
    pub max_queue: usize,
    /// Refuse a request (RESOURCE_EXHAUSTED) when its expected wait for compute exceeds this
    /// many milliseconds, from the samples ahead of it and the measured batch time: an edge
    /// answers degraded at once instead of waiting out its timeout. 0: no limit (only
    /// --max-queue).
    #[arg(long, env = "CLOUD_SERVER_MAX_QUEUE_DELAY_MS", default_value_t = 1000)]
    pub max_queue_delay_ms: u64,
    /// Seconds between HTTP/2 PINGs (and TCP keepalive probes) on every client connection; a
    /// client that vanished without closing (its policy stream, its calls) is dropped within
    /// this plus --keepalive-timeout-s. 0: off.
    #[arg(long, env = "CLOUD_SERVER_KEEPALIVE_INTERVAL_S", default_value_t = 10)]
    pub keepalive_interval_s: u64,
    /// Seconds to wait for a PING's answer before the connection counts as dead.
    #[arg(long, env = "CLOUD_SERVER_KEEPALIVE_TIMEOUT_S", default_value_t = 5)]
    pub keepalive_timeout_s: u64,
    /// Most head downloads (GetPartition) served at once; more are refused with
    /// RESOURCE_EXHAUSTED. Every download shares one encoded copy of its partition.
    #[arg(long, env = "CLOUD_SERVER_MAX_DOWNLOADS", default_value_t = 16)]
    pub max_downloads: usize,
    /// ONNX Runtime intra-op threads shared by all sessions (0: one per core).
    #[arg(long, env = "CLOUD_SERVER_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, the project's .venv, the system).
    #[arg(long, env = "CLOUD_SERVER_ORT_LIB")]
    pub ort_lib: Option<PathBuf>,
    /// PEM certificate (chain) of this server; with --tls-key the listener speaks TLS only.
    #[arg(long, env = "CLOUD_SERVER_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CLOUD_SERVER_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA that edges' client certificates must chain to. Turns on mutual TLS: a client
    /// without such a certificate fails the handshake, so the policy stream and partition
    /// downloads are only served to authenticated edges.
    #[arg(long, env = "CLOUD_SERVER_TLS_CA", value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Allow a non-loopback --listen without TLS (refused otherwise: the traffic would be
    /// readable and forgeable on the network).
    #[arg(long, env = "CLOUD_SERVER_INSECURE")]
    pub insecure: bool,
    /// Address of the Prometheus endpoint (GET /metrics), e.g. 127.0.0.1:9101; off when not given.
    #[arg(long, env = "CLOUD_SERVER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Log format on stderr: text, or json (one object per line, for log shippers).
    #[arg(long, env = "CLOUD_SERVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// On SIGTERM or SIGINT: seconds in-flight calls get to finish before the server closes
    /// anyway.
    #[arg(long, env = "CLOUD_SERVER_SHUTDOWN_TIMEOUT_S", default_value_t = 10)]
    pub shutdown_timeout_s: u64,
    /// ONNX Runtime execution provider: cpu, cuda or tensorrt. A provider the loaded library
    /// lacks (the PyPI wheel is CPU-only) falls back to the CPU with a warning; see docs/jetson.md.
    #[arg(long, env = "CLOUD_SERVER_EXECUTION_PROVIDER", value_enum, default_value_t = Provider::Cpu)]
    pub execution_provider: Provider,
}

pub fn init_logging(format: LogFormat) {
    telemetry::init_logging(format);
}

/// The loaded model and everything that serves it.
pub struct Cloud {
    model: Model,
    name: String,
    /// Index k: 0 runs the whole model; k ≥ 1 runs the tail after exit k.
    batchers: Vec<Batcher>,
    workers: Vec<Arc<Worker>>,
    /// Per-sample shape of what index k takes (image or cut k), when the graph declares it.
    inputs: Vec<Option<Vec<usize>>>,
    policy: watch::Sender<(Policy, String)>,
    /// Set when the server stops: open policy streams end so the graceful shutdown can finish.
    stopping: watch::Sender<bool>,
    /// Head partition k+1 encoded once, shared by every download of it.
    heads: Vec<std::sync::OnceLock<bytes::Bytes>>,
    downloads: Arc<tokio::sync::Semaphore>,
    max_downloads: usize,
    max_batch: usize,
}

impl Cloud {
    /// Loads the model, opens one worker per cut and warms each up.
    pub fn load(config: &Config) -> anyhow::Result<Arc<Cloud>> {
        init_ort(config.ort_lib.as_deref(), config.threads)?;
        let model = Model::load(&config.model)?;
        anyhow::ensure!(
            model.present == (0..model.num_exits()),
            "{} is a partition file; cloud-server needs the full model",
            config.model.display()
        );
        let name = config.model_name.clone().unwrap_or_else(|| {
            config.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        });
        let (policy, policy_json) = match &config.policy {
            Some(p) => {
                let file = read_policy(p)?;
                (Policy::resolve(&model.meta, &file)?, serde_json::to_string(&file)?)
            }
            None => (Policy::defaults(&model.meta), "{\"version\":0}".to_string()),
        };
        let segs = segments(&model)?;
        let m = model.num_exits();
        let opts = SessionOptions { provider: config.execution_provider, ..SessionOptions::default() };
        let batch = BatchConfig {
            max_batch: config.max_batch.max(1),
            max_delay: Duration::from_millis(config.max_delay_ms),
            max_queue: config.max_queue.max(config.max_batch),
            max_queue_delay: (config.max_queue_delay_ms > 0).then(|| Duration::from_millis(config.max_queue_delay_ms)),
            side: "cloud",
        };
        let mut workers = Vec::new();
        let mut inputs = Vec::new();
        let mut seeds = Vec::new();
        for k in 0..m {
            let part = if k == 0 {
                model.clone()
            } else {
                let tail = extract_side(&model, &segs, &Side::parse(&format!("E{k}"), PartitionRole::Tail, m)?)?;
                Model::from_bytes(&tail.encode_to_vec(), &format!("{name} tail E{k}"))?
            };
            let shape = if k == 0 {
                Some(model.meta.input.shape.clone())
            } else {
                let cut = model.meta.exits[k - 1].cut.as_deref().expect("every exit but the last has a cut");
                model.tensor_shape(cut).and_then(|d| {
                    d.iter().skip(1).map(|x| if let Dim::Fixed(n) = x { Some(*n) } else { None }).collect()
                })
            };
            let (p, s) = (policy.clone(), shape.clone());
            let worker = Worker::spawn(&format!("cloud-E{k}"), 2, move || {
                SegmentedRunner::new(OrtBackend::new(&part, opts)?, k, &p, s)
            })?;
            let mut one = None;
            if let Some(s) = &shape {
                // Warm-up: the first run allocates and picks kernels; do it before SERVING. The
                // second, timed, seeds the queue-delay estimate (a full batch costs at most
                // max_batch single runs).
                let n: usize = s.iter().product();
                let mut dims = vec![1];
                dims.extend(s);
                worker.run_blocking(Tensor { shape: dims.clone(), data: vec![0.0; n] })?;
                let t = std::time::Instant::now();
                worker.run_blocking(Tensor { shape: dims, data: vec![0.0; n] })?;
                one = Some(t.elapsed());
            }
            workers.push(Arc::new(worker));
            inputs.push(shape);
            seeds.push(one);
        }
        let batchers: Vec<Batcher> = workers.iter().map(|w| Batcher::spawn(w.clone(), batch, None)).collect();
        for (b, one) in batchers.iter().zip(seeds) {
            if let Some(one) = one {
                b.seed_batch_time(one * batch.max_batch as u32);
            }
        }
        let (policy_tx, _) = watch::channel((policy, policy_json));
        let (stopping, _) = watch::channel(false);
        Ok(Arc::new(Cloud {
            model,
            name,
            batchers,
            workers,
            inputs,
            policy: policy_tx,
            stopping,
            heads: (0..m).map(|_| std::sync::OnceLock::new()).collect(),
            downloads: Arc::new(tokio::sync::Semaphore::new(config.max_downloads.max(1))),
            max_downloads: config.max_downloads.max(1),
            max_batch: batch.max_batch,
        }))
    }

    /// Validates `file` against the model and puts it in force everywhere, or leaves the current
    /// policy untouched and says why.
    pub async fn apply_policy(&self, file: &PolicyFile) -> Result<(), String> {
        let policy = Policy::resolve(&self.model.meta, file).map_err(|e| e.to_string())?;
        for w in &self.workers {
            w.set_policy(policy.clone()).await.map_err(|e| e.to_string())?;
        }
        let json = serde_json::to_string(file).expect("policy files serialise");
        self.policy.send_replace((policy, json));
        tracing::info!(version = file.version, "exit policy in force");
        Ok(())
    }

    /// Version of the policy in force.
    pub fn policy_version(&self) -> u64 {
        self.policy.borrow().0.version
    }

    async fn infer(
        &self,
        req: ModelInferRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> ServeResult<ModelInferResponse> {
        let started = std::time::Instant::now();
        request::check_envelope(&req, &self.name)?;
        let m = self.model.num_exits();
        let k = match codec::param_str(&req.parameters, PARAM_CUT) {
            None => 0,
            Some(cut) => {
                let k = parse_partition(cut, m).map_err(|_| {
                    ServeError::NotFound(format!("cut {cut:?} is not in model {} (cuts E1..E{})", self.name, m - 1))
                })?;
                if k == m {
                    return Err(ServeError::InvalidArgument(format!(
                        "cut E{m} puts every exit on the edge; nothing is left to run here"
                    )));
                }
                k
            }
        };
        // Empty means "not given", as in WatchPolicy.
        if let Some(fp) = codec::param_str(&req.parameters, PARAM_FINGERPRINT).filter(|fp| !fp.is_empty()) {
            if fp != self.model.fingerprint {
                return Err(ServeError::FailedPrecondition(format!(
                    "the edge runs a model with fingerprint {fp}, this server runs {} ({}); deploy matching models",
                    self.model.fingerprint, self.name
                )));
            }
        }
        let what = if k == 0 {
            format!("an image batch of model {}", self.name)
        } else {
            format!("cut E{k} of model {}", self.name)
        };
        let spec = InputSpec {
            name: if k == 0 { "input" } else { "cut" },
            sample: self.inputs[k].as_deref(),
            max_samples: self.max_batch,
            pixels: k == 0,
            what: &what,
        };
        let mut decoded = request::decode(&req, &spec)?;
        if decoded.payload == Payload::Pixels {
            codec::normalise(&mut decoded.tensor, &self.model);
        }
        let input = std::mem::replace(&mut decoded.tensor, Tensor { shape: vec![0], data: vec![] });
        let version = self.policy_version();
        let served = decoded.merge(self.batchers[k].infer(input, deadline).await?);
        let took = started.elapsed().as_secs_f64();
        metrics::histogram!(telemetry::ANSWER_SECONDS, "side" => "cloud", "where" => "cloud")
            .record_many(took, served.results.len());
        for r in &served.results {
            if let classynet_runtime::runner::SampleResult::Answered(a) = r {
                metrics::counter!(telemetry::ANSWERED, "side" => "cloud", "where" => "cloud",
                    "exit" => self.model.meta.exits[a.exit].name.clone(),
                    "class" => self.model.meta.classes[a.class as usize].clone())
                .increment(1);
            }
        }
        tracing::debug!(samples = served.results.len(), cut = k, "answered");
        let resp = codec::answers_response(&self.name, &req.id, &served.results, version);
        let mut resp = request::select_outputs(&req, resp);
        // The edge subtracts this from its round trip to tell network time from cloud time.
        resp.parameters.insert(
            codec::PARAM_SERVER_MICROS.into(),
            codec::int_param(started.elapsed().as_micros().min(i64::MAX as u128) as i64),
        );
        Ok(resp)
    }
}

/// Reads a policy file (see [`PolicyFile::load`]).
pub fn read_policy(path: &std::path::Path) -> anyhow::Result<PolicyFile> {
    Ok(PolicyFile::load(path)?)
}

/// Filled once the model is loaded and warm; until then every call but health is UNAVAILABLE.
type Slot = Arc<std::sync::OnceLock<Arc<Cloud>>>;

fn loaded(slot: &Slot) -> Result<&Arc<Cloud>, Status> {
    slot.get().ok_or_else(|| Status::unavailable("cloud-server is warming up: the model is still loading"))
}

struct InferenceApi(Slot);

#[tonic::async_trait]
impl GrpcInferenceService for InferenceApi {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }
    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.0.get().is_some() }))
    }
    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = r.get_ref();
        Ok(Response::new(ModelReadyResponse {
            ready: self.0.get().is_some_and(|c| request::check_model(&r.name, &r.version, &c.name).is_ok()),
        }))
    }
    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(codec::server_metadata("classynet-cloud-server")))
    }
    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let c = loaded(&self.0)?;
        Ok(Response::new(codec::model_metadata(&c.model, &c.name, &r.get_ref().name, &r.get_ref().version)?))
    }
    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let c = loaded(&self.0)?;
        let deadline = request::deadline(r.metadata(), r.get_ref());
        // The edge's trace context: one forwarded batch is one trace across both sides.
        let trace = r.metadata().get("traceparent").and_then(|v| v.to_str().ok()).and_then(telemetry::trace_id);
        let span = tracing::info_span!("model_infer", trace_id = trace.unwrap_or(""));
        let out = tracing::Instrument::instrument(c.infer(r.into_inner(), deadline), span).await;
        metrics::counter!(telemetry::REQUESTS, "side" => "cloud", "outcome" => if out.is_ok() { "ok" } else { "error" })
            .increment(1);
        out.map(Response::new).map_err(Status::from)
    }
}

struct ControlApi(Slot);

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlApi {
    type WatchPolicyStream = Streamed<PolicyUpdate>;
    type GetPartitionStream = Streamed<PartitionChunk>;

    async fn watch_policy(&self, r: Request<WatchPolicyRequest>) -> Result<Response<Self::WatchPolicyStream>, Status> {
        let c = loaded(&self.0)?.clone();
        let fp = &r.get_ref().fingerprint;
        if !fp.is_empty() && *fp != c.model.fingerprint {
            return Err(ServeError::FailedPrecondition(format!(
                "the edge runs a model with fingerprint {fp}, this server runs {}",
                c.model.fingerprint
            ))
            .into());
        }
        let mut rx = c.policy.subscribe();
        let mut stopping = c.stopping.subscribe();
        let fingerprint = c.model.fingerprint.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let update = {
                    let (p, json) = &*rx.borrow_and_update();
                    PolicyUpdate { version: p.version, policy_json: json.clone(), fingerprint: fingerprint.clone() }
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = until_set(&mut stopping) => {
                        let _ = tx.send(Err(Status::unavailable("cloud-server is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_partition(
        &self,
        r: Request<GetPartitionRequest>,
    ) -> Result<Response<Self::GetPartitionStream>, Status> {
        let c = loaded(&self.0)?;
        let m = c.model.num_exits();
        let partition = &r.get_ref().partition;
        let side = Side::parse(partition, PartitionRole::Head, m).map_err(|e| ServeError::NotFound(e.to_string()))?;
        let k = parse_partition(partition, m).map_err(|e| ServeError::NotFound(e.to_string()))?;
        // Held until the stream is dropped: a client that never reads ties up one permit, not
        // memory without bound.
        let permit = c.downloads.clone().try_acquire_owned().map_err(|_| {
            ServeError::ResourceExhausted(format!(
                "{} head downloads are already in progress (--max-downloads); retry later",
                c.max_downloads
            ))
        })?;
        let bytes = match c.heads[k - 1].get() {
            Some(b) => b.clone(),
            None => {
                let model = c.clone();
                let encoded = tokio::task::spawn_blocking(move || {
                    let segs = segments(&model.model)?;
                    Ok::<_, ServeError>(bytes::Bytes::from(extract_side(&model.model, &segs, &side)?.encode_to_vec()))
                })
                .await
                .map_err(|e| ServeError::Unavailable(format!("extracting partition {partition} failed: {e}")))??;
                c.heads[k - 1].get_or_init(|| encoded).clone()
            }
        };
        let total = bytes.len() as u64;
        let fingerprint = c.model.fingerprint.clone();
        const CHUNK: usize = 1 << 20;
        let chunks = (0..bytes.len().div_ceil(CHUNK)).map(move |i| {
            let _held = &permit;
            let start = i * CHUNK;
            Ok(PartitionChunk {
                data: bytes.slice(start..(start + CHUNK).min(bytes.len())),
                total_bytes: if i == 0 { total } else { 0 },
                fingerprint: if i == 0 { fingerprint.clone() } else { String::new() },
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// Resolves once the flag is true (or its sender is gone).
async fn until_set(flag: &mut watch::Receiver<bool>) {
    loop {
        if *flag.borrow_and_update() {
            return;
        }
        if flag.changed().await.is_err() {
            return;
        }
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<T, F, Fut>(f: F) -> Streamed<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A running server: its address and a way to stop it.
pub struct Handle {
    pub addr: SocketAddr,
    pub cloud: Arc<Cloud>,
    health: tonic_health::server::HealthReporter,
    drain: Duration,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn set_health(health: &tonic_health::server::HealthReporter, status: tonic_health::ServingStatus) {
    // "" is the whole server, as load balancers and grpc_health_probe ask by default.
    for service in ["", "inference.GRPCInferenceService", "classynet.v1.Control"] {
        health.set_service_status(service, status).await;
    }
}

impl Handle {
    /// Reports NOT_SERVING, stops accepting, ends policy streams, lets in-flight calls finish
    /// (at most `--shutdown-timeout-s`), and waits for the server to end.
    pub async fn stop(mut self) {
        set_health(&self.health, tonic_health::ServingStatus::NotServing).await;
        self.cloud.stopping.send_replace(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(self.drain, &mut self.task).await.is_err() {
            tracing::warn!("in-flight calls did not finish within {:?}; closing anyway", self.drain);
            self.task.abort();
        }
    }
}

/// Largest request a client may send: a full batch of the largest per-sample input (image or
/// cut tensor) in FP32, plus room for the envelope.
fn message_limit(model: &Model, max_batch: usize) -> usize {
    let mut shapes = vec![Some(model.meta.input.shape.clone())];
    for e in &model.meta.exits {
        if let Some(cut) = e.cut.as_deref() {
            shapes.push(
                model.tensor_shape(cut).and_then(|d| {
                    d.iter().skip(1).map(|x| if let Dim::Fixed(n) = x { Some(*n) } else { None }).collect()
                }),
            );
        }
    }
    let per_sample = shapes.iter().flatten().map(|s| s.iter().product::<usize>()).max().unwrap_or(1 << 16);
    max_batch.max(1) * per_sample * 4 + (64 << 10)
}

/// Serves on `config.listen` at once (health says NOT_SERVING, other calls UNAVAILABLE), loads
/// and warms the model, then reports SERVING (and READY=1 to systemd) and returns.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    telemetry::recorder();
    let tls = TlsFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone(), ca: config.tls_ca.clone() };
    let server_tls = tls.server()?;
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    security::check_listener(&addr, server_tls.is_some(), config.insecure, "CLOUD_SERVER")?;
    if let Some(m) = &config.metrics_listen {
        telemetry::serve_metrics(m).await?;
    }
    let path = config.model.clone();
    let model = tokio::task::spawn_blocking(move || Model::load(&path)).await??;
    let limit = message_limit(&model, config.max_batch);
    drop(model);

    tracing::info!(%addr, "accepting connections; health is NOT_SERVING until the model is loaded and warm");
    let slot: Slot = Arc::default();
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, tonic_health::ServingStatus::NotServing).await;
    let inference = GrpcInferenceServiceServer::new(InferenceApi(slot.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let control = ControlServer::new(ControlApi(slot.clone()));
    let keepalive = Keepalive { interval_s: config.keepalive_interval_s, timeout_s: config.keepalive_timeout_s };
    let mut builder = keepalive.server();
    if let Some(t) = server_tls {
        builder = builder.tls_config(t)?;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        builder.add_service(health_service).add_service(inference).add_service(control).serve_with_incoming_shutdown(
            keepalive.incoming(listener),
            async {
                let _ = rx.await;
            },
        ),
    );
    let cfg = config.clone();
    let cloud = match tokio::task::spawn_blocking(move || Cloud::load(&cfg)).await {
        Ok(Ok(c)) => c,
        failed => {
            let _ = tx.send(());
            let _ = task.await;
            return Err(match failed {
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("loading the model failed: {e}"),
                Ok(Ok(_)) => unreachable!(),
            });
        }
    };
    let _ = slot.set(cloud.clone());
    metrics::gauge!(telemetry::POLICY_VERSION, "side" => "cloud").set(cloud.policy_version() as f64);
    if let Some(path) = config.policy.clone() {
        tokio::spawn(watch_policy_file(cloud.clone(), path));
    }
    set_health(&health, tonic_health::ServingStatus::Serving).await;
    tracing::info!(%addr, model = %cloud.name, exits = cloud.model.num_exits(), max_message_bytes = limit,
        tls = tls.enabled(), mutual_tls = config.tls_ca.is_some(), "cloud-server ready");
    Ok(Handle { addr, cloud, health, drain: Duration::from_secs(config.shutdown_timeout_s), shutdown: Some(tx), task })
}

/// Re-reads the policy file when its modification time changes or on SIGHUP.
async fn watch_policy_file(cloud: Arc<Cloud>, path: PathBuf) {
    let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = mtime(&path);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let forced = {
            #[cfg(unix)]
            {
                let sig = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => false,
                    _ = sig => true,
                }
            }
            #[cfg(not(unix))]
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                false
            }
        };
        let now = mtime(&path);
        if !forced && now == last {
            continue;
        }
        last = now;
        match read_policy(&path) {
            Ok(file) => {
                if let Err(e) = cloud.apply_policy(&file).await {
                    metrics::counter!(telemetry::POLICY_REJECTIONS, "side" => "cloud").increment(1);
                    tracing::error!(file = %path.display(), "policy refused, the previous one stays in force: {e}");
                } else {
                    metrics::gauge!(telemetry::POLICY_VERSION, "side" => "cloud").set(cloud.policy_version() as f64);
                }
            }
            Err(e) => {
                metrics::counter!(telemetry::POLICY_REJECTIONS, "side" => "cloud").increment(1);
                tracing::error!("policy refused, the previous one stays in force: {e}")
            }
        }
    }
}

/// Runs the server until SIGINT or SIGTERM, then drains (see [`Handle::stop`]).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let handle = start(config).await?;
    println!("cloud-server listening on {}", handle.addr);
    systemd::ready(&format!("serving {} on {}", handle.cloud.name, handle.addr));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: NOT_SERVING, no new connections, finishing in-flight calls");
    systemd::stopping("draining in-flight calls");
    handle.stop().await;
    tracing::info!("stopped");
    Ok(())
}
