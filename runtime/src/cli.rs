//! The `classynet` command-line tool: inspect, plan, partition, run, verify-split and bench a
//! ClassyNet (or plain early-exit) ONNX model on one machine.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use prost::Message;
use serde_json::json;

use crate::backend::Tensor;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::exit::{Policy, PolicyFile};
use crate::format::PartitionRole;
use crate::model::{fmt_dims, Model};
use crate::ort_backend::{init_ort, OrtBackend, OrtGraph, Provider, SessionOptions};
use crate::partition::{extract_side, segments, Side};
use crate::planner::{choose, human, parse_size, plan, Formula};
use crate::report::RunReport;
use crate::runner::{SampleResult, SegmentedRunner};
use crate::worker::{Pending, Worker};

/// Split-inference tools for class-aware early-exit networks (ClassyNet).
#[derive(Debug, Parser)]
#[command(name = "classynet", version)]
pub struct Cli {
    /// Path of libonnxruntime.so. Without it: ORT_DYLIB_PATH, then the project's .venv (made by
    /// scripts/setup), then the system library path.
    #[arg(long, global = true, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,

    /// ONNX Runtime intra-op threads, one pool shared by every session of the process; 0 lets
    /// ONNX Runtime use one per core. Fewer threads leave cores to other work (an edge device
    /// serving requests), more cut latency.
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
    Inspect(ModelArgs),
    /// Memory cost of every partition E1..EM, and the deepest one that fits a budget.
    Plan(PlanArgs),
    /// Write one side (or both) of a partition as standalone ONNX files.
    Partition(PartitionArgs),
    /// Run a model on a dataset with early exits and report per-exit, per-class counts.
    Run(RunArgs),
    /// Check that head + tail of every partition compute what the full model computes.
    VerifySplit(VerifyArgs),
    /// Compare one whole-graph session with the segmented runner (early exits disabled), and
    /// with one session per exit (what every boundary costs).
    Bench(BenchArgs),
}

/// Which model to load; `--cuts` and `--exits` turn on the plain-ONNX path.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// ONNX model file: a ClassyNet export (with `classynet` metadata) or, with --cuts and
    /// --exits, any early-exit ONNX graph.
    #[arg(long, env = "CLASSYNET_MODEL", value_name = "FILE")]
    pub model: PathBuf,
    /// Plain ONNX only: tensor after each exit's block, comma-separated, one fewer than --exits.
    #[arg(long, value_delimiter = ',', requires = "exits", value_name = "T1,T2,..")]
    pub cuts: Vec<String>,
    /// Plain ONNX only: graph outputs holding each exit's logits, in exit order.
    #[arg(long, value_delimiter = ',', value_name = "O1,O2,..")]
    pub exits: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

impl ModelArgs {
    fn load(&self) -> Result<Model> {
        if self.exits.is_empty() {
            Model::load(&self.model)
        } else {
            Model::load_plain(&self.model, &self.cuts, &self.exits)
        }
    }
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch size the edge runs (the paper's edge batch is 16).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Memory budget of the edge, e.g. 470kB, 2.31MB, 28.5MiB (MB = 10^6 B, MiB = 2^20 B).
    #[arg(long, value_name = "SIZE")]
    pub budget: Option<String>,
    /// What the budget is compared with: the runtime's weights + activations, or the paper's
    /// params × 4 B × batch.
    #[arg(long, value_enum, default_value_t = Formula::Runtime)]
    pub formula: Formula,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SideArg {
    Head,
    Tail,
}

#[derive(Debug, Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to cut: E2 keeps exits E1 and E2 on the edge (the head) and the rest in the tail.
    #[arg(long, value_name = "Ek")]
    pub partition: String,
    /// Which side --out receives.
    #[arg(long, value_enum, default_value_t = SideArg::Head)]
    pub side: SideArg,
    /// Output file for --side.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Also write the other side here.
    #[arg(long, value_name = "FILE")]
    pub other_out: Option<PathBuf>,
}

/// Where samples come from.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// fashion-mnist:test|train, cifar10:test|train|FILE.bin, npz:FILE, idx:IMAGES,LABELS.
    #[arg(long, default_value = "fashion-mnist:test")]
    pub dataset: String,
    /// Folder with the dataset files (default for Fashion-MNIST: where the Debian package
    /// dataset-fashion-mnist installs them).
    #[arg(long, env = "CLASSYNET_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N samples.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Samples per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Exit policy JSON (per exit: threshold or disabled, allowed classes); defaults come from
    /// the model.
    #[arg(long, env = "CLASSYNET_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Largest absolute difference allowed between split and full outputs.
    #[arg(long, default_value_t = 1e-5)]
    pub tolerance: f32,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Timed rounds; each round runs every batch once through each runner, rotating which goes
    /// first, so all see the same machine load.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

/// Parses arguments, runs the command, returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
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

fn dispatch(cli: &Cli) -> Result<std::process::ExitCode> {
    let opts = SessionOptions { provider: cli.execution_provider, ..SessionOptions::default() };
    let threads = cli.threads;
    match &cli.command {
        Command::Inspect(a) => inspect(a).map(|_| std::process::ExitCode::SUCCESS),
        Command::Plan(a) => plan_cmd(a).map(|_| std::process::ExitCode::SUCCESS),
        Command::Partition(a) => partition_cmd(a).map(|_| std::process::ExitCode::SUCCESS),
        Command::Run(a) => {
            init_ort(cli.ort_lib.as_deref(), threads)?;
            run_cmd(a, opts).map(|_| std::process::ExitCode::SUCCESS)
        }
        Command::VerifySplit(a) => {
            init_ort(cli.ort_lib.as_deref(), threads)?;
            verify_cmd(a, opts)
        }
        Command::Bench(a) => {
            init_ort(cli.ort_lib.as_deref(), threads)?;
            bench_cmd(a, opts, threads).map(|_| std::process::ExitCode::SUCCESS)
        }
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON values serialise"));
}

fn inspect(a: &ModelArgs) -> Result<()> {
    let m = a.load()?;
    let segs = segments(&m)?;
    if a.json {
        print_json(&json!({
            "name": m.name(),
            "fingerprint": m.fingerprint,
            "input": m.input_name,
            "metadata": serde_json::to_value(&m.meta).expect("metadata serialises"),
            "segments": segs.iter().map(|s| json!({
                "exit": m.meta.exits[s.exit].name, "input": s.input, "logits": s.logits, "cut": s.cut,
                "nodes": s.nodes.len(), "initializers": s.initializers.len(),
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!("model {} ({}), fingerprint {}", m.name(), m.origin, m.fingerprint);
    if let Some(p) = &m.meta.partition {
        println!("partition file: {:?} of {} (source fingerprint {})", p.role, p.partition, p.source_fingerprint);
    }
    println!(
        "input `{}` {} · {} classes: {}",
        m.input_name,
        fmt_dims(&m.tensor_shape(&m.input_name).unwrap_or_default()),
        m.meta.num_classes(),
        m.meta.classes.join(", ")
    );
    println!("{:<5} {:<5} {:>9} {:<14} {:<18} {:>6}  classes", "exit", "kind", "threshold", "logits", "cut", "nodes");
    for s in &segs {
        let e = &m.meta.exits[s.exit];
        let cut = match &s.cut {
            Some(c) => format!("{c} {}", fmt_dims(&m.tensor_shape(c).unwrap_or_default())),
            None => "-".into(),
        };
        let classes: Vec<String> = e.classes.iter().map(|&c| m.meta.class_label(c)).collect();
        println!(
            "{:<5} {:<5} {:>9} {:<14} {:<18} {:>6}  {}",
            e.name,
            if e.bag { "bag" } else { "plain" },
            e.threshold.map_or("-".into(), |t| format!("{t}")),
            e.logits,
            cut,
            s.nodes.len(),
            if e.classes.len() == m.meta.num_classes() { "all".into() } else { classes.join(", ") }
        );
    }
    if let Some(t) = &m.meta.training {
        println!("training: {t}");
    }
    Ok(())
}

fn plan_cmd(a: &PlanArgs) -> Result<()> {
    if a.batch == 0 {
        return Err(Error::Parse("--batch must be at least 1".into()));
    }
    let m = a.model.load()?;
    if m.present != (0..m.num_exits()) {
        return Err(Error::Partition(format!("{} is a partition file; plan the full model", m.origin)));
    }
    let segs = segments(&m)?;
    let costs = plan(&m, &segs, a.batch);
    let budget = a.budget.as_deref().map(parse_size).transpose()?;
    let choice = budget.map(|b| choose(&costs, b, a.formula));
    if a.model.json {
        let (chosen, why, err) = match &choice {
            Some(Ok((i, why))) => (Some(costs[*i].name.clone()), Some(why.clone()), None),
            Some(Err(e)) => (None, None, Some(e.to_string())),
            None => (None, None, None),
        };
        print_json(&json!({
            "model": m.name(), "batch": a.batch, "budget_bytes": budget, "formula": format!("{:?}", a.formula).to_lowercase(),
            "chosen": chosen, "explanation": why, "error": err,
            "partitions": costs.iter().map(|c| json!({
                "name": c.name, "exits_on_edge": c.k, "params": c.params, "weight_bytes": c.weight_bytes,
                "activation_bytes": c.activation_bytes, "total_bytes": c.total(),
                "paper_formula_bytes": c.paper_bytes(), "unknown_shapes": c.unknown_shapes,
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!("model {} · batch {} · M = {} exits", m.name(), a.batch, m.num_exits());
        println!(
            "{:<4} {:>10} {:>11} {:>14} {:>11} {:>14}",
            "part", "params", "weights", "activations", "total", "paper(p×4×B)"
        );
        for c in &costs {
            let approx = if c.unknown_shapes > 0 {
                format!("≥{}", human(c.activation_bytes))
            } else {
                human(c.activation_bytes)
            };
            println!(
                "{:<4} {:>10} {:>11} {:>14} {:>11} {:>14}",
                c.name,
                c.params,
                human(c.weight_bytes),
                approx,
                human(c.total()),
                human(c.paper_bytes())
            );
        }
        if costs.iter().any(|c| c.unknown_shapes > 0) {
            println!("≥: some tensors have no declared shape (run onnx.shape_inference.infer_shapes on the export)");
        }
    }
    match choice {
        Some(Ok((_, why))) => {
            if !a.model.json {
                println!("{why}");
            }
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => Ok(()),
    }
}

fn partition_cmd(a: &PartitionArgs) -> Result<()> {
    let m = a.model.load()?;
    let segs = segments(&m)?;
    let (first, second) = match a.side {
        SideArg::Head => (PartitionRole::Head, PartitionRole::Tail),
        SideArg::Tail => (PartitionRole::Tail, PartitionRole::Head),
    };
    let mut jobs = vec![(first, a.out.clone())];
    if let Some(o) = &a.other_out {
        jobs.push((second, o.clone()));
    }
    for (role, path) in jobs {
        let side = Side::parse(&a.partition, role, m.num_exits())?;
        let proto = extract_side(&m, &segs, &side)?;
        let bytes = proto.encode_to_vec();
        std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
        // Read it back: what we wrote must load as a model on its own.
        let written = Model::from_bytes(&bytes, &path.display().to_string())?;
        let g = written.graph();
        let params: u64 = g.initializer.iter().map(|t| t.dims.iter().product::<i64>().max(0) as u64).sum();
        let exits = side.exits(m.num_exits());
        println!(
            "wrote {} ({}): {:?} of {}, exits E{}..E{}, input `{}` {} -> outputs {}; {} parameters",
            path.display(),
            human(bytes.len() as u64),
            role,
            a.partition,
            exits.start + 1,
            exits.end,
            written.input_name,
            fmt_dims(&written.tensor_shape(&written.input_name).unwrap_or_default()),
            g.output.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "),
            params
        );
    }
    Ok(())
}

/// Loads the dataset and checks that its samples fit the model (see [`Dataset::open_for`]).
pub fn open_dataset(d: &DataArgs, m: &Model) -> Result<Dataset> {
    if d.batch == 0 {
        return Err(Error::Parse("--batch must be at least 1".into()));
    }
    Dataset::open_for(&d.dataset, d.data_dir.as_deref(), d.limit, m)
}

/// Normalised `[n, C, H, W]` batch of samples `range` (see [`Dataset::batch`]).
pub fn make_batch(ds: &Dataset, m: &Model, range: std::ops::Range<usize>) -> Tensor {
    ds.batch(m, range)
}

fn load_policy(path: Option<&Path>, m: &Model) -> Result<Policy> {
    match path {
        Some(p) => Policy::resolve(&m.meta, &PolicyFile::load(p)?).map_err(|e| match e {
            Error::Policy(msg) => Error::Policy(format!("{}: {msg}", p.display())),
            other => other,
        }),
        None => Ok(Policy::defaults(&m.meta)),
    }
}

fn run_cmd(a: &RunArgs, opts: SessionOptions) -> Result<()> {
    let m = a.model.load()?;
    if !m.starts_at_input() || m.present.end != m.num_exits() {
        return Err(Error::Partition(format!(
            "{} is a partition file; `run` needs the full model (the split runs in edge-agent and cloud-server)",
            m.origin
        )));
    }
    let ds = open_dataset(&a.data, &m)?;
    let policy = load_policy(a.policy.as_deref(), &m)?;
    let (mm, pp) = (m.clone(), policy.clone());
    let sample = m.meta.input.shape.clone();
    let worker = Worker::spawn("classynet-ort", 2, move || {
        SegmentedRunner::new(OrtBackend::new(&mm, opts)?, 0, &pp, Some(sample))
    })?;
    let mut report = RunReport::new(&m, &ds.name, a.data.batch, policy.version);
    let n = ds.len();
    let start = Instant::now();
    let mut pending: VecDeque<(usize, Pending)> = VecDeque::new();
    let absorb = |report: &mut RunReport, first: usize, p: Pending| -> Result<()> {
        let out = worker.wait(p)?;
        for (row, r) in out.results.iter().enumerate() {
            match r {
                SampleResult::Answered(ans) => report.answered(ans, ds.labels[first + row]),
                SampleResult::Failed(msg) => {
                    report.failed();
                    tracing::warn!(sample = first + row, "{msg}");
                }
                SampleResult::Forwarded => unreachable!("a full model's last exit answers every sample"),
            }
        }
        Ok(())
    };
    // Progress on a terminal only: scripts read stdout, and logs should not fill with it.
    let show_progress = std::io::stderr().is_terminal() && n > 2000;
    let mut last_progress = Instant::now();
    for first in (0..n).step_by(a.data.batch) {
        let batch = make_batch(&ds, &m, first..(first + a.data.batch).min(n));
        pending.push_back((first, worker.submit(batch)?));
        // Two batches in flight: the next one is normalised while the current one runs.
        if pending.len() > 2 {
            let (f, p) = pending.pop_front().expect("non-empty");
            absorb(&mut report, f, p)?;
            if show_progress && last_progress.elapsed().as_millis() > 250 {
                last_progress = Instant::now();
                eprint!("\r{}/{n} samples", f + a.data.batch);
            }
        }
    }
    while let Some((f, p)) = pending.pop_front() {
        absorb(&mut report, f, p)?;
    }
    if show_progress {
        eprint!("\r{:width$}\r", "", width = 30);
    }
    report.seconds = start.elapsed().as_secs_f64();
    if a.model.json {
        print_json(&report.json());
    } else {
        println!("{}", report.table(if a.policy.is_none() { " (model defaults)" } else { "" }));
    }
    Ok(())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    if a.shape != b.shape {
        return f32::INFINITY;
    }
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn verify_cmd(a: &VerifyArgs, opts: SessionOptions) -> Result<std::process::ExitCode> {
    let m = a.model.load()?;
    let mut data = DataArgs {
        dataset: a.data.dataset.clone(),
        data_dir: a.data.data_dir.clone(),
        limit: a.data.limit.or(Some(256)),
        batch: a.data.batch,
    };
    if data.batch == 16 {
        data.batch = 64;
    }
    let ds = open_dataset(&data, &m)?;
    let segs = segments(&m)?;
    let mut full = OrtGraph::from_bytes(&m.proto.encode_to_vec(), opts)?;
    let exits = m.num_exits();
    let batches: Vec<Tensor> =
        (0..ds.len()).step_by(data.batch).map(|f| make_batch(&ds, &m, f..(f + data.batch).min(ds.len()))).collect();
    // Full-model logits per batch, in exit order.
    let logit_names: Vec<&str> = m.meta.exits.iter().map(|e| e.logits.as_str()).collect();
    let order: Vec<usize> = logit_names
        .iter()
        .map(|n| {
            full.output_names()
                .iter()
                .position(|o| o == n)
                .expect("every exit's logits are a graph output (checked at load)")
        })
        .collect();
    let reference: Vec<Vec<Tensor>> = batches
        .iter()
        .map(|b| full.run(b).map(|outs| order.iter().map(|&i| outs[i].clone()).collect()))
        .collect::<Result<_>>()?;
    let mut report = Vec::new();
    let mut ok = true;
    for k in 1..=exits {
        let head = extract_side(&m, &segs, &Side::parse(&format!("E{k}"), PartitionRole::Head, exits)?)?;
        let mut head = OrtGraph::new(&head, opts)?;
        let mut tail = if k < exits {
            Some(OrtGraph::new(
                &extract_side(&m, &segs, &Side::parse(&format!("E{k}"), PartitionRole::Tail, exits)?)?,
                opts,
            )?)
        } else {
            None
        };
        let (mut head_diff, mut tail_diff) = (0f32, 0f32);
        for (b, refs) in batches.iter().zip(&reference) {
            let outs = head.run(b)?;
            for e in 0..k {
                head_diff = head_diff.max(max_abs_diff(&outs[e], &refs[e]));
            }
            if let Some(tail) = tail.as_mut() {
                let cut = &outs[k];
                let touts = tail.run(cut)?;
                for e in k..exits {
                    tail_diff = tail_diff.max(max_abs_diff(&touts[e - k], &refs[e]));
                }
            }
        }
        let pass = head_diff <= a.tolerance && tail_diff <= a.tolerance;
        ok &= pass;
        report.push((k, head_diff, tail_diff, pass));
    }
    if a.model.json {
        print_json(&json!({
            "model": m.name(), "samples": ds.len(), "dataset": ds.name, "tolerance": a.tolerance, "ok": ok,
            "partitions": report.iter().map(|(k, h, t, p)| json!({"name": format!("E{k}"), "head_max_abs_diff": h, "tail_max_abs_diff": t, "ok": p})).collect::<Vec<_>>(),
        }));
    } else {
        println!("model {} · {} samples of {} · tolerance {:e}", m.name(), ds.len(), ds.name, a.tolerance);
        for (k, h, t, p) in &report {
            let tail =
                if *k < exits { format!("tail E{}..E{exits} max |Δ| {t:.2e}", k + 1) } else { "no tail".into() };
            println!("E{k}: head E1..E{k} max |Δ| {h:.2e} · {tail} · {}", if *p { "ok" } else { "MISMATCH" });
        }
        println!(
            "{}",
            if ok { "every partition matches the full model" } else { "some partitions differ from the full model" }
        );
    }
    Ok(if ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

fn bench_cmd(a: &BenchArgs, opts: SessionOptions, threads: usize) -> Result<()> {
    let m = a.model.load()?;
    let ds = open_dataset(&a.data, &m)?;
    let batches: Vec<Tensor> =
        (0..ds.len()).step_by(a.data.batch).map(|f| make_batch(&ds, &m, f..(f + a.data.batch).min(ds.len()))).collect();
    let n: usize = batches.iter().map(Tensor::batch).sum();
    // Every early exit disabled: the segmented runner does exactly the whole graph's work, so
    // the ratio measures the cost of segmenting (extra sessions, cut hand-over), nothing else.
    let disabled = PolicyFile {
        version: 0,
        exits: m.meta.exits[..m.num_exits() - 1]
            .iter()
            .map(|e| crate::exit::ExitPolicy { name: e.name.clone(), disabled: true, ..Default::default() })
            .collect(),
    };
    let policy = Policy::resolve(&m.meta, &disabled)?;
    let mut whole = OrtGraph::from_bytes(&m.proto.encode_to_vec(), opts)?;
    let sample = Some(m.meta.input.shape.clone());
    let mut merged = SegmentedRunner::new(OrtBackend::new(&m, opts)?, 0, &policy, sample.clone())?;
    let mut split = SegmentedRunner::with_merging(OrtBackend::new(&m, opts)?, 0, &policy, sample, false)?;
    let time_whole = |w: &mut OrtGraph| -> Result<f64> {
        let s = Instant::now();
        for b in &batches {
            w.run(b)?;
        }
        Ok(s.elapsed().as_secs_f64())
    };
    let time_runner = |r: &mut SegmentedRunner<OrtBackend>| -> Result<f64> {
        let s = Instant::now();
        for b in &batches {
            r.run(b.clone())?;
        }
        Ok(s.elapsed().as_secs_f64())
    };
    // Warm-up: one pass each (allocations, kernel selection).
    for b in batches.iter().take(3) {
        whole.run(b)?;
        merged.run(b.clone())?;
        split.run(b.clone())?;
    }
    let mut t = [0f64; 3];
    for round in 0..a.rounds {
        // Rotate the order each round so that no runner always goes first.
        for i in 0..3 {
            match (round + i) % 3 {
                0 => t[0] += time_whole(&mut whole)?,
                1 => t[1] += time_runner(&mut merged)?,
                _ => t[2] += time_runner(&mut split)?,
            }
        }
    }
    let total = (n * a.rounds) as f64;
    let (s_whole, s_seg, s_split) = (total / t[0], total / t[1], total / t[2]);
    let (ratio, ratio_split) = (s_seg / s_whole, s_split / s_whole);
    if a.model.json {
        print_json(&json!({
            "model": m.name(), "samples": n, "batch": a.data.batch, "rounds": a.rounds, "threads": threads,
            "whole_graph_samples_per_second": s_whole, "segmented_samples_per_second": s_seg, "ratio": ratio,
            "per_exit_sessions_samples_per_second": s_split, "per_exit_sessions_ratio": ratio_split,
        }));
    } else {
        println!(
            "model {} · {} exits · {n} samples × {} rounds · batch {} · intra-op threads {}",
            m.name(),
            m.num_exits(),
            a.rounds,
            a.data.batch,
            if threads == 0 { "auto".to_string() } else { threads.to_string() }
        );
        let rows = [
            ("whole graph, 1 session".to_string(), s_whole, String::new()),
            (
                format!("segmented runner, exits off ({} session(s))", merged.groups().len()),
                s_seg,
                format!("ratio {ratio:.3} (target ≥ 0.95)"),
            ),
            (
                format!("segmented, boundary at every exit ({} sessions)", split.groups().len()),
                s_split,
                format!("ratio {ratio_split:.3}"),
            ),
        ];
        for (label, sps, note) in rows {
            println!("{label:<50} {sps:>8.1} samples/s  {note}");
        }
    }
    Ok(())
}
