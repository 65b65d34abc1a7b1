//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime core. Messages say what was expected and what was
/// found, because they reach users unchanged (CLI output, gRPC status messages).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid ONNX model (corrupt, truncated, not protobuf).
    #[error("{origin} is not a readable ONNX model: {detail}")]
    Onnx { origin: String, detail: String },
    /// The `classynet` metadata is missing, malformed, or inconsistent with the graph.
    #[error("model metadata: {0}")]
    Metadata(String),
    /// A cut or exit cannot be extracted from the graph.
    #[error("partition: {0}")]
    Partition(String),
    /// An exit policy does not fit the model.
    #[error("policy: {0}")]
    Policy(String),
    /// A dataset file or dataset name is wrong.
    #[error("dataset: {0}")]
    Dataset(String),
    /// An input tensor does not have the shape or type the model expects.
    #[error("input: {0}")]
    Input(String),
    /// A command-line value could not be parsed (sizes, partition names).
    #[error("{0}")]
    Parse(String),
    /// ONNX Runtime could not be found or loaded.
    #[error("{0}")]
    RuntimeLibrary(String),
    /// ONNX Runtime failed while building a session or running a segment.
    #[error("inference backend: {0}")]
    Backend(String),
    /// The backend worker thread is gone (it panicked or was shut down).
    #[error("inference worker stopped: {0}")]
    WorkerGone(String),
}

impl Error {
    /// A short static label, for metrics and for mapping to gRPC status codes at one boundary.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Onnx { .. } => "onnx",
            Error::Metadata(_) => "metadata",
            Error::Partition(_) => "partition",
            Error::Policy(_) => "policy",
            Error::Dataset(_) => "dataset",
            Error::Input(_) => "input",
            Error::Parse(_) => "parse",
            Error::RuntimeLibrary(_) => "runtime_library",
            Error::Backend(_) => "backend",
            Error::WorkerGone(_) => "worker_gone",
        }
    }

    /// An I/O error on `path` (the message names the file).
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
