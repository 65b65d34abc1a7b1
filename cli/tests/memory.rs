//! `classynet plan` as the memory planner of a small device: `--batch auto` finds a batch at
//! which the zoo's cn+c ResNet-110 fits a budget that batch 16 cannot, and `--count-baseline`
//! turns a verdict that only holds for the model into a refusal once the engine's measured
//! resident baseline is counted. tract is the engine under test: it needs no library, so its
//! baseline can always be measured.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn cnc() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo/resnet110-7exit-cnc.onnx").display().to_string()
}

fn plan(args: &[&str]) -> (Output, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_classynet"))
        .args(["--backend", "tract", "plan", "--model", &cnc(), "--json"])
        .args(args)
        .output()
        .expect("classynet runs");
    // The JSON is printed also when nothing fits (then the exit status is 1).
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("plan {args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out, v)
}

#[test]
fn auto_batch_fits_470kb_where_batch_16_fits_nothing() {
    let (out, v) = plan(&["--budget", "470kB", "--batch", "16"]);
    assert!(!out.status.success());
    assert!(v["chosen"].is_null(), "{v}");
    assert!(v["error"].as_str().unwrap().contains("no partition fits a budget of 470.0 kB"), "{v}");

    // The edge's spelling of the flag works here too.
    let (out, v) = plan(&["--budget", "470kB", "--max-batch", "auto"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(v["chosen"], "E1", "{v}");
    let batch = v["batch"].as_u64().unwrap();
    assert!((1..16).contains(&batch), "a batch below 16: {v}");
    assert_eq!(v["batch_setting"], "auto");
    assert_eq!(v["max_batch"], 16);
    assert!(v["explanation"].as_str().unwrap().starts_with(&format!("batch {batch} is the largest up to 16")), "{v}");
    // The table is at the chosen batch, and E1 there fits while batch + 1 would not have.
    let e1 = &v["partitions"][0];
    assert!(e1["total_bytes"].as_u64().unwrap() <= 470_000, "{e1}");
    assert_eq!(e1["paper_formula_bytes"], e1["params"].as_u64().unwrap() * 4 * batch);

    // Below E1 at batch 1: the smallest need and the budget.
    let (out, v) = plan(&["--budget", "100kB", "--batch", "auto"]);
    assert!(!out.status.success());
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("no partition fits a budget of 100.0 kB at any batch from 16 down to 1"), "{e}");
    assert!(e.contains("E1 at batch 1, needs"), "{e}");
}

#[test]
fn counting_the_measured_baseline_changes_the_verdict() {
    let (_, v) = plan(&[]);
    let baselines = v["baselines"].as_array().unwrap();
    let tract = baselines.iter().find(|b| b["backend"] == "tract").expect("this build has tract");
    let rss = tract["rss_bytes"].as_u64().unwrap_or_else(|| panic!("tract's baseline is measured: {tract}"));
    assert!(rss > 1_000_000, "a process with an engine holds more than 1 MB: {rss}");
    let e1 = &v["partitions"][0];
    let total = e1["total_bytes"].as_u64().unwrap();
    assert_eq!(e1["total_with_baseline_bytes"]["tract"].as_u64().unwrap(), total + rss);

    // Between the plan and plan + baseline: the model fits, the process does not.
    let budget = (total + rss / 2).to_string();
    let (out, v) = plan(&["--budget", &budget]);
    assert!(out.status.success(), "{v}");
    assert!(v["chosen"].is_string() && v["count_baseline"] == false, "{v}");
    let verdicts = v["verdicts"].as_array().unwrap();
    assert!(verdicts[0]["baseline_backend"].is_null() && verdicts[0]["chosen"].is_string(), "{v}");
    let with_tract = verdicts.iter().find(|x| x["baseline_backend"] == "tract").unwrap();
    assert!(with_tract["chosen"].is_null() && with_tract["error"].is_string(), "{v}");

    let (out, v) = plan(&["--budget", &budget, "--count-baseline"]);
    assert!(!out.status.success(), "{v}");
    assert!(v["chosen"].is_null(), "{v}");
    assert_eq!(v["count_baseline"], true);
    assert_eq!(v["backend"], "tract");
    assert!(v["baseline_bytes"].as_u64().unwrap() > 0, "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("− tract baseline") && stderr.contains("leaves"), "{stderr}");

    // With room for both, --count-baseline keeps a partition.
    let (out, v) = plan(&["--budget", &(total + 2 * rss).to_string(), "--count-baseline"]);
    assert!(out.status.success(), "{v}");
    assert!(v["chosen"].is_string(), "{v}");
}
