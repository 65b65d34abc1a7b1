//! Execution providers: asking for CUDA or TensorRT from a library built without them (the PyPI
//! wheel `scripts/setup` installs is CPU-only) must still give a working session, on the CPU,
//! with one warning that names the provider and the reason; and `classynet
//! --execution-provider` must do the same from the command line.
//!
//! Where the loaded library does have a GPU provider (an ONNX Runtime GPU build pointed at with
//! ORT_DYLIB_PATH), the fallback half is skipped with a note and only the answers are compared.
#![cfg(feature = "ort")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use classynet_runtime::backend::Tensor;
use classynet_runtime::ort_backend::{init_ort, OrtGraph, Provider, SessionOptions};
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// Deterministic inputs for tiny3 (1×4×4 samples).
fn inputs(n: usize) -> Tensor {
    let data = (0..n * 16).map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 6.0).collect();
    Tensor::new(vec![n, 1, 4, 4], data).unwrap()
}

/// Log lines written by the tracing subscriber installed for one closure.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    let cap = Capture::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[test]
fn a_missing_gpu_provider_falls_back_to_the_cpu_with_a_warning() {
    let lib = init_ort(None, 1).expect("ONNX Runtime from scripts/setup");
    let bytes = std::fs::read(data("tiny3.onnx")).unwrap();
    let x = inputs(16);
    let mut cpu = OrtGraph::from_bytes(&bytes, SessionOptions::default()).unwrap();
    assert_eq!(cpu.provider(), Provider::Cpu);
    let want = cpu.run(&x).unwrap();

    for provider in [Provider::Cuda, Provider::TensorRt] {
        let opts = SessionOptions { provider, ..SessionOptions::default() };
        let ((first, second), log) =
            logged(|| (OrtGraph::from_bytes(&bytes, opts).unwrap(), OrtGraph::from_bytes(&bytes, opts).unwrap()));
        for mut g in [first, second] {
            let got = g.run(&x).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert_eq!(a.shape, b.shape);
                let worst = a.data.iter().zip(&b.data).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-4, "{provider}: outputs differ from the CPU session's by {worst}");
            }
            if provider.is_available().unwrap() {
                eprintln!(
                    "note: {} has {}; the fallback is not exercised (session runs on {})",
                    lib.display(),
                    provider.ort_name(),
                    g.provider()
                );
                continue;
            }
            assert_eq!(g.provider(), Provider::Cpu, "{provider} is not in the library, so the session runs on the CPU");
        }
        if provider.is_available().unwrap() {
            continue;
        }
        let name = provider.ort_name();
        let warning = format!("{name} unavailable, falling back to");
        assert!(log.contains("WARN"), "{provider}: no warning logged: {log}");
        assert!(log.contains(&warning), "{provider}: the warning names the provider: {log}");
        assert!(log.contains("was built without it"), "{provider}: the warning says why: {log}");
        assert_eq!(log.matches(&warning).count(), 1, "{provider}: warned once for two sessions: {log}");
        if provider == Provider::TensorRt && !Provider::Cuda.is_available().unwrap() {
            // TensorRT falls back to CUDA, and CUDA to the CPU. CUDA's own warning was already
            // given (once per process) by the Cuda round above.
            assert!(log.contains("falling back to CUDAExecutionProvider"), "{log}");
        } else {
            assert!(log.contains("falling back to CPUExecutionProvider"), "{log}");
        }
    }
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
