//! ONNX Runtime as an [`Engine`]: one session per graph (the segmented backend asks for one per
//! group of segments), execution providers, and the discovery of the shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded at build time and the library is
//! opened at run time. It is looked for, in order, at the `--ort-lib` path, at
//! `ORT_DYLIB_PATH`, in the project's `.venv` (where `scripts/setup` installs the pinned
//! `onnxruntime` wheel), and finally by the system's loader.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::onnx;
use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::TensorRef;
use prost::Message;

use crate::backend::{Engine, EngineBackend, Graph, Tensor};
pub use crate::engine::{Provider, SessionOptions};
use crate::error::{Error, Result};
use crate::model::Model;

/// The ONNX Runtime version `scripts/setup` installs; `ort` needs at least API level 31.
pub const ORT_VERSION: &str = "1.31.1";

/// The loaded library's path and the process-wide environment (sessions need it to live as long
/// as they do, so it lives for the process).
static LOADED: OnceLock<std::result::Result<(PathBuf, Environment), String>> = OnceLock::new();

/// Loads ONNX Runtime once per process and returns the library path that was used. Later calls
/// return the first result whatever they pass.
///
/// Every session of the process shares one intra-op thread pool of `intra_threads` threads
/// (0: ONNX Runtime's choice, one per core). A segmented model opens one session per exit; with
/// a pool each, their idle threads would spin against each other on a small device.
pub fn init_ort(flag: Option<&Path>, intra_threads: usize) -> Result<PathBuf> {
    LOADED
        .get_or_init(|| load(flag, intra_threads))
        .as_ref()
        .map(|(p, _)| p.clone())
        .map_err(|e| Error::RuntimeLibrary(e.clone()))
}

fn environment() -> Result<&'static Environment> {
    match LOADED.get() {
        Some(Ok((_, env))) => Ok(env),
        Some(Err(e)) => Err(Error::RuntimeLibrary(e.clone())),
        None => Err(Error::RuntimeLibrary("ONNX Runtime is not loaded yet (call init_ort first)".into())),
    }
}

fn load(flag: Option<&Path>, intra_threads: usize) -> std::result::Result<(PathBuf, Environment), String> {
    let mut tried = Vec::new();
    let candidates: Vec<(PathBuf, &str)> = flag
        .map(|p| (p.to_path_buf(), "--ort-lib"))
        .into_iter()
        .chain(
            std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).map(|v| (PathBuf::from(v), "ORT_DYLIB_PATH")),
        )
        .chain(venv_library().map(|p| (p, "the project's .venv")))
        .chain([(PathBuf::from("libonnxruntime.so"), "the system library path")])
        .collect();
    for (path, from) in candidates {
        let explicit = from != "the system library path" && from != "the project's .venv";
        if explicit && !path.exists() {
            return Err(format!(
                "ONNX Runtime library {} (from {from}) does not exist; run scripts/setup to install it into .venv",
                path.display()
            ));
        }
        match ort::init_from(&path) {
            Ok(builder) => {
                let env_err = |e: ort::Error| format!("ONNX Runtime environment: {e}");
                let pool = GlobalThreadPoolOptions::default().with_intra_threads(intra_threads).map_err(env_err)?;
                let env = builder.with_name("classynet").with_global_thread_pool(pool).build().map_err(env_err)?;
                tracing::debug!(library = %path.display(), from, "loaded ONNX Runtime");
                return Ok((path, env));
            }
            Err(e) if explicit => {
                return Err(format!("cannot load ONNX Runtime from {} ({from}): {e}", path.display()))
            }
            Err(e) => tried.push(format!("{} ({from}): {e}", path.display())),
        }
    }
    Err(format!(
        "ONNX Runtime {ORT_VERSION} was not found; run scripts/setup (it installs the library into .venv), or point \
         --ort-lib / ORT_DYLIB_PATH at libonnxruntime.so. Tried: {}",
        tried.join("; ")
    ))
}

/// `.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*` next to the
/// executable's checkout (walking up from the binary) or the current directory.
fn venv_library() -> Option<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    roots.iter().find_map(|root| {
        let lib = root.join(".venv/lib");
        let py =
            std::fs::read_dir(&lib).ok()?.flatten().find(|e| e.file_name().to_string_lossy().starts_with("python3"))?;
        let capi = py.path().join("site-packages/onnxruntime/capi");
        let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so")))
            .collect();
        libs.sort();
        libs.pop()
    })
}

impl Provider {
    /// ONNX Runtime's name for the provider (`CUDAExecutionProvider`, ...).
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => ep::CUDA::NAME,
            Provider::TensorRt => ep::TensorRT::NAME,
        }
    }

    /// Whether the loaded ONNX Runtime library was built with this provider (it may still fail
    /// to register, without a GPU or its libraries). [`init_ort`] must have succeeded first.
    pub fn is_available(self) -> Result<bool> {
        environment()?;
        let be = |e: ort::Error| Error::Backend(e.to_string());
        match self {
            Provider::Cpu => Ok(true),
            Provider::Cuda => ep::CUDA::is_available().map_err(be),
            Provider::TensorRt => ep::TensorRT::is_available().map_err(be),
        }
    }

    /// Registers this provider (not the CPU, which is always there) on `builder`.
    fn register(self, builder: &mut SessionBuilder) -> std::result::Result<(), String> {
        let available = match self {
            Provider::Cpu => return Ok(()),
            Provider::Cuda => ep::CUDA::is_available(),
            Provider::TensorRt => ep::TensorRT::is_available(),
        };
        match available {
            Ok(true) => {}
            Ok(false) => {
                let lib = LOADED.get().and_then(|l| l.as_ref().ok()).map(|(p, _)| p.display().to_string());
                return Err(format!(
                    "the ONNX Runtime library {} was built without it (a CPU-only build, such as the PyPI onnxruntime \
                     wheel)",
                    lib.unwrap_or_default()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
        let registered = match self {
            Provider::Cpu => Ok(()),
            Provider::Cuda => ep::CUDA::default().register(builder),
            Provider::TensorRt => ep::TensorRT::default().register(builder),
        };
        registered.map_err(|e| e.to_string())
    }
}

/// Warns once per process about each (provider, reason) pair: a segmented model opens one session
/// per exit group and would otherwise repeat the same warning for each.
fn warn_fallback(provider: Provider, to: Provider, reason: &str) {
    static SEEN: Mutex<Vec<(Provider, String)>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.iter().any(|(p, r)| *p == provider && r == reason) {
        return;
    }
    seen.push((provider, reason.to_string()));
    tracing::warn!(
        provider = provider.as_str(),
        execution_provider = provider.ort_name(),
        "{} unavailable, falling back to {}: {reason}",
        provider.ort_name(),
        to.ort_name()
    );
}

/// Registers `wanted` on `builder`, falling back (TensorRT to CUDA, then to the CPU) with a
/// warning; returns the provider the session will run on.
fn register_provider(builder: &mut SessionBuilder, wanted: Provider) -> Provider {
    let mut next = Some(wanted);
    while let Some(p) = next {
        let fallback = match p {
            Provider::TensorRt => Provider::Cuda,
            _ => Provider::Cpu,
        };
        match p.register(builder) {
            Ok(()) => {
                if p == Provider::TensorRt {
                    // TensorRT leaves the nodes it cannot compile to the next provider; CUDA keeps
                    // them on the GPU. Without CUDA they go to the CPU, which is correct too.
                    if let Err(e) = Provider::Cuda.register(builder) {
                        tracing::debug!(reason = %e, "TensorRT without CUDA: nodes TensorRT does not take run on the CPU");
                    }
                }
                tracing::debug!(provider = p.as_str(), "registered the execution provider");
                return p;
            }
            Err(reason) => {
                warn_fallback(p, fallback, &reason);
                next = (fallback != Provider::Cpu).then_some(fallback);
            }
        }
    }
    Provider::Cpu
}

/// One ONNX Runtime session over a whole graph; outputs come back in graph output order.
pub struct OrtGraph {
    session: Session,
    input: String,
    outputs: Vec<String>,
    provider: Provider,
}

impl OrtGraph {
    /// Builds a session from an in-memory model.
    pub fn new(proto: &onnx::ModelProto, opts: SessionOptions) -> Result<OrtGraph> {
        let bytes = proto.encode_to_vec();
        OrtGraph::from_bytes(&bytes, opts)
    }

    /// Builds a session from serialized model bytes.
    ///
    /// A provider other than the CPU that cannot be registered, or whose session cannot be
    /// created, falls back to the CPU with a warning (see [`Provider`]).
    pub fn from_bytes(bytes: &[u8], opts: SessionOptions) -> Result<OrtGraph> {
        let be = |e: ort::Error| Error::Backend(e.to_string());
        let level = if opts.no_optimization { GraphOptimizationLevel::Disable } else { GraphOptimizationLevel::All };
        let builder = || -> Result<SessionBuilder> {
            Session::builder(environment()?)
                .map_err(be)?
                .with_optimization_level(level)
                .map_err(|e| Error::Backend(e.to_string()))
        };
        let mut b = builder()?;
        let mut provider = register_provider(&mut b, opts.provider);
        let session = match b.commit_from_memory(bytes) {
            Ok(s) => s,
            Err(e) if provider != Provider::Cpu => {
                // Registered, but the provider could not build this graph (a missing CUDA library
                // is often only found here): the CPU can.
                warn_fallback(provider, Provider::Cpu, &format!("creating the session failed: {e}"));
                provider = Provider::Cpu;
                builder()?.commit_from_memory(bytes).map_err(be)?
            }
            Err(e) => return Err(be(e)),
        };
        let input = session.inputs().first().map(|i| i.name().to_string()).unwrap_or_default();
        let outputs = session.outputs().iter().map(|o| o.name().to_string()).collect();
        Ok(OrtGraph { session, input, outputs, provider })
    }

    /// The execution provider this session runs on: the one asked for in [`SessionOptions`], or
    /// the one it fell back to.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Names of the outputs, in the order [`OrtGraph::run`] returns them.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Runs the graph on one float32 tensor.
    pub fn run(&mut self, input: &Tensor) -> Result<Vec<Tensor>> {
        let be = |e: ort::Error| Error::Backend(e.to_string());
        let value = TensorRef::from_array_view((input.shape.clone(), input.data.as_slice())).map_err(be)?;
        let outputs = self.session.run(ort::inputs![self.input.as_str() => value]).map_err(be)?;
        let mut out = Vec::with_capacity(self.outputs.len());
        for name in &self.outputs {
            let (shape, data) = outputs[name.as_str()].try_extract_tensor::<f32>().map_err(be)?;
            out.push(Tensor { shape: shape.iter().map(|&d| d.max(0) as usize).collect(), data: data.to_vec() });
        }
        Ok(out)
    }
}

impl Graph for OrtGraph {
    fn output_names(&self) -> &[String] {
        &self.outputs
    }

    fn run(&mut self, input: &Tensor) -> Result<Vec<Tensor>> {
        OrtGraph::run(self, input)
    }
}

/// ONNX Runtime as an [`Engine`]: every graph becomes one session with the process's options.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrtEngine {
    pub opts: SessionOptions,
}

impl OrtEngine {
    /// [`init_ort`] must have succeeded first.
    pub fn new(opts: SessionOptions) -> Result<OrtEngine> {
        environment()?;
        Ok(OrtEngine { opts })
    }

    /// A segmented backend for `model` on ONNX Runtime.
    pub fn backend(model: &Model, opts: SessionOptions) -> Result<EngineBackend> {
        EngineBackend::new(Arc::new(OrtEngine::new(opts)?), model)
    }
}

impl Engine for OrtEngine {
    fn name(&self) -> &'static str {
        "ort"
    }

    /// ONNX Runtime plans for the symbolic batch itself; the batch sizes are not needed.
    fn compile_for(&self, proto: &onnx::ModelProto, _batches: &[usize]) -> Result<Box<dyn Graph>> {
        Ok(Box::new(OrtGraph::new(proto, self.opts)?))
    }
}
