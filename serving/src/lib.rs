//! Serving pieces shared by `edge-agent` and `cloud-server`.
//!
//! Owns the Open Inference Protocol tensor codec ([`codec`]), the dynamic batcher in front of an
//! inference worker ([`batcher`]) and the one place where errors become gRPC statuses
//! ([`error`]), and the operations side both binaries share: TLS and the listener rule
//! ([`security`]), systemd readiness ([`systemd`]), logs, metrics and trace context
//! ([`telemetry`]). It knows nothing of which side of the split it runs on.

pub mod batcher;
pub mod codec;
pub mod error;
pub mod security;
pub mod systemd;
pub mod telemetry;

pub use error::{ServeError, ServeResult};
