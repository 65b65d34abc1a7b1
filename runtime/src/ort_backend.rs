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
    /// Builds a session from an in-memory model. On the CPU with optimisation on, a graph that
    /// starts at a cut first gets the blocked-layout hint of [`keep_blocked_layout_at_inputs`].
    pub fn new(proto: &onnx::ModelProto, opts: SessionOptions) -> Result<OrtGraph> {
        let bytes = match keep_blocked_layout_at_inputs(proto) {
            Some(hinted) if opts.provider == Provider::Cpu && !opts.no_optimization => hinted.encode_to_vec(),
            _ => proto.encode_to_vec(),
        };
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

/// Makes a segment that starts at a cut as fast as the same layers inside the whole graph.
///
/// On the CPU, ONNX Runtime rewrites convolutions into a blocked channel layout (NCHWc) and
/// keeps tensors in it from one convolution to the next, fusing each residual `Add` and `Relu`
/// into the convolution before it. It only knows a tensor in that layout when an operator it
/// converted produced it; a graph input is not one. So when a cut lands inside a stage of
/// residual blocks (the cut feeds the block's first convolution *and* its skip connection),
/// every `Add` and `Relu` of the rest of that stage stays unfused, each with a reorder out of
/// and back into the blocked layout: measured as the larger part of the 8-10 % a boundary at
/// every exit cost on ResNet-110. A 1×1 max pool with stride 1 is the identity, and ONNX
/// Runtime converts it like a convolution, so putting one between the input and its consumers
/// gives them a blocked tensor to share: the fusions come back, and the segment's outputs are
/// bit for bit those of the same layers in the whole graph.
///
/// Returns the rewritten model, or `None` when nothing would gain: only a float input that
/// more than one node reads and that a 2-D convolution reads (so it is known to be `[N, C, H,
/// W]`) gets the pool; the image input of a model (one consumer) is left alone.
pub fn keep_blocked_layout_at_inputs(proto: &onnx::ModelProto) -> Option<onnx::ModelProto> {
    let g = proto.graph.as_ref()?;
    let weights: std::collections::HashMap<&str, &onnx::TensorProto> =
        g.initializer.iter().map(|t| (t.name(), t)).collect();
    let float = onnx::tensor_proto::DataType::Float as i32;
    let is_float = |v: &onnx::ValueInfoProto| match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(onnx::type_proto::Value::TensorType(t)) => t.elem_type() == float,
        _ => false,
    };
    let hinted: Vec<&str> = g
        .input
        .iter()
        .filter(|i| !weights.contains_key(i.name()) && is_float(i))
        .map(|i| i.name())
        .filter(|&name| {
            let readers: Vec<&onnx::NodeProto> = g.node.iter().filter(|n| n.input.iter().any(|x| x == name)).collect();
            let conv_2d = readers.iter().any(|n| {
                n.op_type() == "Conv"
                    && n.domain().is_empty()
                    && n.input.first().is_some_and(|x| x == name)
                    && n.input.get(1).and_then(|w| weights.get(w.as_str())).is_some_and(|w| w.dims.len() == 4)
            });
            readers.len() > 1 && conv_2d
        })
        .collect();
    if hinted.is_empty() {
        return None;
    }
    let mut out = proto.clone();
    let graph = out.graph.as_mut()?;
    let taken: std::collections::HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(graph.input.iter().map(|i| i.name().to_string()))
        .collect();
    let mut pools = Vec::new();
    for name in hinted {
        let mut blocked = format!("{name}__blocked");
        while taken.contains(&blocked) {
            blocked.push('_');
        }
        for node in &mut graph.node {
            for x in node.input.iter_mut().filter(|x| *x == name) {
                *x = blocked.clone();
            }
        }
        let ints = |name: &str, v: &[i64]| onnx::AttributeProto {
            name: Some(name.into()),
            r#type: Some(onnx::attribute_proto::AttributeType::Ints as i32),
            ints: v.to_vec(),
            ..Default::default()
        };
        pools.push(onnx::NodeProto {
            input: vec![name.to_string()],
            output: vec![blocked.clone()],
            name: Some(blocked.clone()),
            op_type: Some("MaxPool".into()),
            attribute: vec![ints("kernel_shape", &[1, 1]), ints("strides", &[1, 1])],
            ..Default::default()
        });
    }
    // Nodes stay in topological order: the pools read only graph inputs, so they go first.
    pools.append(&mut graph.node);
    graph.node = pools;
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> onnx::NodeProto {
        onnx::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            op_type: Some(op.into()),
            ..Default::default()
        }
    }

    fn graph(nodes: Vec<onnx::NodeProto>, weight_dims: &[i64]) -> onnx::ModelProto {
        let float = crate::partition::float_tensor;
        onnx::ModelProto {
            graph: Some(onnx::GraphProto {
                node: nodes,
                input: vec![float("x")],
                output: vec![float("y")],
                initializer: vec![onnx::TensorProto {
                    name: Some("w".into()),
                    dims: weight_dims.to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_cut_read_by_a_convolution_and_a_skip_connection_gets_one_identity_pool() {
        let m = graph(vec![node("Conv", &["x", "w"], "c"), node("Add", &["c", "x"], "y")], &[16, 16, 3, 3]);
        let hinted = keep_blocked_layout_at_inputs(&m).expect("two readers, one a 2-D convolution");
        let g = hinted.graph.unwrap();
        assert_eq!(g.input[0].name(), "x", "the graph's interface is unchanged");
        assert_eq!(g.node[0].op_type(), "MaxPool");
        assert_eq!((g.node[0].input.clone(), g.node[0].output.clone()), (vec!["x".into()], vec!["x__blocked".into()]));
        let kernel = g.node[0].attribute.iter().find(|a| a.name() == "kernel_shape").unwrap();
        assert_eq!(kernel.ints, [1, 1]);
        assert_eq!(g.node[1].input, ["x__blocked", "w"]);
        assert_eq!(g.node[2].input, ["c", "x__blocked"]);
    }

    #[test]
    fn inputs_that_gain_nothing_or_may_not_be_images_are_left_alone() {
        // One reader: ONNX Runtime reorders it for the convolution anyway.
        assert!(keep_blocked_layout_at_inputs(&graph(vec![node("Conv", &["x", "w"], "y")], &[16, 1, 3, 3])).is_none());
        // No 2-D convolution reads it: its rank is unknown, and a 1×1 pool needs [N, C, H, W].
        let fc = graph(vec![node("Gemm", &["x", "w"], "g"), node("Add", &["g", "x"], "y")], &[16, 16]);
        assert!(keep_blocked_layout_at_inputs(&fc).is_none());
        let conv_1d = graph(vec![node("Conv", &["x", "w"], "c"), node("Add", &["c", "x"], "y")], &[16, 16, 3]);
        assert!(keep_blocked_layout_at_inputs(&conv_1d).is_none());
    }
}
