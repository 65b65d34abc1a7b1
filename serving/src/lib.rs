//! Serving pieces shared by `edge-agent` and `cloud-server`.
//!
//! Owns the Open Inference Protocol tensor codec ([`codec`]), the dynamic batcher in front of an
//! inference worker ([`batcher`]) and the one place where errors become gRPC statuses
//! ([`error`]). It knows nothing of which side of the split it runs on.

pub mod batcher;
pub mod codec;
pub mod error;

pub use error::{ServeError, ServeResult};
