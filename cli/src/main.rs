//! `classynet`: inspect, plan, partition, run, calibrate, verify-split and bench a ClassyNet (or plain
//! early-exit) ONNX model on one machine. One module per verb; what several verbs share (which
//! model, which data, which policy) is in [`args`].

mod args;
mod bench;
mod calibrate;
mod inspect;
mod partition;
mod plan;
mod run;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use classynet_runtime::engine::{self, BackendChoice, EngineOptions, Provider, SessionOptions};
use classynet_runtime::Result;

/// Split-inference tools for class-aware early-exit networks (ClassyNet).
#[derive(Debug, Parser)]
#[command(name = "classynet", version)]
pub struct Cli {
    /// Path of libonnxruntime.so. Without it: ORT_DYLIB_PATH, then the project's .venv (made by
    /// scripts/setup), then the system library path.
    #[arg(long, global = true, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,

    /// Inference engine: ort (ONNX Runtime), tract (pure Rust, nothing to install), or auto
    /// (ONNX Runtime where its library loads, otherwise tract).
    #[arg(long, global = true, env = "CLASSYNET_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// Inference threads, one pool shared by every graph of the process (ONNX Runtime's intra-op
    /// pool, tract's kernel pool); 0 uses one per core. Fewer threads leave cores to other work
    /// (an edge device serving requests), more cut latency.
    #[arg(long, global = true, env = "CLASSYNET_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// ONNX Runtime execution provider. cuda and tensorrt need an ONNX Runtime built with them
    /// (the PyPI wheel is CPU-only); when the library lacks one, or it cannot start, sessions run
    /// on the CPU and a warning says why.
    #[arg(long, global = true, env = "CLASSYNET_EXECUTION_PROVIDER", value_enum, default_value_t = Provider::Cpu)]
    pub execution_provider: Provider,

    /// More log output (info; -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a model's exits, cuts, classes and partitions.
    Inspect(args::ModelArgs),
    /// Memory cost of every partition E1..EM, and the deepest one that fits a budget.
    Plan(plan::PlanArgs),
    /// Write one side (or both) of a partition as standalone ONNX files.
    Partition(partition::PartitionArgs),
    /// Run a model on a dataset with early exits and report per-exit, per-class counts.
    Run(run::RunArgs),
    /// Choose exit thresholds on data (a precision or an accuracy-drop target) and write them
    /// as a policy file that `run` and `cloud-server` load.
    Calibrate(calibrate::CalibrateArgs),
    /// Propose which classes each early exit of a plain-exit (BranchyNet) model should answer:
    /// the fewest expected MACs under a traffic prior, every exit at a precision target.
    Assign(calibrate::AssignArgs),
    /// Check that head + tail of every partition compute what the full model computes.
    VerifySplit(verify::VerifyArgs),
    /// Compare one whole-graph session with the segmented runner (early exits disabled), and
    /// with one session per exit (what every boundary costs).
    Bench(bench::BenchArgs),
}

/// Parses arguments, runs the command, returns the process exit code.
fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

impl Cli {
    /// The engine flags, for [`engine::open`].
    fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            backend: self.backend,
            ort_lib: self.ort_lib.clone(),
            threads: self.threads,
            session: SessionOptions { provider: self.execution_provider, ..SessionOptions::default() },
        }
    }
}

fn dispatch(cli: &Cli) -> Result<ExitCode> {
    let opts = cli.engine_options();
    match &cli.command {
        Command::Inspect(a) => inspect::run(a).map(|_| ExitCode::SUCCESS),
        Command::Plan(a) => plan::run(a, &opts).map(|_| ExitCode::SUCCESS),
        Command::Partition(a) => partition::run(a).map(|_| ExitCode::SUCCESS),
        Command::Run(a) => run::run(a, engine::open(&opts)?).map(|_| ExitCode::SUCCESS),
        Command::Calibrate(a) => calibrate::run(a, engine::open(&opts)?).map(|_| ExitCode::SUCCESS),
        Command::Assign(a) => calibrate::run_assign(a, engine::open(&opts)?).map(|_| ExitCode::SUCCESS),
        Command::VerifySplit(a) => verify::run(a, engine::open(&opts)?),
        Command::Bench(a) => bench::run(a, &opts).map(|_| ExitCode::SUCCESS),
    }
}
