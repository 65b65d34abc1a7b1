//! `classynet inspect`: a model's exits, cuts, classes and segments.

use classynet_runtime::model::fmt_dims;
use classynet_runtime::partition::segments;
use classynet_runtime::planner::segment_macs;
use classynet_runtime::Result;
use serde_json::json;

use crate::args::{print_json, ModelArgs};

pub fn run(a: &ModelArgs) -> Result<()> {
    let m = a.load()?;
    let segs = segments(&m)?;
    // MACs per sample up to each exit (None where the graph lacks the shapes to count them).
    let macs: Option<Vec<u64>> = segment_macs(&m, &segs)
        .ok()
        .map(|per| per.iter().scan(0, |sum, &x| Some(std::mem::replace(sum, *sum + x) + x)).collect());
    if a.json {
        print_json(&json!({
            "name": m.name(),
            "fingerprint": m.fingerprint,
            "input": m.input_name,
            "metadata": serde_json::to_value(&m.meta).expect("metadata serialises"),
            "segments": segs.iter().enumerate().map(|(i, s)| json!({
                "exit": m.meta.exits[s.exit].name, "input": s.input, "logits": s.logits, "cut": s.cut,
                "nodes": s.nodes.len(), "initializers": s.initializers.len(),
                "macs_to_here": macs.as_ref().map(|c| c[i]),
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
    println!(
        "{:<5} {:<5} {:>9} {:<14} {:<18} {:>6} {:>12}  classes",
        "exit", "kind", "threshold", "logits", "cut", "nodes", "MACs to here"
    );
    for (i, s) in segs.iter().enumerate() {
        let e = &m.meta.exits[s.exit];
        let cut = match &s.cut {
            Some(c) => format!("{c} {}", fmt_dims(&m.tensor_shape(c).unwrap_or_default())),
            None => "-".into(),
        };
        let classes: Vec<String> = e.classes.iter().map(|&c| m.meta.class_label(c)).collect();
        println!(
            "{:<5} {:<5} {:>9} {:<14} {:<18} {:>6} {:>12}  {}",
            e.name,
            if e.bag { "bag" } else { "plain" },
            e.threshold.map_or("-".into(), |t| format!("{t}")),
            e.logits,
            cut,
            s.nodes.len(),
            macs.as_ref().map_or("-".into(), |c| format!("{:.2} M", c[i] as f64 / 1e6)),
            if e.classes.len() == m.meta.num_classes() { "all".into() } else { classes.join(", ") }
        );
    }
    if let Some(t) = &m.meta.training {
        println!("training: {t}");
    }
    Ok(())
}
