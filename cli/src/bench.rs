//! `classynet bench`: whole graph against the segmented runner, or (`--compare-backends`) the
//! inference engines against each other; always side by side in one run, rounds rotating which
//! goes first, so that every contender sees the same machine load.

use std::time::Instant;

use clap::Args;
use classynet_runtime::backend::{EngineBackend, Graph, Tensor};
use classynet_runtime::engine::{self, BackendChoice, EngineOptions};
use classynet_runtime::exit::{ExitPolicy, Policy, PolicyFile};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::Model;
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::runner::SegmentedRunner;
use classynet_runtime::{Error, Result};
use serde_json::json;

use crate::args::{print_json, DataArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Timed rounds; each round runs every batch once through each runner, rotating which goes
    /// first, so all see the same machine load. Ratios are printed as the median and range of
    /// the per-round ratios.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Compare ONNX Runtime and tract instead: samples/s of the heads of these partitions and
    /// of the whole model, at each --batch-sizes, and tract's throughput over ONNX Runtime's.
    #[arg(long)]
    pub compare_backends: bool,
    /// With --compare-backends: the partitions whose heads are timed (those past the model's
    /// last exit are skipped).
    #[arg(long, value_delimiter = ',', default_value = "E1,E2,E4", value_name = "Ek,..")]
    pub heads: Vec<String>,
    /// With --compare-backends: the batch sizes timed.
    #[arg(long, value_delimiter = ',', default_value = "1,16", value_name = "N,..")]
    pub batch_sizes: Vec<usize>,
}

pub fn run(a: &BenchArgs, opts: &EngineOptions) -> Result<()> {
    if a.rounds == 0 {
        return Err(Error::Parse("--rounds: expected at least 1 timed round, found 0".into()));
    }
    if a.compare_backends {
        return compare_backends(a, opts);
    }
    let engine = engine::open(opts)?;
    let threads = opts.threads;
    let m = a.model.load()?;
    let ds = a.data.open(&m)?;
    let batches: Vec<Tensor> =
        (0..ds.len()).step_by(a.data.batch).map(|f| ds.batch(&m, f..(f + a.data.batch).min(ds.len()))).collect();
    let n: usize = batches.iter().map(Tensor::batch).sum();
    // Every early exit disabled: the segmented runner does exactly the whole graph's work, so
    // the ratio measures the cost of segmenting (extra sessions, cut hand-over), nothing else.
    let disabled = PolicyFile {
        version: 0,
        exits: m.meta.exits[..m.num_exits() - 1]
            .iter()
            .map(|e| ExitPolicy { name: e.name.clone(), disabled: true, ..Default::default() })
            .collect(),
    };
    let policy = Policy::resolve(&m.meta, &disabled)?;
    // Every contender plans for the batch size timed (tract fixes its shapes for it).
    let planned = [a.data.batch];
    let mut whole = engine.compile_for(&m.proto, &planned)?;
    let sample = Some(m.meta.input.shape.clone());
    let backend = || EngineBackend::new(engine.clone(), &m).map(|b| b.with_batches(&planned));
    let mut merged = SegmentedRunner::new(backend()?, 0, &policy, sample.clone())?;
    let mut split = SegmentedRunner::with_merging(backend()?, 0, &policy, sample, false)?;
    let time_whole = |w: &mut Box<dyn Graph>| -> Result<f64> {
        let s = Instant::now();
        for b in &batches {
            w.run(b)?;
        }
        Ok(s.elapsed().as_secs_f64())
    };
    let time_runner = |r: &mut SegmentedRunner<EngineBackend>| -> Result<f64> {
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
    // Seconds of each contender in each round: a ratio per round, so the spread shows how much
    // of a difference is the machine's noise.
    let mut t = vec![[0f64; 3]; a.rounds];
    for (round, times) in t.iter_mut().enumerate() {
        // Rotate the order each round so that no runner always goes first.
        for i in 0..3 {
            match (round + i) % 3 {
                0 => times[0] = time_whole(&mut whole)?,
                1 => times[1] = time_runner(&mut merged)?,
                _ => times[2] = time_runner(&mut split)?,
            }
        }
    }
    let per_round = n as f64;
    let sps = |k: usize| Spread::of(t.iter().map(|r| per_round / r[k]).collect());
    let (s_whole, s_seg, s_split) = (sps(0), sps(1), sps(2));
    let ratio = Spread::of(t.iter().map(|r| r[0] / r[1]).collect());
    let ratio_split = Spread::of(t.iter().map(|r| r[0] / r[2]).collect());
    const TARGET_MERGED: f64 = 0.95;
    const TARGET_SPLIT: f64 = 0.96;
    if a.model.json {
        print_json(&json!({
            "model": m.name(), "backend": engine.name(), "samples": n, "batch": a.data.batch, "rounds": a.rounds, "threads": threads,
            "whole_graph_samples_per_second": s_whole.median, "segmented_samples_per_second": s_seg.median,
            "ratio": ratio.json(TARGET_MERGED),
            "per_exit_sessions_samples_per_second": s_split.median, "per_exit_sessions_ratio": ratio_split.json(TARGET_SPLIT),
        }));
    } else {
        println!(
            "model {} · {} · {} exits · {n} samples × {} rounds · batch {} · threads {}",
            m.name(),
            engine.name(),
            m.num_exits(),
            a.rounds,
            a.data.batch,
            if threads == 0 { "auto".to_string() } else { threads.to_string() }
        );
        println!("samples/s and ratios to the whole graph: median (min–max) of the rounds");
        let rows = [
            ("whole graph, 1 session".to_string(), &s_whole, String::new()),
            (
                format!("segmented runner, exits off ({} session(s))", merged.groups().len()),
                &s_seg,
                format!("ratio {}", ratio.verdict(TARGET_MERGED)),
            ),
            (
                format!("segmented, boundary at every exit ({} sessions)", split.groups().len()),
                &s_split,
                format!("ratio {}", ratio_split.verdict(TARGET_SPLIT)),
            ),
        ];
        for (label, sps, note) in rows {
            println!("{label:<50} {:>8.1} ({:.1}–{:.1}) samples/s  {note}", sps.median, sps.min, sps.max);
        }
    }
    Ok(())
}

/// The median and range of one figure over the rounds of a benchmark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Of at least one value.
    pub fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
        Spread { median, min: v[0], max: v[v.len() - 1] }
    }

    /// Whether a ratio with this spread meets a "≥ target": only when every round did; when
    /// the rounds fall on both sides the machine's noise is larger than the difference.
    pub fn judge(&self, target: f64) -> &'static str {
        if self.min >= target {
            "met"
        } else if self.max < target {
            "not met"
        } else {
            "spread crosses the target"
        }
    }

    fn verdict(&self, target: f64) -> String {
        format!("{:.3} ({:.3}–{:.3}), target ≥ {target}: {}", self.median, self.min, self.max, self.judge(target))
    }

    fn json(&self, target: f64) -> serde_json::Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "target": target, "verdict": self.judge(target)})
    }
}

/// One contender of the engine comparison: a graph (a head, or the whole model) on one engine.
struct Contender {
    graph: Box<dyn Graph>,
    /// Seconds of each round.
    seconds: Vec<f64>,
}

/// Times the heads and the whole model on ONNX Runtime and tract, batch by batch size.
fn compare_backends(a: &BenchArgs, opts: &EngineOptions) -> Result<()> {
    let ort = engine::open(&EngineOptions { backend: BackendChoice::Ort, ..opts.clone() })?;
    let tract = engine::open(&EngineOptions { backend: BackendChoice::Tract, ..opts.clone() })?;
    let m = a.model.load()?;
    let ds = a.data.open(&m)?;
    let exits = m.num_exits();
    let segs = segments(&m)?;
    // The graphs: each head asked for that the model has, then the whole model.
    let mut graphs: Vec<(String, Model)> = Vec::new();
    for name in &a.heads {
        let side = Side::parse(name, PartitionRole::Head, exits)?;
        if side.exits(exits).end >= exits {
            continue; // a head with every exit is the whole model, timed below
        }
        let proto = extract_side(&m, &segs, &side)?;
        graphs.push((format!("head {name}"), Model::from_bytes(&prost::Message::encode_to_vec(&proto), name)?));
    }
    graphs.push(("whole model".to_string(), m.clone()));

    let mut rows = Vec::new();
    for &batch in &a.batch_sizes {
        if batch == 0 || batch > ds.len() {
            return Err(Error::Parse(format!("--batch-sizes: {batch} is not between 1 and {} samples", ds.len())));
        }
        let inputs: Vec<Tensor> = (0..ds.len() / batch).map(|i| ds.batch(&m, i * batch..(i + 1) * batch)).collect();
        let n = inputs.len() * batch;
        for (label, g) in &graphs {
            let mut c: Vec<Contender> = [&ort, &tract]
                .iter()
                .map(|e| Ok(Contender { graph: e.compile_for(&g.proto, &[batch])?, seconds: Vec::new() }))
                .collect::<Result<_>>()?;
            for x in inputs.iter().take(2) {
                for k in c.iter_mut() {
                    k.graph.run(x)?; // warm-up: allocations, kernel choice
                }
            }
            for round in 0..a.rounds {
                for i in 0..c.len() {
                    let k = &mut c[(round + i) % 2];
                    let s = Instant::now();
                    for x in &inputs {
                        k.graph.run(x)?;
                    }
                    k.seconds.push(s.elapsed().as_secs_f64());
                }
            }
            let sps: Vec<f64> = c.iter().map(|k| n as f64 / Spread::of(k.seconds.clone()).median).collect();
            let ratio = Spread::of(c[0].seconds.iter().zip(&c[1].seconds).map(|(o, t)| o / t).collect());
            rows.push((label.clone(), batch, sps[0], sps[1], ratio));
        }
    }
    if a.model.json {
        print_json(&json!({
            "model": m.name(), "samples": ds.len(), "rounds": a.rounds, "threads": opts.threads,
            "rows": rows.iter().map(|(g, b, o, t, r)| json!({
                "graph": g, "batch": b, "ort_samples_per_second": o, "tract_samples_per_second": t,
                "tract_over_ort": {"median": r.median, "min": r.min, "max": r.max},
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "model {} · {} samples × {} rounds · threads {}",
            m.name(),
            ds.len(),
            a.rounds,
            if opts.threads == 0 { "auto".to_string() } else { opts.threads.to_string() }
        );
        println!("samples/s from each engine's median round; tract/ort: median (min–max) of the per-round ratios");
        println!(
            "{:<14} {:>5} {:>14} {:>14} {:>24}",
            "graph", "batch", "ort samples/s", "tract samples/s", "tract/ort"
        );
        for (g, b, o, t, r) in &rows {
            let ratio = format!("{:.3} ({:.3}–{:.3})", r.median, r.min, r.max);
            println!("{g:<14} {b:>5} {o:>14.1} {t:>15.1} {ratio:>24}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn a_spread_is_judged_met_only_when_every_round_meets_the_target() {
        let s = Spread::of(vec![0.97, 0.95, 0.99, 0.96]);
        assert_eq!((s.median, s.min, s.max), (0.965, 0.95, 0.99));
        assert_eq!(s.judge(0.95), "met");
        assert_eq!(s.judge(0.96), "spread crosses the target");
        assert_eq!(s.judge(1.0), "not met");
        assert_eq!(Spread::of(vec![0.9, 0.8, 1.0]).median, 0.9);
    }
}
