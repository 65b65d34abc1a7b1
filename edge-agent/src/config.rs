//! The agent's configuration: every flag, with its environment variable and default.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use classynet_runtime::engine::{BackendChoice, EngineOptions, Provider, SessionOptions};
use classynet_runtime::planner::BatchChoice;
use classynet_serving::codec::WireDtype;
use classynet_serving::telemetry::{self, LogFormat};
use classynet_serving::wire::WireCompression;

/// Edge side of the ClassyNet split runtime.
#[derive(Debug, Clone, Parser)]
#[command(name = "edge-agent", version)]
pub struct Config {
    /// cloud-server address, host:port; several replicas as a list (a:50051,b:50051) or a DNS
    /// name that resolves to several addresses (a Kubernetes headless Service), re-resolved every
    /// --resolve-interval-s. Forwards are balanced over the healthy replicas (fewest in flight)
    /// and a failed one is retried once on another.
    #[arg(long, env = "EDGE_AGENT_SERVER", value_name = "HOST:PORT[,HOST:PORT...]")]
    pub server: Option<String>,
    /// Seconds between two DNS resolutions of the --server names (replicas come and go).
    #[arg(long, env = "EDGE_AGENT_RESOLVE_INTERVAL_S", default_value_t = 10)]
    pub resolve_interval_s: u64,
    /// Exits kept on this device: E2 runs exits E1 and E2 here and forwards the rest. `auto`
    /// loads the deepest head that fits --memory-budget (without one: every exit but the last)
    /// and chooses per batch after which of its exits to forward, from the measured compute per
    /// segment, the link's round trip and throughput, the cloud's time per cut and the recent
    /// share of samples leaving at each exit (needs --model). `auto:Ek` chooses the same way
    /// within the head Ek (the deepest cut is after Ek), e.g. the head a budget was planned for.
    #[arg(long, env = "EDGE_AGENT_PARTITION", value_name = "Ek|auto|auto:Ek")]
    pub partition: Option<String>,
    /// Pick the deepest partition whose weights + activations fit, e.g. 5.54MB (needs --model), at
    /// --max-batch. The budget is the model's: the process holds the engine's baseline on top
    /// (`classynet plan` measures it; the edge logs and exports its resident set against the plan).
    #[arg(long, env = "EDGE_AGENT_MEMORY_BUDGET", value_name = "SIZE")]
    pub memory_budget: Option<String>,
    /// The full model or a head partition file; without it the head is downloaded from the
    /// cloud (GetPartition).
    #[arg(long, env = "EDGE_AGENT_MODEL", value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Address of the local v2 API (keep it on loopback unless clients are elsewhere).
    #[arg(long, env = "EDGE_AGENT_LISTEN", default_value = "127.0.0.1:8001")]
    pub listen: String,
    /// Most samples the head runs together (the paper's edge batch is 16), or `auto` with
    /// --memory-budget: the largest batch up to 16 (`auto:N`: up to N) with which a partition fits
    /// the budget, so a small budget runs E1 at a smaller batch instead of refusing to start.
    /// Smaller batches cost throughput, not answers.
    #[arg(long, env = "EDGE_AGENT_MAX_BATCH", default_value = "16", value_name = "N|auto|auto:N")]
    pub max_batch: BatchChoice,
    /// Longest a sample waits for others to fill its batch, in milliseconds.
    #[arg(long, env = "EDGE_AGENT_MAX_DELAY_MS", default_value_t = 2)]
    pub max_delay_ms: u64,
    /// Most samples admitted and not yet answered; more are refused.
    #[arg(long, env = "EDGE_AGENT_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,
    /// How cut tensors travel: fp32 (exact), fp16 (half the bytes) or int8 (a quarter, a scale
    /// and zero point per channel).
    #[arg(long, env = "EDGE_AGENT_WIRE_DTYPE", value_enum, default_value_t = WireDtype::Fp32)]
    pub wire_dtype: WireDtype,
    /// Codes an int8 wire uses per sample and channel (2..=256): fewer make coarser steps and
    /// fewer bytes after compression (128 sends about 12 % fewer than 256 with zstd on the zoo's
    /// ResNet-110 at E1, with the same accuracy; `scripts/bench-split` measures both).
    #[arg(long, env = "EDGE_AGENT_WIRE_INT8_LEVELS", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(2..=256))]
    pub wire_int8_levels: u16,
    /// gRPC message compression of the forwarded cut tensors: zstd, gzip, none, or auto (zstd
    /// towards a cloud on another host, none towards loopback). The cut tensors come out of
    /// ReLUs, so many values are zero; a cloud that refuses an encoding is sent what it accepts.
    #[arg(long, env = "EDGE_AGENT_WIRE_COMPRESSION", value_enum, default_value_t = WireCompression::Auto)]
    pub wire_compression: WireCompression,
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
    /// Inference engine: ort (ONNX Runtime), tract (pure Rust, nothing to install; runs where
    /// ONNX Runtime cannot load, such as JetPack 4.6), or auto (ONNX Runtime where its library
    /// loads, otherwise tract; one log line says which runs and why).
    #[arg(long, env = "EDGE_AGENT_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Inference threads per run, shared by the process (ONNX Runtime intra-op threads, tract's
    /// kernel pool); 0: one per core.
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
    /// Name checked in the cloud's certificate (default: the host of each --server entry).
    #[arg(long, env = "EDGE_AGENT_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Allow a non-loopback --listen without TLS (refused otherwise).
    #[arg(long, env = "EDGE_AGENT_INSECURE")]
    pub insecure: bool,
    /// Bearer token every call to the local v2 API must carry (`authorization: Bearer TOKEN`).
    #[arg(long, env = "EDGE_AGENT_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Address of the Prometheus endpoint (GET /metrics), e.g. 127.0.0.1:9102; off when not given.
    /// Also served during `classify`, to watch a long job.
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

impl Config {
    /// `--partition auto` or `auto:Ek`: the cut is chosen per batch.
    pub fn adaptive(&self) -> bool {
        self.partition.as_deref().is_some_and(|p| {
            let lower = p.to_ascii_lowercase();
            lower == "auto" || lower.starts_with("auto:")
        })
    }

    /// The head that `--partition auto:Ek` holds (`Ek`); `None` for `auto` and static partitions.
    pub fn adaptive_head(&self) -> Option<&str> {
        let p = self.partition.as_deref()?;
        self.adaptive().then(|| p.split_once(':').map(|(_, head)| head.trim())).flatten()
    }

    /// Checks the flags that clap cannot check alone.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let (Some(p), Some(b)) = (&self.partition, &self.memory_budget) {
            anyhow::ensure!(
                self.adaptive() && self.adaptive_head().is_none(),
                "--partition {p} and --memory-budget {b} both choose the partition: give one, or --partition auto \
                 to choose per batch within the budget"
            );
        }
        Ok(())
    }

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
