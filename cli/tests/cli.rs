//! The `classynet` binary as a user runs it: on the committed tiny3 fixture and the small
//! dataset files, and, where the Debian package is installed, on Fashion-MNIST with the demo
//! model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/tests/data").join(name).display().to_string()
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path).display().to_string()
}

fn classynet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_classynet")).args(args).output().expect("classynet runs")
}

fn ok(args: &[&str]) -> String {
    let out = classynet(args);
    assert!(out.status.success(), "classynet {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = classynet(args);
    assert!(!out.status.success(), "classynet {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn tiny_dataset() -> String {
    format!("idx:{},{}", data("tiny-images-idx3-ubyte.gz"), data("tiny-labels-idx1-ubyte.gz"))
}

#[test]
fn plan_prints_the_hand_counted_costs() {
    let out = ok(&["plan", "--model", &data("tiny3.onnx"), "--batch", "2", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let p = v["partitions"].as_array().unwrap();
    let params: Vec<u64> = p.iter().map(|x| x["params"].as_u64().unwrap()).collect();
    assert_eq!(params, vec![26, 76, 88]);
    assert_eq!(p[0]["activation_bytes"], 512);
    assert_eq!(p[0]["paper_formula_bytes"], 26 * 4 * 2);

    let text = ok(&["plan", "--model", &data("tiny3.onnx"), "--batch", "1", "--budget", "1KiB"]);
    assert!(text.contains("E3 is the deepest partition that fits"), "{text}");
    let e = fails(&["plan", "--model", &data("tiny3.onnx"), "--budget", "100B"]);
    assert!(e.contains("no partition fits a budget of 100 B"), "{e}");
    let e = fails(&["plan", "--model", &data("tiny3.onnx"), "--budget", "3 furlongs"]);
    assert!(e.contains("unknown unit `furlongs`"), "{e}");
}

#[test]
fn partition_writes_files_that_load_and_match_the_full_model() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head.onnx").display().to_string();
    let tail = dir.path().join("tail.onnx").display().to_string();
    let out =
        ok(&["partition", "--model", &data("tiny3.onnx"), "--partition", "E2", "--out", &head, "--other-out", &tail]);
    assert!(out.contains("Head of E2, exits E1..E2") && out.contains("Tail of E2, exits E3..E3"), "{out}");
    let info: Value = serde_json::from_str(&ok(&["inspect", "--model", &head, "--json"])).unwrap();
    assert_eq!(info["metadata"]["partition"]["role"], "head");
    assert_eq!(info["segments"].as_array().unwrap().len(), 2);
    // MACs per sample up to each exit, as counted by hand in the planner's test.
    let macs: Vec<u64> =
        info["segments"].as_array().unwrap().iter().map(|s| s["macs_to_here"].as_u64().unwrap()).collect();
    assert_eq!(macs, vec![292, 876]);
    let info: Value = serde_json::from_str(&ok(&["inspect", "--model", &tail, "--json"])).unwrap();
    assert_eq!(info["input"], "cut2");

    let v: Value = serde_json::from_str(&ok(&[
        "verify-split",
        "--model",
        &data("tiny3.onnx"),
        "--dataset",
        &tiny_dataset(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["partitions"].as_array().unwrap().len(), 3);
    for p in v["partitions"].as_array().unwrap() {
        assert!(p["head_max_abs_diff"].as_f64().unwrap() <= 1e-5 && p["tail_max_abs_diff"].as_f64().unwrap() <= 1e-5);
    }

    let e =
        fails(&["partition", "--model", &data("tiny3.onnx"), "--partition", "E3", "--side", "tail", "--out", &tail]);
    assert!(e.contains("no tail"), "{e}");
    let e = fails(&["partition", "--model", &data("tiny3.onnx"), "--partition", "E7", "--out", &head]);
    assert!(e.contains("partition `E7` is not one of E1..E3"), "{e}");
}

#[test]
fn plain_onnx_models_split_with_user_given_cuts() {
    let m = data("tiny3-plain.onnx");
    let v: Value = serde_json::from_str(&ok(&[
        "verify-split",
        "--model",
        &m,
        "--cuts",
        "cut1,cut2",
        "--exits",
        "exit1,exit2,exit3",
        "--dataset",
        &tiny_dataset(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["ok"], true);
    let e = fails(&["plan", "--model", &m, "--cuts", "cut1,nope", "--exits", "exit1,exit2,exit3"]);
    assert!(e.contains("cut `nope` of exit E2 is not a tensor of the graph"), "{e}");
    let e = fails(&["plan", "--model", &m]);
    assert!(e.contains("no `classynet` entry") && e.contains("--cuts"), "{e}");
}

#[test]
fn run_reports_per_exit_and_per_class_counts() {
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(policy.path(), r#"{"version": 5, "exits": [{"name": "E2", "threshold": 5.0}]}"#).unwrap();
    let out = ok(&[
        "run",
        "--model",
        &data("tiny3.onnx"),
        "--dataset",
        &tiny_dataset(),
        "--batch",
        "2",
        "--policy",
        policy.path().to_str().unwrap(),
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["samples"], 5);
    assert_eq!(v["policy_version"], 5);
    let exits = v["exits"].as_array().unwrap();
    assert_eq!(exits.iter().map(|e| e["name"].as_str().unwrap()).collect::<Vec<_>>(), ["E1", "E2", "E3"]);
    let counted: u64 = exits.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 5, "every sample is answered exactly once");
    for e in exits {
        let per_class: u64 = e["per_class"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum();
        assert_eq!(per_class, e["count"].as_u64().unwrap());
        assert_eq!(e["per_class"].as_array().unwrap().len(), 4);
        // The confusion matrix (rows: true label) agrees with the prediction counts and the hits.
        let m: Vec<Vec<u64>> = serde_json::from_value(e["confusion"].clone()).unwrap();
        assert_eq!(m.len(), 4);
        for (pred, n) in e["per_class"].as_array().unwrap().iter().enumerate() {
            assert_eq!(m.iter().map(|row| row[pred]).sum::<u64>(), n.as_u64().unwrap());
        }
        assert_eq!((0..4).map(|c| m[c][c]).sum::<u64>(), e["correct"].as_u64().unwrap());
    }
    // A threshold of 5 nats exceeds ln 4: E2 takes everything E1 leaves.
    assert_eq!(exits[2]["count"], 0);
    let correct: u64 = exits.iter().map(|e| e["correct"].as_u64().unwrap()).sum();
    assert!((v["accuracy"].as_f64().unwrap() - correct as f64 / 5.0).abs() < 1e-9);
    assert!(v["samples_per_second"].as_f64().unwrap() > 0.0);

    let text = ok(&["run", "--model", &data("tiny3.onnx"), "--dataset", &tiny_dataset()]);
    assert!(text.contains("accuracy") && text.contains("samples/s") && text.contains("north"), "{text}");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(data("tiny3.onnx")).unwrap();
    let truncated: PathBuf = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() - 700]).unwrap();
    let e = fails(&["inspect", "--model", truncated.to_str().unwrap()]);
    assert!(e.contains("is not a readable ONNX model") && e.contains("truncated"), "{e}");
    let e = fails(&["inspect", "--model", &dir.path().join("missing.onnx").display().to_string()]);
    assert!(e.contains("missing.onnx") && e.contains("No such file"), "{e}");

    // Fashion-MNIST images are 1x28x28; tiny3 takes 1x4x4.
    let npz = data("tiny.npz");
    let e = fails(&["run", "--model", &repo("models/demo/fmnist-demo-3exit.onnx"), "--dataset", &npz]);
    assert!(e.contains("has samples of shape [1, 4, 4], but model fmnist-demo-3exit expects [1, 28, 28]"), "{e}");

    let policy = dir.path().join("p.json");
    std::fs::write(&policy, r#"{"version": 1, "exits": [{"name": "E1", "classes": [0]}]}"#).unwrap();
    let e = fails(&[
        "run",
        "--model",
        &data("tiny3.onnx"),
        "--dataset",
        &tiny_dataset(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert!(e.contains("bag-of-classes exit trained for {south (2)}") && e.contains("north (0)"), "{e}");

    let e = fails(&["run", "--model", &data("tiny3.onnx"), "--dataset", "mnist:test"]);
    assert!(e.contains("mnist:test"), "{e}");
}

#[test]
fn the_ort_library_flag_is_checked() {
    let e = fails(&[
        "--ort-lib",
        "/nonexistent/libonnxruntime.so",
        "run",
        "--model",
        &data("tiny3.onnx"),
        "--dataset",
        &tiny_dataset(),
    ]);
    assert!(e.contains("/nonexistent/libonnxruntime.so") && e.contains("scripts/setup"), "{e}");
}

/// The quick start's job on real data: the demo model on the Fashion-MNIST test set.
#[test]
fn demo_model_on_fashion_mnist() {
    if !Path::new("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists() {
        panic!("Fashion-MNIST is missing: scripts/setup installs the Debian package dataset-fashion-mnist");
    }
    let model = repo("models/demo/fmnist-demo-3exit.onnx");
    let v: Value = serde_json::from_str(&ok(&["run", "--model", &model, "--limit", "2000", "--json"])).unwrap();
    assert_eq!(v["samples"], 2000);
    assert!(v["accuracy"].as_f64().unwrap() > 0.8, "{v}");
    // E1 is a bag exit trained for Trouser (1) and Bag (8): it answers only those, and mostly right.
    let e1 = &v["exits"][0];
    let per_class: Vec<u64> = e1["per_class"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
    assert!(per_class[1] + per_class[8] == e1["count"].as_u64().unwrap() && e1["count"].as_u64().unwrap() > 100);
    assert!(e1["correct"].as_f64().unwrap() / e1["count"].as_f64().unwrap() > 0.95);

    let v: Value = serde_json::from_str(&ok(&["verify-split", "--model", &model, "--json"])).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["samples"], 256);
}

/// The project's own example policy (TOML, as cloud-server reads it) works with `classynet run`.
#[test]
fn run_takes_the_deploy_policy_in_toml() {
    let model = repo("models/zoo/resnet110-7exit-cnc.onnx");
    let policy = repo("deploy/policy.toml");
    let args = ["run", "--model", &model, "--limit", "200", "--json"];
    let v: Value = serde_json::from_str(&ok(&[&args[..], &["--policy", &policy]].concat())).unwrap();
    let version = std::fs::read_to_string(&policy)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("version = ").map(|v| v.trim().parse::<u64>().unwrap()))
        .unwrap();
    assert_eq!(v["policy_version"], version, "{v}");
    assert_eq!(v["samples"], 200);
}

#[test]
fn calibrate_writes_a_policy_that_run_serves_with_the_predicted_exit_counts() {
    let dir = tempfile::tempdir().unwrap();
    let counts = |v: &Value| -> Vec<u64> {
        v["exits"].as_array().unwrap().iter().map(|e| e["count"].as_u64().unwrap()).collect()
    };
    for (target, file) in [("precision=0.5", "p.toml"), ("accuracy-drop=5", "a.json")] {
        let out = dir.path().join(file).display().to_string();
        let cal: Value = serde_json::from_str(&ok(&[
            "calibrate",
            "--model",
            &data("tiny3.onnx"),
            "--dataset",
            &tiny_dataset(),
            "--target",
            target,
            "--min-support",
            "1",
            "--policy-version",
            "4",
            "--out",
            &out,
            "--json",
        ]))
        .unwrap();
        assert_eq!(cal["samples"], 5);
        let predicted = counts(&cal);
        assert!(predicted[0] + predicted[1] > 0, "{target}: some samples leave early: {cal}");
        let run: Value = serde_json::from_str(&ok(&[
            "run",
            "--model",
            &data("tiny3.onnx"),
            "--dataset",
            &tiny_dataset(),
            "--policy",
            &out,
            "--json",
        ]))
        .unwrap();
        assert_eq!(counts(&run), predicted, "{target}: run serves what calibrate predicted");
        assert_eq!(run["accuracy"], cal["accuracy"]);
        assert_eq!(run["policy_version"], 4, "{run}");
    }
    // --per-class (CS-EE): thresholds per class in the policy, served as calibrated.
    let out = dir.path().join("per-class.toml").display().to_string();
    let tiny = ["--model", &data("tiny3.onnx"), "--dataset", &tiny_dataset()];
    let cal: Value = serde_json::from_str(&ok(&[
        &["calibrate"][..],
        &tiny,
        &["--target", "precision=0.5", "--per-class", "--min-support", "1", "--out", &out, "--json"],
    ]
    .concat()))
    .unwrap();
    let predicted = counts(&cal);
    assert!(predicted[0] + predicted[1] > 0, "some samples leave early: {cal}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.contains("class_thresholds"), "{written}");
    let early = &cal["exits"].as_array().unwrap()[..2];
    assert!(early.iter().all(|e| e["threshold"].is_null()), "only class thresholds: {cal}");
    assert!(early.iter().any(|e| !e["class_thresholds"].as_object().unwrap().is_empty()), "{cal}");
    let run: Value = serde_json::from_str(&ok(&[&["run"][..], &tiny, &["--policy", &out, "--json"]].concat())).unwrap();
    assert_eq!(counts(&run), predicted, "run serves what calibrate --per-class predicted");
    let e = fails(&[&["calibrate"][..], &tiny, &["--target", "accuracy-drop=1", "--per-class"]].concat());
    assert!(e.contains("--per-class goes with a precision target"), "{e}");
    // --samples takes the trainer's validation.json; an index past the data is refused.
    let samples = dir.path().join("validation.json");
    std::fs::write(&samples, r#"{"indices": [0, 2, 4]}"#).unwrap();
    let cal: Value = serde_json::from_str(&ok(&[
        "calibrate",
        "--model",
        &data("tiny3.onnx"),
        "--dataset",
        &tiny_dataset(),
        "--samples",
        samples.to_str().unwrap(),
        "--min-support",
        "1",
        "--json",
    ]))
    .unwrap();
    assert_eq!(cal["samples"], 3);
    std::fs::write(&samples, "[0, 9]").unwrap();
    let e = fails(&[
        "calibrate",
        "--model",
        &data("tiny3.onnx"),
        "--dataset",
        &tiny_dataset(),
        "--samples",
        samples.to_str().unwrap(),
    ]);
    assert!(e.contains("9 is not a sample index of the dataset (0..4)"), "{e}");
    let e =
        fails(&["calibrate", "--model", &data("tiny3.onnx"), "--dataset", &tiny_dataset(), "--target", "recall=0.9"]);
    assert!(e.contains("expected precision=P"), "{e}");
    let e = fails(&[
        "calibrate",
        "--model",
        &data("tiny3.onnx"),
        "--dataset",
        &tiny_dataset(),
        "--target",
        "accuracy-drop=1",
        "--classes-only",
    ]);
    assert!(e.contains("--classes-only goes with a precision target"), "{e}");
}

#[test]
fn assign_proposes_a_gating_that_run_serves_as_predicted() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gated.toml").display().to_string();
    let tiny = tiny_dataset();
    let plain = ["--model", &data("tiny3-plain.onnx"), "--cuts", "cut1,cut2", "--exits", "exit1,exit2,exit3"];
    let mut args = vec!["assign"];
    args.extend(plain);
    args.extend(["--dataset", &tiny, "--target", "precision=0.5", "--min-support", "1"]);
    args.extend(["--compare", "0;1", "--out", &out, "--json"]);
    let v: Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(v["samples"], 5);
    let proposed = &v["proposed"];
    assert!(
        proposed["expected_cost"].as_f64().unwrap() <= v["compared"]["expected_cost"].as_f64().unwrap(),
        "the search is never worse than the fixed assignment it is compared with: {v}"
    );
    let mut run = vec!["run"];
    run.extend(plain);
    run.extend(["--dataset", &tiny, "--policy", &out, "--json"]);
    let r: Value = serde_json::from_str(&ok(&run)).unwrap();
    let counts: Vec<u64> = r["exits"].as_array().unwrap().iter().map(|e| e["count"].as_u64().unwrap()).collect();
    let want: Vec<u64> = proposed["exit_counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
    assert_eq!(counts, want);
    // A bag-exit model is refused with the reason.
    let e = fails(&["assign", "--model", &data("tiny3.onnx"), "--dataset", &tiny_dataset()]);
    assert!(e.contains("bag-of-classes exit"), "{e}");
}

#[test]
fn bench_reports_the_median_and_range_of_each_ratio_with_a_verdict() {
    let out = ok(&[
        "bench",
        "--model",
        &data("tiny3.onnx"),
        "--dataset",
        &tiny_dataset(),
        "--batch",
        "2",
        "--rounds",
        "3",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rounds"], 3);
    for key in ["ratio", "per_exit_sessions_ratio"] {
        let r = &v[key];
        let (lo, mid, hi) = (r["min"].as_f64().unwrap(), r["median"].as_f64().unwrap(), r["max"].as_f64().unwrap());
        assert!(0.0 < lo && lo <= mid && mid <= hi, "{key}: {r}");
        let verdict = r["verdict"].as_str().unwrap();
        let target = r["target"].as_f64().unwrap();
        let want = if lo >= target {
            "met"
        } else if hi < target {
            "not met"
        } else {
            "spread crosses the target"
        };
        assert_eq!(verdict, want, "{key}: {r}");
    }
    let e = fails(&["bench", "--model", &data("tiny3.onnx"), "--dataset", &tiny_dataset(), "--rounds", "0"]);
    assert!(e.contains("--rounds: expected at least 1 timed round, found 0"), "{e}");
}
