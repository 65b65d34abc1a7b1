//! `classynet plan`: the memory cost of every partition, the engine's own resident baseline
//! beside it, and the deepest partition (and, with `--batch auto`, the largest batch) that fits a
//! budget.
//!
//! The planner counts what the model needs (weights + peak activations). An engine holds memory
//! of its own before any model is loaded: ONNX Runtime maps a ~20 MB library and creates its
//! environment and thread pool; tract is part of the binary. That baseline is measured, not
//! estimated: each compiled-in engine is opened in a fresh child process (this binary, with the
//! hidden `--measure-baseline`) that prints its `VmRSS`, so one engine's pages never count for
//! another.

use std::path::Path;
use std::process::Command;

use clap::Args;
use classynet_runtime::engine::{self, BackendChoice, EngineOptions};
use classynet_runtime::model::Model;
use classynet_runtime::partition::{segments, Segment};
use classynet_runtime::planner::{
    choose_batch, human, parse_size, plan, resident, BatchChoice, BatchPlan, Formula, PartitionCost,
};
use classynet_runtime::{Error, Result};
use serde_json::{json, Value};

use crate::args::{print_json, ModelArgs};

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch size the edge runs: N samples (the paper's edge batch is 16), or `auto` for the
    /// largest batch up to 16 (`auto:N`: up to N) with which some partition fits --budget: a
    /// small budget then gets E1 at a small batch instead of nothing. Also spelled --max-batch,
    /// as on edge-agent, which takes the same values.
    #[arg(long, visible_alias = "max-batch", default_value = "16", value_name = "N|auto|auto:N")]
    pub batch: BatchChoice,
    /// Memory budget of the edge, e.g. 470kB, 2.31MB, 28.5MiB (MB = 10^6 B, MiB = 2^20 B).
    #[arg(long, value_name = "SIZE")]
    pub budget: Option<String>,
    /// What the budget is compared with: the runtime's weights + activations, or the paper's
    /// params × 4 B × batch.
    #[arg(long, value_enum, default_value_t = Formula::Runtime)]
    pub formula: Formula,
    /// Take the measured resident baseline of the --backend engine (auto: ONNX Runtime where it
    /// loads, otherwise tract) off the budget before choosing, so the chosen partition and the
    /// exit status say whether the whole process fits. Without it the budget is the model's
    /// alone, as in the paper, and the baseline is only shown.
    #[arg(long, requires = "budget")]
    pub count_baseline: bool,
    /// Internal: open the engine of --backend, print this process's resident memory as JSON and
    /// exit (how `plan` measures each engine's baseline in a fresh process).
    #[arg(long, hide = true)]
    pub measure_baseline: bool,
}

/// One engine's measured baseline.
struct Baseline {
    backend: &'static str,
    /// Resident bytes with the engine open and no model loaded, or why it could not be measured.
    rss: std::result::Result<u64, String>,
}

/// One verdict: the plan for a budget with or without a baseline counted.
struct Verdict {
    /// `None`: the model's own budget; `Some(name)`: that engine's baseline taken off.
    baseline: Option<(&'static str, u64)>,
    result: Result<BatchPlan>,
}

/// Runs `plan` with the engine flags of this command line (`--backend` picks the baseline that
/// `--count-baseline` subtracts).
pub fn run(a: &PlanArgs, opts: &EngineOptions) -> Result<()> {
    if a.measure_baseline {
        return measure_baseline(opts);
    }
    let m = a.model.load()?;
    if m.present != (0..m.num_exits()) {
        return Err(Error::Partition(format!("{} is a partition file; plan the full model", m.origin)));
    }
    let segs = segments(&m)?;
    let budget = a.budget.as_deref().map(parse_size).transpose()?;
    let baselines = measure_baselines(&a.model.model, opts);
    let selected = selected_backend(opts.backend, &baselines);

    let verdicts: Vec<Verdict> = match budget {
        None => Vec::new(),
        Some(b) => std::iter::once(Verdict { baseline: None, result: choose_for(&m, &segs, a, b) })
            .chain(baselines.iter().filter_map(|base| {
                let rss = *base.rss.as_ref().ok()?;
                let result = choose_for(&m, &segs, a, b.saturating_sub(rss));
                Some(Verdict { baseline: Some((base.backend, rss)), result })
            }))
            .collect(),
    };
    // The verdict that decides the exit status: the model's own, or with --count-baseline the
    // selected engine's.
    let decisive: Option<&Verdict> = match (budget, a.count_baseline) {
        (None, _) => None,
        (Some(_), false) => verdicts.first(),
        (Some(_), true) => {
            let name = selected.ok_or_else(|| {
                Error::RuntimeLibrary(format!(
                    "--count-baseline: no engine of this build could be measured ({})",
                    baselines
                        .iter()
                        .map(|b| format!("{}: {}", b.backend, b.rss.as_ref().err().unwrap()))
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            })?;
            let v = verdicts.iter().find(|v| v.baseline.is_some_and(|(n, _)| n == name));
            Some(v.ok_or_else(|| {
                let why = baselines.iter().find(|b| b.backend == name).and_then(|b| b.rss.clone().err());
                Error::RuntimeLibrary(format!(
                    "--count-baseline: the {name} baseline could not be measured: {}",
                    why.unwrap_or_else(|| "not in this build".into())
                ))
            })?)
        }
    };
    // The table is shown at the batch the decisive verdict chose, else at the largest allowed.
    let batch = match decisive.map(|v| &v.result) {
        Some(Ok(p)) => p.batch,
        _ => a.batch.max(),
    };
    let costs = plan(&m, &segs, batch);

    if a.model.json {
        print_json(&to_json(&m, a, budget, batch, &costs, &baselines, selected, &verdicts, decisive));
    } else {
        print_text(&m, a, budget, batch, &costs, &baselines, &verdicts, decisive);
    }
    match decisive {
        Some(Verdict { result: Err(e), baseline, .. }) => Err(Error::Parse(match (baseline, budget) {
            (Some((name, rss)), Some(b)) => format!(
                "budget {} − {name} baseline {} leaves {} for the model: {e}",
                human(b),
                human(*rss),
                human(b.saturating_sub(*rss))
            ),
            _ => e.to_string(),
        })),
        _ => Ok(()),
    }
}

/// The plan for one budget: at the fixed batch, or the largest batch that fits for `auto`.
fn choose_for(m: &Model, segs: &[Segment], a: &PlanArgs, budget: u64) -> Result<BatchPlan> {
    match a.batch {
        BatchChoice::Fixed(b) => {
            let costs = plan(m, segs, b);
            let (index, why) = classynet_runtime::planner::choose(&costs, budget, a.formula)?;
            Ok(BatchPlan { batch: b, index, costs, why })
        }
        BatchChoice::Auto { max } => choose_batch(max, budget, a.formula, |b| plan(m, segs, b)),
    }
}

/// The engine whose baseline `--count-baseline` takes off: the one asked for, or for `auto`
/// what [`engine::open`] would pick (ONNX Runtime where it loads, otherwise tract).
fn selected_backend(choice: BackendChoice, baselines: &[Baseline]) -> Option<&'static str> {
    match choice {
        BackendChoice::Ort => Some("ort"),
        BackendChoice::Tract => Some("tract"),
        BackendChoice::Auto => baselines.iter().find(|b| b.rss.is_ok()).map(|b| b.backend),
    }
}

/// The child's side: open the engine (for ONNX Runtime: load the library, create the
/// environment and its thread pool; for tract: set its thread pool) and nothing else, then
/// print the resident memory. No graph is compiled: a graph's memory is the model's, which the
/// planner counts; the baseline is what every model pays on top.
fn measure_baseline(opts: &EngineOptions) -> Result<()> {
    let engine = engine::open(opts)?;
    let r = resident().ok_or_else(|| Error::RuntimeLibrary("no /proc/self/status on this system".into()))?;
    println!("{}", json!({ "backend": engine.name(), "rss_bytes": r.rss_bytes, "peak_bytes": r.peak_bytes }));
    Ok(())
}

/// Measures every compiled-in engine in a fresh process of this binary.
fn measure_baselines(model: &Path, opts: &EngineOptions) -> Vec<Baseline> {
    engine::built_in().iter().map(|&backend| Baseline { backend, rss: measure_one(backend, model, opts) }).collect()
}

fn measure_one(backend: &str, model: &Path, opts: &EngineOptions) -> std::result::Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--backend", backend, "--threads", &opts.threads.to_string()]);
    if let Some(lib) = &opts.ort_lib {
        cmd.arg("--ort-lib").arg(lib);
    }
    // --model is required by the flags; the child does not read it.
    cmd.args(["plan", "--measure-baseline", "--model"]).arg(model);
    let out = cmd.output().map_err(|e| format!("cannot start {}: {e}", cmd.get_program().to_string_lossy()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.trim().trim_start_matches("error: ").to_string());
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("unreadable answer from the probe: {e}"))?;
    v["rss_bytes"].as_u64().ok_or_else(|| format!("the probe printed no rss_bytes: {v}"))
}

fn verdict_name(v: &Verdict) -> String {
    match v.baseline {
        None => "without the baseline".into(),
        Some((name, rss)) => format!("with the {name} baseline ({})", human(rss)),
    }
}

#[allow(clippy::too_many_arguments)]
fn print_text(
    m: &Model,
    a: &PlanArgs,
    budget: Option<u64>,
    batch: usize,
    costs: &[PartitionCost],
    baselines: &[Baseline],
    verdicts: &[Verdict],
    decisive: Option<&Verdict>,
) {
    let batch_note = if a.batch.is_auto() { format!(" (--batch {})", a.batch) } else { String::new() };
    println!("model {} · batch {batch}{batch_note} · M = {} exits", m.name(), m.num_exits());
    let measured: Vec<(&str, u64)> =
        baselines.iter().filter_map(|b| Some((b.backend, *b.rss.as_ref().ok()?))).collect();
    println!("engine baseline (resident with the engine open and no model, measured in a fresh process):");
    for b in baselines {
        match &b.rss {
            Ok(rss) => println!("  {:<5} {}", b.backend, human(*rss)),
            Err(e) => println!("  {:<5} not measured: {e}", b.backend),
        }
    }
    print!(
        "{:<4} {:>10} {:>11} {:>14} {:>11} {:>14}",
        "part", "params", "weights", "activations", "total", "paper(p×4×B)"
    );
    for (name, _) in &measured {
        print!(" {:>11}", format!("+{name}"));
    }
    println!();
    for c in costs {
        let approx =
            if c.unknown_shapes > 0 { format!("≥{}", human(c.activation_bytes)) } else { human(c.activation_bytes) };
        print!(
            "{:<4} {:>10} {:>11} {:>14} {:>11} {:>14}",
            c.name,
            c.params,
            human(c.weight_bytes),
            approx,
            human(c.total()),
            human(c.paper_bytes())
        );
        for (_, rss) in &measured {
            print!(" {:>11}", human(c.total() + rss));
        }
        println!();
    }
    if costs.iter().any(|c| c.unknown_shapes > 0) {
        println!("≥: some tensors have no declared shape (run onnx.shape_inference.infer_shapes on the export)");
    }
    if !measured.is_empty() {
        println!("+engine: total + that engine's baseline, what the process holds at least");
    }
    if let Some(b) = budget {
        println!("budget {}:", human(b));
        for v in verdicts {
            let mark = if decisive.is_some_and(|d| std::ptr::eq(d, v)) { "*" } else { " " };
            match &v.result {
                Ok(p) => println!("{mark} {}: E{} at batch {}; {}", verdict_name(v), p.index + 1, p.batch, p.why),
                Err(e) => println!("{mark} {}: nothing fits; {e}", verdict_name(v)),
            }
        }
        println!(
            "* decides the exit status{}",
            if a.count_baseline { "" } else { " (--count-baseline: the --backend engine's line)" }
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn to_json(
    m: &Model,
    a: &PlanArgs,
    budget: Option<u64>,
    batch: usize,
    costs: &[PartitionCost],
    baselines: &[Baseline],
    selected: Option<&str>,
    verdicts: &[Verdict],
    decisive: Option<&Verdict>,
) -> Value {
    let verdict_json = |v: &Verdict| match &v.result {
        Ok(p) => json!({
            "baseline_backend": v.baseline.map(|(n, _)| n), "baseline_bytes": v.baseline.map(|(_, b)| b),
            "chosen": p.chosen().name, "batch": p.batch, "total_bytes": p.chosen().total(),
            "explanation": p.why, "error": null,
        }),
        Err(e) => json!({
            "baseline_backend": v.baseline.map(|(n, _)| n), "baseline_bytes": v.baseline.map(|(_, b)| b),
            "chosen": null, "batch": null, "total_bytes": null, "explanation": null, "error": e.to_string(),
        }),
    };
    let (chosen, why, err) = match decisive.map(|v| &v.result) {
        Some(Ok(p)) => (Some(p.chosen().name.clone()), Some(p.why.clone()), None),
        Some(Err(e)) => (None, None, Some(e.to_string())),
        None => (None, None, None),
    };
    let measured: Vec<(&str, u64)> =
        baselines.iter().filter_map(|b| Some((b.backend, *b.rss.as_ref().ok()?))).collect();
    json!({
        "model": m.name(), "batch": batch, "batch_setting": a.batch.to_string(), "max_batch": a.batch.max(),
        "budget_bytes": budget, "formula": format!("{:?}", a.formula).to_lowercase(),
        "count_baseline": a.count_baseline, "backend": selected,
        "baseline_bytes": decisive.and_then(|v| v.baseline.map(|(_, b)| b)),
        "chosen": chosen, "explanation": why, "error": err,
        "baselines": baselines.iter().map(|b| match &b.rss {
            Ok(rss) => json!({ "backend": b.backend, "rss_bytes": rss, "error": null }),
            Err(e) => json!({ "backend": b.backend, "rss_bytes": null, "error": e }),
        }).collect::<Vec<_>>(),
        "verdicts": verdicts.iter().map(verdict_json).collect::<Vec<_>>(),
        "partitions": costs.iter().map(|c| json!({
            "name": c.name, "exits_on_edge": c.k, "params": c.params, "weight_bytes": c.weight_bytes,
            "activation_bytes": c.activation_bytes, "total_bytes": c.total(),
            "paper_formula_bytes": c.paper_bytes(), "unknown_shapes": c.unknown_shapes,
            "total_with_baseline_bytes": measured.iter().map(|(n, rss)| ((*n).to_string(), json!(c.total() + rss)))
                .collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}
