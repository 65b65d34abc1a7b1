//! The server's configuration: every flag, with its environment variable and default.

use std::path::PathBuf;

use clap::Parser;
use classynet_runtime::engine::{BackendChoice, EngineOptions, Provider, SessionOptions};
use classynet_serving::telemetry::{self, LogFormat};

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
    /// Exit policy file (TOML or JSON: per exit threshold or disabled, allowed classes, and
    /// per-class thresholds). It is re-read when it changes or on SIGHUP, validated, and pushed
    /// to every edge.
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
    /// Inference engine: ort (ONNX Runtime), tract (pure Rust, nothing to install; runs where
    /// ONNX Runtime cannot load, such as JetPack 4.6), or auto (ONNX Runtime where its library
    /// loads, otherwise tract; one log line says which runs and why).
    #[arg(long, env = "CLOUD_SERVER_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Inference threads per run, shared by the process (ONNX Runtime intra-op threads, tract's
    /// kernel pool); 0: one per core.
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

impl Config {
    /// Which engine runs the graphs, and how.
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            backend: self.backend,
            ort_lib: self.ort_lib.clone(),
            threads: self.threads,
            session: SessionOptions { provider: self.execution_provider, ..SessionOptions::default() },
        }
    }
}
