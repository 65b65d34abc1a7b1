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
    /// first, so all see the same machine load.
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
            "model": m.name(), "backend": engine.name(), "samples": n, "batch": a.data.batch, "rounds": a.rounds, "threads": threads,
            "whole_graph_samples_per_second": s_whole, "segmented_samples_per_second": s_seg, "ratio": ratio,
            "per_exit_sessions_samples_per_second": s_split, "per_exit_sessions_ratio": ratio_split,
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

/// One contender of the engine comparison: a graph (a head, or the whole model) on one engine.
struct Contender {
    graph: Box<dyn Graph>,
    seconds: f64,
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
                .map(|e| Ok(Contender { graph: e.compile_for(&g.proto, &[batch])?, seconds: 0.0 }))
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
                    k.seconds += s.elapsed().as_secs_f64();
                }
            }
            let sps: Vec<f64> = c.iter().map(|k| (n * a.rounds) as f64 / k.seconds).collect();
            rows.push((label.clone(), batch, sps[0], sps[1], sps[1] / sps[0]));
        }
    }
    if a.model.json {
        print_json(&json!({
            "model": m.name(), "samples": ds.len(), "rounds": a.rounds, "threads": opts.threads,
            "rows": rows.iter().map(|(g, b, o, t, r)| json!({
                "graph": g, "batch": b, "ort_samples_per_second": o, "tract_samples_per_second": t,
                "tract_over_ort": r,
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
        println!(
            "{:<14} {:>5} {:>14} {:>14} {:>12}",
            "graph", "batch", "ort samples/s", "tract samples/s", "tract/ort"
        );
        for (g, b, o, t, r) in &rows {
            println!("{g:<14} {b:>5} {o:>14.1} {t:>15.1} {r:>12.3}");
        }
    }
    Ok(())
}
