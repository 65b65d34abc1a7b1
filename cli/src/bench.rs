//! `classynet bench`: whole graph against the segmented runner, side by side in one run.

use std::time::Instant;

use clap::Args;
use classynet_runtime::backend::Tensor;
use classynet_runtime::exit::{ExitPolicy, Policy, PolicyFile};
use classynet_runtime::ort_backend::{OrtBackend, OrtGraph, SessionOptions};
use classynet_runtime::runner::SegmentedRunner;
use classynet_runtime::Result;
use prost::Message;
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
}

pub fn run(a: &BenchArgs, opts: SessionOptions, threads: usize) -> Result<()> {
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
