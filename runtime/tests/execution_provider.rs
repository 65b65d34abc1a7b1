//! Execution providers: asking for CUDA or TensorRT from a library built without them (the PyPI
//! wheel `scripts/setup` installs is CPU-only) must still give a working session, on the CPU,
//! with one warning that names the provider and the reason. (`classynet --execution-provider`
//! is tested in the CLI crate.)
//!
//! Where the loaded library does have a GPU provider (an ONNX Runtime GPU build pointed at with
//! ORT_DYLIB_PATH), the fallback half is skipped with a note and only the answers are compared.
#![cfg(feature = "ort")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use classynet_runtime::backend::Tensor;
use classynet_runtime::ort_backend::{init_ort, OrtGraph, Provider, SessionOptions};

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
