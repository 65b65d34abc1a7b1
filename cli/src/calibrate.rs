//! `classynet calibrate`: exit thresholds chosen on data, written as a policy file that
//! `classynet run`, `cloud-server` and (through the cloud) every edge load as they are.
//!
//! The whole graph runs once over the calibration data on the same engine as the servers, every
//! exit's logits are scored with the runtime's own exit rule, and the choice is made by
//! [`classynet_runtime::calibrate`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use classynet_runtime::backend::Engine;
use classynet_runtime::calibrate::{
    assign, calibrate, evaluate_assignment, parse_assignment, Assignment, Calibration, Options, Scores, Target,
};
use classynet_runtime::exit::PolicyFile;
use classynet_runtime::model::Model;
use classynet_runtime::partition::segments;
use classynet_runtime::planner::segment_macs;
use classynet_runtime::{Error, Result};
use serde_json::json;

use crate::args::{load_policy, print_json, DataArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// What to aim for. precision=P: per exit, the largest threshold at which the samples
    /// leaving there are right at least a fraction P of the time (samples that left at an
    /// earlier exit not counted). accuracy-drop=D: the accuracy with early exits at most D
    /// points below the last exit's alone, spending the allowance where it saves the most
    /// MACs.
    #[arg(long, default_value = "precision=0.99", value_name = "precision=P|accuracy-drop=D")]
    pub target: String,
    /// Policy to start from (class sets, disabled exits); its thresholds are replaced. Default:
    /// the model's own. For a plain early-exit model this is where class gating is given.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Keep the thresholds; choose instead which classes each exit answers (a class stays when
    /// the samples leaving as it are right at least P of the time). Precision target only.
    #[arg(long)]
    pub classes_only: bool,
    /// Class-specific early exits (CS-EE): give every class at every exit a threshold of its
    /// own, the largest at which the samples leaving there as that class are right at least P
    /// of the time; a class no threshold serves does not leave at that exit. Precision target
    /// only.
    #[arg(long)]
    pub per_class: bool,
    /// Fewest eligible samples an exit (with --classes-only or --per-class: a class at an exit)
    /// needs before it is changed; below it, it keeps its threshold (with --per-class: the class
    /// does not leave there) and the report says so.
    #[arg(long, default_value_t = 30, value_name = "N")]
    pub min_support: usize,
    /// Precision target only: hold it with this confidence (e.g. 0.95), from a Clopper-Pearson
    /// upper bound on the error of the samples leaving, instead of on the observed precision.
    #[arg(long, value_name = "LEVEL")]
    pub confidence: Option<f64>,
    /// Version written into the policy (edges only ever move to a newer version).
    #[arg(long, default_value_t = 1)]
    pub policy_version: u64,
    /// Policy file to write (TOML; JSON when the name ends in .json).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(a: &CalibrateArgs, engine: Arc<dyn Engine>) -> Result<()> {
    let target: Target = a.target.parse()?;
    let opts = Options {
        target,
        min_support: a.min_support,
        confidence: a.confidence,
        classes_only: a.classes_only,
        per_class: a.per_class,
    };
    opts.check()?;
    let m = a.model.load()?;
    if !m.starts_at_input() || m.present.end != m.num_exits() {
        return Err(Error::Partition(format!("{} is a partition file; calibrate the full model", m.origin)));
    }
    let ds = a.data.open(&m)?;
    if ds.is_empty() {
        return Err(Error::Parse("no samples to calibrate on".into()));
    }
    let base = load_policy(a.policy.as_deref(), &m)?;
    // Exits the starting policy disables stay disabled; all others are calibrated.
    let fixed: Vec<bool> = match &a.policy {
        Some(p) => {
            let file = PolicyFile::load(p)?;
            m.meta.exits.iter().map(|e| file.exits.iter().any(|x| x.name == e.name && x.disabled)).collect()
        }
        None => Vec::new(),
    };
    let start = Instant::now();
    let scores = score(&m, &ds, &base, &engine, a.data.batch)?;
    let scored = start.elapsed();
    let segs = segments(&m)?;
    let macs = match segment_macs(&m, &segs) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!("MACs cannot be counted ({e}); compute is weighed in segments instead");
            None
        }
    };
    let t = Instant::now();
    let cal = calibrate(&m.meta, &base, &fixed, &scores, macs.as_deref(), &opts)?;
    let chosen = t.elapsed();
    let file = cal.policy_file(&m.meta, a.policy_version);
    if let Some(out) = &a.out {
        write_policy(out, &file, &cal, &m, &ds.name, a.data.samples.as_deref())?;
    }
    if a.model.json {
        print_json(&report_json(&cal, &m, &ds.name, a, scored.as_secs_f64(), chosen.as_secs_f64()));
    } else {
        print_report(&cal, &m, &ds.name, a.out.as_deref());
        eprintln!(
            "scored {} samples in {:.1} s ({} engine), chose thresholds in {:.3} s",
            scores.len(),
            scored.as_secs_f64(),
            engine.name(),
            chosen.as_secs_f64()
        );
    }
    Ok(())
}

/// Runs the whole graph over the data and scores every exit's logits with the exit rules.
fn score(
    m: &Model,
    ds: &classynet_runtime::dataset::Dataset,
    policy: &classynet_runtime::exit::Policy,
    engine: &Arc<dyn Engine>,
    batch: usize,
) -> Result<Scores> {
    let mut graph = engine.compile_for(&m.proto, &[batch])?;
    let names = graph.output_names().to_vec();
    let index: Vec<usize> = m
        .meta
        .exits
        .iter()
        .map(|e| {
            names.iter().position(|n| *n == e.logits).ok_or_else(|| {
                Error::Parse(format!("exit {} logits `{}` are not an output of the graph", e.name, e.logits))
            })
        })
        .collect::<Result<_>>()?;
    let mut scores = Scores::default();
    let progress = std::io::stderr().is_terminal();
    let n = ds.len();
    let mut next_report = n / 10;
    for first in (0..n).step_by(batch) {
        let range = first..(first + batch).min(n);
        let out = graph.run(&ds.batch(m, range.clone()))?;
        let blocks: Vec<&[f32]> = index.iter().map(|&i| out[i].data.as_slice()).collect();
        let labels: Vec<u32> = ds.labels[range.clone()].iter().map(|&y| y as u32).collect();
        scores.push(policy, &blocks, &labels)?;
        if progress && range.end >= next_report && range.end < n {
            eprint!("\rscoring: {}/{n} samples", range.end);
            next_report += n / 10;
        }
    }
    if progress {
        eprint!("\r\x1b[K");
    }
    Ok(scores)
}

fn fmt_threshold(t: Option<f32>) -> String {
    t.map_or("off".into(), |t| format!("{t:.4}"))
}

fn print_report(cal: &Calibration, m: &Model, data: &str, out: Option<&Path>) {
    println!("calibrated {} on {data} ({} samples), target {}", m.name(), cal.samples, cal.target);
    println!("exit  threshold (was)     reach  leave  right  precision  note");
    for (i, e) in cal.exits.iter().enumerate() {
        let last = i + 1 == cal.exits.len();
        let th = if last {
            "last".to_string()
        } else if e.class_thresholds.iter().any(Option::is_some) {
            format!("per class ({})", fmt_threshold(e.before))
        } else {
            format!("{} ({})", fmt_threshold(e.threshold), fmt_threshold(e.before))
        };
        let prec =
            if e.exited > 0 { format!("{:.2}%", 100.0 * e.correct as f64 / e.exited as f64) } else { "-".into() };
        println!(
            "{:<5} {:<19} {:>6} {:>6} {:>6} {:>10}  {}",
            e.name,
            th,
            e.reaching,
            e.exited,
            e.correct,
            prec,
            e.note.as_deref().unwrap_or("")
        );
    }
    if cal.exits.iter().any(|e| e.class_thresholds.iter().any(Option::is_some)) {
        println!("thresholds per class (nats; - : the class does not leave there):");
        print!("{:<20}", "class");
        for e in &cal.exits[..cal.exits.len() - 1] {
            print!("{:>9}", e.name);
        }
        println!();
        for c in 0..m.meta.num_classes() {
            print!("{:<20}", truncate(&m.meta.class_label(c), 20));
            for e in &cal.exits[..cal.exits.len() - 1] {
                match e.class_thresholds[c].filter(|_| e.allowed[c]) {
                    Some(t) => print!("{t:>9.4}"),
                    None => print!("{:>9}", "-"),
                }
            }
            println!();
        }
    }
    println!(
        "accuracy with early exits {:.2}% (last exit alone {:.2}%)",
        100.0 * cal.accuracy,
        100.0 * cal.final_accuracy
    );
    if cal.macs_counted {
        println!(
            "expected MACs per sample {:.2} M, against {:.2} M for the whole model ({:.2}x fewer)",
            cal.macs_per_sample / 1e6,
            cal.final_macs / 1e6,
            cal.final_macs / cal.macs_per_sample
        );
    }
    println!("share of each class leaving at each exit:");
    print!("{:<20}", "class");
    for e in &cal.exits {
        print!("{:>7}", e.name);
    }
    println!();
    for (c, row) in cal.class_exits.iter().enumerate() {
        let total: usize = row.iter().sum();
        if total == 0 {
            continue;
        }
        print!("{:<20}", truncate(&m.meta.class_label(c), 20));
        for &x in row {
            print!("{:>6.1}%", 100.0 * x as f64 / total as f64);
        }
        println!();
    }
    if let Some(out) = out {
        println!("wrote {} (serve it: cloud-server --policy {0}; check it: classynet run --policy {0})", out.display());
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn report_json(
    cal: &Calibration,
    m: &Model,
    data: &str,
    a: &CalibrateArgs,
    scored_s: f64,
    chosen_s: f64,
) -> serde_json::Value {
    json!({
        "model": m.name(),
        "dataset": data,
        "samples": cal.samples,
        "target": cal.target.to_string(),
        "accuracy": cal.accuracy,
        "final_exit_accuracy": cal.final_accuracy,
        "macs_per_sample": cal.macs_per_sample,
        "whole_model_macs": cal.final_macs,
        "macs_counted": cal.macs_counted,
        "exits": cal.exits.iter().enumerate().map(|(i, e)| json!({
            "name": e.name, "threshold": e.threshold.map(decimal), "before": e.before.map(decimal),
            "classes": e.allowed.iter().enumerate().filter(|(_, a)| **a).map(|(c, _)| c).collect::<Vec<_>>(),
            "class_thresholds": e.class_thresholds.iter().enumerate()
                .filter_map(|(c, t)| t.map(|t| (c.to_string(), json!(decimal(t)))))
                .collect::<serde_json::Map<_, _>>(),
            "enabled": i + 1 == cal.exits.len()
                || e.allowed.iter().enumerate().any(|(c, &a)| a && e.class_thresholds[c].or(e.threshold).is_some()),
            "reaching": e.reaching, "eligible": e.eligible, "count": e.exited, "correct": e.correct,
            "note": e.note,
        })).collect::<Vec<_>>(),
        "class_exits": cal.class_exits,
        "policy": a.out,
        "seconds": {"scoring": scored_s, "choosing": chosen_s},
    })
}

/// An f32 as the shortest decimal that reads back as it (0.4, not 0.4000000059604645), for JSON
/// readers that hold f64.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().expect("an f32 prints as a number")
}

/// Writes the policy, TOML with a header saying where it came from (JSON for a `.json` name).
fn write_policy(
    out: &Path,
    file: &classynet_runtime::exit::PolicyFile,
    cal: &Calibration,
    m: &Model,
    data: &str,
    samples: Option<&Path>,
) -> Result<()> {
    let json = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let text = if json {
        serde_json::to_string_pretty(file).expect("a policy serialises") + "\n"
    } else {
        let body = file.to_toml()?;
        format!(
            "# Written by classynet calibrate --target {}\n\
             # on {data} ({} samples{}),\n\
             # model {} (fingerprint {}). On that data: accuracy {:.2}% with early exits,\n\
             # {:.2}% at the last exit alone{}.\n{body}",
            cal.target,
            cal.samples,
            samples.map(|p| format!(", those of {}", p.display())).unwrap_or_default(),
            m.name(),
            m.fingerprint,
            100.0 * cal.accuracy,
            100.0 * cal.final_accuracy,
            if cal.macs_counted {
                format!(";\n# {:.2} M MACs per sample against {:.2} M", cal.macs_per_sample / 1e6, cal.final_macs / 1e6)
            } else {
                String::new()
            }
        )
    };
    std::fs::write(out, text).map_err(|e| Error::io(out, e))
}

#[derive(Debug, Args)]
pub struct AssignArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Precision every early exit is calibrated to, for every assignment tried.
    #[arg(long, default_value = "precision=0.99", value_name = "precision=P")]
    pub target: String,
    /// Share of the traffic per class: `uniform`, or one number per class, comma-separated
    /// (normalised), e.g. a camera that mostly sees class 0.
    #[arg(long, default_value = "uniform", value_name = "uniform|S0,S1,..")]
    pub prior: String,
    /// A fixed assignment to compare with, as the trainer's --assign takes it (the paper's
    /// Fashion-MNIST one is 9;8;6;1;7;0).
    #[arg(long, value_name = "ASSIGN")]
    pub compare: Option<String>,
    /// Fewest eligible samples an exit needs before its threshold is changed.
    #[arg(long, default_value_t = 30, value_name = "N")]
    pub min_support: usize,
    /// Version written into the policy.
    #[arg(long, default_value_t = 1)]
    pub policy_version: u64,
    /// Policy file to write: the proposed class gating with its calibrated thresholds.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `classynet assign`: which classes each exit of a plain-exit model should answer.
pub fn run_assign(a: &AssignArgs, engine: Arc<dyn Engine>) -> Result<()> {
    let target: Target = a.target.parse()?;
    let m = a.model.load()?;
    if !m.starts_at_input() || m.present.end != m.num_exits() {
        return Err(Error::Partition(format!("{} is a partition file; assign classes on the full model", m.origin)));
    }
    let ds = a.data.open(&m)?;
    let k = m.meta.num_classes();
    let prior: Vec<f64> = if a.prior.trim() == "uniform" {
        vec![1.0; k]
    } else {
        a.prior
            .split(',')
            .map(|x| x.trim().parse::<f64>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .ok()
            .filter(|v| v.len() == k)
            .ok_or_else(|| {
                Error::Parse(format!("--prior `{}`: expected uniform or {k} comma-separated shares", a.prior))
            })?
    };
    let opts = Options { target, min_support: a.min_support, confidence: None, ..Options::default() };
    // Scored with every class allowed at every exit: gating is what the search chooses.
    let open = classynet_runtime::exit::Policy::defaults(&m.meta);
    let start = Instant::now();
    let scores = score(&m, &ds, &open, &engine, a.data.batch)?;
    let macs = segment_macs(&m, &segments(&m)?).ok();
    let best = assign(&m.meta, &scores, macs.as_deref(), &prior, &opts)?;
    let total: f64 = prior.iter().sum();
    let norm: Vec<f64> = prior.iter().map(|p| p / total).collect();
    let none =
        evaluate_assignment(&m.meta, &scores, macs.as_deref(), &norm, &vec![Vec::new(); m.num_exits() - 1], &opts)?;
    let compare = match &a.compare {
        Some(text) => {
            let fixed = parse_assignment(text, m.num_exits() - 1, k)?;
            Some(evaluate_assignment(&m.meta, &scores, macs.as_deref(), &norm, &fixed, &opts)?)
        }
        None => None,
    };
    if let Some(out) = &a.out {
        let mut file = best.calibration.policy_file(&m.meta, a.policy_version);
        // The gating is the point: every early exit lists its classes, changed or not.
        let gating = classynet_runtime::calibrate::gating_policy(&m.meta, &best.new_classes);
        for (e, g) in file.exits.iter_mut().zip(gating.exits) {
            e.classes = g.classes;
        }
        write_policy(out, &file, &best.calibration, &m, &ds.name, a.data.samples.as_deref())?;
    }
    let unit = if macs.is_some() { "M MACs" } else { "segments" };
    let scale = if macs.is_some() { 1e6 } else { 1.0 };
    let describe = |label: &str, x: &Assignment| {
        println!(
            "{label:<22} {:<24} expected {:>8.2} {unit} per sample, accuracy {:.2}%",
            if x.new_classes.iter().all(Vec::is_empty) { "(none)".to_string() } else { x.assign_string() },
            x.expected_cost / scale,
            100.0 * x.calibration.accuracy
        );
    };
    if a.model.json {
        let j = |x: &Assignment| {
            json!({
                "assign": x.assign_string(), "expected_cost": x.expected_cost, "accuracy": x.calibration.accuracy,
                "exit_counts": x.calibration.exits.iter().map(|e| e.exited).collect::<Vec<_>>(),
            })
        };
        print_json(&json!({
            "model": m.name(), "samples": scores.len(), "target": target.to_string(), "cost_unit": unit,
            "prior": norm, "proposed": j(&best), "no_assignment": j(&none),
            "compared": compare.as_ref().map(j), "policy": a.out,
        }));
        return Ok(());
    }
    println!(
        "class-to-exit assignment for {} on {} ({} samples), every exit at {target}",
        m.name(),
        ds.name,
        scores.len()
    );
    describe("proposed", &best);
    if let Some(c) = &compare {
        describe("compared (--compare)", c);
    }
    describe("no early exits", &none);
    for (e, add) in best.new_classes.iter().enumerate() {
        let names: Vec<String> = add.iter().map(|&c| m.meta.class_label(c as usize)).collect();
        println!(
            "  {} adds {}",
            m.meta.exits[e].name,
            if names.is_empty() { "nothing".into() } else { names.join(", ") }
        );
    }
    println!(
        "train it: classynet-train train --mode cn+c --assign '{}' ...; or serve this model gated: {}",
        best.assign_string(),
        a.out.as_ref().map_or("give --out FILE".to_string(), |p| format!("cloud-server --policy {}", p.display()))
    );
    eprintln!("searched in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
