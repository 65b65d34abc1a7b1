//! `classynet verify-split`: head + tail of every partition against the full model.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use classynet_runtime::backend::Engine;
use classynet_runtime::backend::Tensor;
use classynet_runtime::format::PartitionRole;
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::Result;
use serde_json::json;

use crate::args::{print_json, DataArgs, ModelArgs};

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

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    if a.shape != b.shape {
        return f32::INFINITY;
    }
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn run(a: &VerifyArgs, engine: Arc<dyn Engine>) -> Result<ExitCode> {
    let m = a.model.load()?;
    let mut data = DataArgs {
        dataset: a.data.dataset.clone(),
        data_dir: a.data.data_dir.clone(),
        limit: a.data.limit.or(Some(256)),
        batch: a.data.batch,
        samples: a.data.samples.clone(),
    };
    if data.batch == 16 {
        data.batch = 64;
    }
    let ds = data.open(&m)?;
    let segs = segments(&m)?;
    let mut full = engine.compile(&m.proto)?;
    let exits = m.num_exits();
    let batches: Vec<Tensor> =
        (0..ds.len()).step_by(data.batch).map(|f| ds.batch(&m, f..(f + data.batch).min(ds.len()))).collect();
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
        let mut head = engine.compile(&head)?;
        let mut tail = if k < exits {
            Some(engine.compile(&extract_side(
                &m,
                &segs,
                &Side::parse(&format!("E{k}"), PartitionRole::Tail, exits)?,
            )?)?)
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
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
