//! `classynet plan`: the memory cost of every partition, and the deepest one that fits a budget.

use clap::Args;
use classynet_runtime::partition::segments;
use classynet_runtime::planner::{choose, human, parse_size, plan, Formula};
use classynet_runtime::{Error, Result};
use serde_json::json;

use crate::args::{print_json, ModelArgs};

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

pub fn run(a: &PlanArgs) -> Result<()> {
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
