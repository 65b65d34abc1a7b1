//! Which inference engine runs the graphs, chosen with `--backend ort|tract|auto`.
//!
//! Each engine is one module behind one cargo feature: ONNX Runtime ([`crate::ort_backend`],
//! feature `ort`, a C++ library loaded at run time) and tract ([`crate::tract_backend`], feature
//! `tract`, pure Rust, nothing to ship). `auto` takes ONNX Runtime where its library loads and
//! tract otherwise: a JetPack 4.6 board (glibc 2.27) cannot load today's ONNX Runtime.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::Engine;
use crate::error::{Error, Result};

/// The engine asked for on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BackendChoice {
    /// ONNX Runtime where its library loads, otherwise tract (an explicit --ort-lib that does
    /// not load is an error, not a fallback).
    #[default]
    Auto,
    /// ONNX Runtime (fastest on x86; CUDA and TensorRT where the library has them).
    Ort,
    /// tract, the pure-Rust engine (no library to install; smaller resident memory).
    Tract,
}

impl BackendChoice {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Ort => "ort",
            BackendChoice::Tract => "tract",
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An ONNX Runtime execution provider to run sessions on.
///
/// CUDA and TensorRT are registered with the session when asked for; when the loaded
/// `libonnxruntime.so` was built without them (the PyPI `onnxruntime` wheel is CPU-only), or
/// registering them fails (no GPU, missing CUDA/cuDNN/TensorRT libraries), the session runs on the
/// CPU and a warning, once per process and reason, names the provider and the reason. tract
/// runs on the CPU only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Provider {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    Cpu,
    /// NVIDIA CUDA (CUDAExecutionProvider); needs an ONNX Runtime built with CUDA.
    Cuda,
    /// NVIDIA TensorRT (TensorrtExecutionProvider), with CUDA for the nodes TensorRT does not take;
    /// needs an ONNX Runtime built with TensorRT. Falls back to CUDA, then to the CPU.
    #[cfg_attr(feature = "clap", value(name = "tensorrt"))]
    TensorRt,
}

impl Provider {
    /// The name used on the command line (`cpu`, `cuda`, `tensorrt`).
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Session settings shared by every graph a process runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionOptions {
    /// Graph optimisation off, for debugging numerical differences (default: all levels on).
    pub no_optimization: bool,
    /// Which ONNX Runtime execution provider runs the graphs (default: the CPU). A provider the
    /// loaded library lacks falls back to the CPU with a warning; see [`Provider`].
    pub provider: Provider,
}

/// Everything that decides which engine runs and how.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub backend: BackendChoice,
    /// Path of libonnxruntime.so (ONNX Runtime only; see [`crate::ort_backend`] for the search).
    pub ort_lib: Option<PathBuf>,
    /// Threads per graph run, shared by the whole process; 0: one per core.
    pub threads: usize,
    pub session: SessionOptions,
}

/// The engines this build has, in `auto`'s order of preference.
pub fn built_in() -> &'static [&'static str] {
    &[
        #[cfg(feature = "ort")]
        "ort",
        #[cfg(feature = "tract")]
        "tract",
    ]
}

#[cfg_attr(all(feature = "ort", feature = "tract"), allow(dead_code))]
fn missing(name: &str) -> Error {
    let have = built_in();
    Error::RuntimeLibrary(format!(
        "this build has no {name} engine (cargo feature `{name}`); it has: {}",
        if have.is_empty() { "none".to_string() } else { have.join(", ") }
    ))
}

/// Opens the engine `opts` asks for (loading ONNX Runtime or configuring tract's threads once
/// per process) and logs one line saying which engine runs and why.
pub fn open(opts: &EngineOptions) -> Result<Arc<dyn Engine>> {
    let (engine, why) = match opts.backend {
        BackendChoice::Ort => (ort(opts)?, "asked for with --backend ort".to_string()),
        BackendChoice::Tract => (tract(opts)?, "asked for with --backend tract".to_string()),
        BackendChoice::Auto => auto(opts)?,
    };
    tracing::info!(backend = engine.name(), threads = opts.threads, "inference engine {}: {why}", engine.name());
    Ok(engine)
}

fn auto(opts: &EngineOptions) -> Result<(Arc<dyn Engine>, String)> {
    let ort_failed = match ort(opts) {
        Ok(e) => return Ok((e, "its library loaded (--backend auto)".into())),
        Err(e) => e,
    };
    // A library named on the command line is a request for ONNX Runtime: falling back would hide
    // the mistake in the path.
    if !cfg!(feature = "tract") || (cfg!(feature = "ort") && opts.ort_lib.is_some()) {
        return Err(ort_failed);
    }
    let engine = tract(opts)?;
    let why = if cfg!(feature = "ort") {
        format!("ONNX Runtime cannot be used here ({ort_failed}) (--backend auto)")
    } else {
        "the only engine of this build (--backend auto)".to_string()
    };
    Ok((engine, why))
}

#[cfg(feature = "ort")]
fn ort(opts: &EngineOptions) -> Result<Arc<dyn Engine>> {
    crate::ort_backend::init_ort(opts.ort_lib.as_deref(), opts.threads)?;
    Ok(Arc::new(crate::ort_backend::OrtEngine::new(opts.session)?))
}

#[cfg(not(feature = "ort"))]
fn ort(_: &EngineOptions) -> Result<Arc<dyn Engine>> {
    Err(missing("ort"))
}

#[cfg(feature = "tract")]
fn tract(opts: &EngineOptions) -> Result<Arc<dyn Engine>> {
    if opts.session.provider != Provider::Cpu {
        tracing::warn!(
            provider = opts.session.provider.as_str(),
            "tract runs on the CPU only; --execution-provider {} is ignored",
            opts.session.provider
        );
    }
    Ok(Arc::new(crate::tract_backend::TractEngine::new(opts.threads)))
}

#[cfg(not(feature = "tract"))]
fn tract(_: &EngineOptions) -> Result<Arc<dyn Engine>> {
    Err(missing("tract"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_missing_from_the_build_is_named_with_what_the_build_has() {
        let e = missing("tract").to_string();
        assert!(e.contains("no tract engine") && e.contains("cargo feature `tract`"), "{e}");
        let have = built_in();
        assert!(e.contains(&if have.is_empty() { "none".to_string() } else { have.join(", ") }), "{e}");
    }

    #[cfg(not(any(feature = "ort", feature = "tract")))]
    #[test]
    fn auto_without_any_engine_is_an_error() {
        let e = open(&EngineOptions::default()).err().expect("no engine").to_string();
        assert!(e.contains("no ort engine"), "{e}");
    }
}
