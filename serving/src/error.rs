//! The serving error type and its single conversion into `tonic::Status`.

use tonic::{Code, Status};

/// Errors of a serving request. Messages say what was expected and what was found; they reach
/// the client as the status message.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is malformed or does not fit the model.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown model or cut.
    #[error("{0}")]
    NotFound(String),
    /// The request would exceed the configured batch or queue limits.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The model, the worker or the peer is not available.
    #[error("{0}")]
    Unavailable(String),
    /// The caller's deadline passed before the work was done.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The request was refused for a state reason (for example a model fingerprint mismatch).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A server could not start listening (address taken, TLS set-up).
    #[error("{0}")]
    Listen(String),
    /// Anything else from the runtime core.
    #[error(transparent)]
    Runtime(#[from] classynet_runtime::Error),
}

impl ServeError {
    /// Short static label, for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            ServeError::InvalidArgument(_) => "invalid_argument",
            ServeError::NotFound(_) => "not_found",
            ServeError::ResourceExhausted(_) => "resource_exhausted",
            ServeError::Unavailable(_) => "unavailable",
            ServeError::DeadlineExceeded(_) => "deadline_exceeded",
            ServeError::FailedPrecondition(_) => "failed_precondition",
            ServeError::Listen(_) => "listen",
            ServeError::Runtime(e) => e.error_type(),
        }
    }

    /// The gRPC status code this error becomes.
    pub fn code(&self) -> Code {
        use classynet_runtime::Error as R;
        match self {
            ServeError::InvalidArgument(_) => Code::InvalidArgument,
            ServeError::NotFound(_) => Code::NotFound,
            ServeError::ResourceExhausted(_) => Code::ResourceExhausted,
            ServeError::Unavailable(_) => Code::Unavailable,
            ServeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServeError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServeError::Listen(_) => Code::Unavailable,
            ServeError::Runtime(r) => match r {
                R::Input(_) | R::Policy(_) | R::Parse(_) => Code::InvalidArgument,
                R::WorkerGone(_) | R::RuntimeLibrary(_) => Code::Unavailable,
                _ => Code::Internal,
            },
        }
    }

    /// The same error again (same status code and message), for every request of a batch that
    /// failed as a whole.
    pub fn duplicate(&self) -> ServeError {
        let msg = self.to_string();
        match self.code() {
            Code::InvalidArgument => ServeError::InvalidArgument(msg),
            Code::NotFound => ServeError::NotFound(msg),
            Code::ResourceExhausted => ServeError::ResourceExhausted(msg),
            Code::DeadlineExceeded => ServeError::DeadlineExceeded(msg),
            Code::FailedPrecondition => ServeError::FailedPrecondition(msg),
            _ => ServeError::Unavailable(msg),
        }
    }
}

/// Result with [`ServeError`].
pub type ServeResult<T> = Result<T, ServeError>;

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
