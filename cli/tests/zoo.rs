//! Every model in models/zoo/ loads in the runtime, splits exactly on both engines, and the runtime's early-exit
//! answers on the Fashion-MNIST test set agree with what the trainer measured (its model card,
//! computed in Python with the same rule).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn zoo() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo");
    let mut models: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("models/zoo exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    models
}

fn classynet(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_classynet")).args(args).output().unwrap();
    assert!(out.status.success(), "classynet {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_zoo_model_splits_exactly_and_matches_its_card() {
    let models = zoo();
    assert!(!models.is_empty(), "models/zoo holds at least the tiny model");
    for model in models {
        let m = model.to_str().unwrap();
        let card: Value =
            serde_json::from_str(&std::fs::read_to_string(model.with_extension("card.json")).unwrap()).unwrap();
        // Both engines split exactly. The card's figures are reproduced through ONNX Runtime
        // here; tract gives ONNX Runtime's answers sample for sample on the whole test set
        // (runtime/tests/tract_parity.rs), so running it here too would only double the time.
        for backend in ["ort", "tract"] {
            let v = classynet(&["--backend", backend, "verify-split", "--model", m, "--limit", "64", "--json"]);
            assert_eq!(v["ok"], true, "{m} on {backend}: {v}");
        }
        let backend = "ort";
        let run = classynet(&["--backend", backend, "run", "--model", m, "--batch", "64", "--json"]);
        assert_eq!(run["samples"], 10000);
        let want = card["early_exit_accuracy"].as_f64().unwrap();
        let got = run["accuracy"].as_f64().unwrap();
        // Same rule, float32 here and float64 in Python: a sample sitting on a threshold may
        // go either way, nothing more.
        assert!((got - want).abs() <= 0.001, "{m} on {backend}: runtime accuracy {got}, card {want}");
        let counts: Vec<i64> = run["exits"].as_array().unwrap().iter().map(|e| e["count"].as_i64().unwrap()).collect();
        let card_counts: Vec<i64> =
            card["exit_counts"].as_array().unwrap().iter().map(|c| c.as_i64().unwrap()).collect();
        assert_eq!(counts.len(), card_counts.len());
        for (a, b) in counts.iter().zip(&card_counts) {
            assert!((a - b).abs() <= 10, "{m} on {backend}: exit counts {counts:?} vs card {card_counts:?}");
        }
    }
}

/// The zoo's CS-EE policies (models/zoo/cs-ee/) load against the model their card names, answer
/// only their targeted class before the last exit, and give the card's figures on the test set.
#[test]
fn every_cs_ee_policy_answers_only_its_class_early_as_its_card_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo/cs-ee");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let mut cards: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.to_str().is_some_and(|s| s.ends_with(".card.json"))).collect();
    cards.sort();
    assert!(!cards.is_empty(), "models/zoo/cs-ee holds policies with a card");
    for card_path in cards {
        let card: Value = serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
        let model = dir.join("..").join(card["model"].as_str().unwrap());
        for class in card["classes"].as_array().unwrap() {
            let c = class["class"].as_u64().unwrap() as usize;
            let policy = dir.join(class["policy"].as_str().unwrap());
            let run = classynet(&[
                "run",
                "--model",
                model.to_str().unwrap(),
                "--policy",
                policy.to_str().unwrap(),
                "--batch",
                "64",
                "--json",
            ]);
            let exits = run["exits"].as_array().unwrap();
            let mut early_as_c = 0u64;
            for e in &exits[..exits.len() - 1] {
                for row in e["confusion"].as_array().unwrap() {
                    let row: Vec<u64> = row.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
                    let others: u64 = row.iter().enumerate().filter(|&(j, _)| j != c).map(|(_, n)| n).sum();
                    assert_eq!(others, 0, "{}: an early exit answered another class than {c}", policy.display());
                    early_as_c += row[c];
                }
            }
            let want = class["test"]["class_early"].as_u64().unwrap();
            assert!(early_as_c.abs_diff(want) <= 5, "{}: {early_as_c} answered early, card {want}", policy.display());
            let (got, want) = (run["accuracy"].as_f64().unwrap(), class["test"]["accuracy"].as_f64().unwrap());
            assert!((got - want).abs() <= 0.001, "{}: accuracy {got}, card {want}", policy.display());
        }
    }
}
