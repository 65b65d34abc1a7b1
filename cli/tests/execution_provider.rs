//! `classynet --execution-provider` (and its environment variable) as a user runs it: the same
//! answers as on the CPU, and a warning naming the provider when the library lacks it.

use std::path::{Path, PathBuf};
use std::process::Command;

use classynet_runtime::ort_backend::{init_ort, Provider};
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/tests/data").join(name)
}

#[test]
fn the_cli_flag_picks_the_provider_and_falls_back() {
    let dataset =
        format!("idx:{},{}", data("tiny-images-idx3-ubyte.gz").display(), data("tiny-labels-idx1-ubyte.gz").display());
    let model = data("tiny3.onnx").display().to_string();
    let run = |ep: Option<&str>, env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_classynet"));
        c.args(["run", "--model", &model, "--dataset", &dataset, "--threads", "1", "--json"]);
        c.env_remove("CLASSYNET_EXECUTION_PROVIDER").env_remove("RUST_LOG");
        if let Some(ep) = ep {
            c.args(["--execution-provider", ep]);
        }
        if let Some(v) = env {
            c.env("CLASSYNET_EXECUTION_PROVIDER", v);
        }
        c.output().expect("classynet runs")
    };
    let counts = |out: &std::process::Output| -> Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::json!({"accuracy": v["accuracy"], "exits": v["exits"]})
    };
    let cpu = run(Some("cpu"), None);
    let want = counts(&cpu);
    assert!(!String::from_utf8_lossy(&cpu.stderr).contains("falling back"));
    // The binary finds the same library as this process (the project's .venv).
    init_ort(None, 1).expect("ONNX Runtime from scripts/setup");
    for (provider, flag, env) in [(Provider::Cuda, Some("cuda"), None), (Provider::TensorRt, None, Some("tensorrt"))] {
        let out = run(flag, env);
        assert_eq!(counts(&out), want, "{flag:?} {env:?}: same answers as on the CPU");
        let err = String::from_utf8_lossy(&out.stderr);
        if !provider.is_available().unwrap() {
            let warning = format!("{} unavailable, falling back to", provider.ort_name());
            assert!(err.contains(&warning), "{provider}: {err}");
        }
    }
    let out = run(Some("tpu"), None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("possible values: cpu, cuda, tensorrt"), "{err}");
}
