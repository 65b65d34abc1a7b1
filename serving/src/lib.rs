//! Serving pieces shared by `edge-agent` and `cloud-server`.
//!
//! Owns the Open Inference Protocol tensor codec ([`codec`]), the dynamic batcher in front of an
//! inference worker ([`batcher`]) and the one place where errors become gRPC statuses
//! ([`error`]), and the operations side both binaries share: TLS and the listener rule
//! ([`security`]), the server lifecycle (bind, health, signals, drain: [`server`]), connection
//! keepalive ([`transport`]), message compression and sent-byte counting ([`wire`]), systemd
//! readiness ([`systemd`]), logs, metrics and trace context ([`telemetry`]). It knows nothing of
//! which side of the split it runs on.

pub mod batcher;
pub mod codec;
pub mod error;
pub mod request;
pub mod security;
pub mod server;
pub mod systemd;
pub mod telemetry;
pub mod transport;
pub mod wire;

pub use error::{ServeError, ServeResult};

/// Removes the environment variables named `<prefix>...` whose value is empty, so that an env
/// file line like `EDGE_AGENT_PARTITION=` means "not set" (as an operator expects) instead of an
/// empty value that clap would parse, refuse, or count against a conflicting flag. Call it first
/// thing in `main`, before any thread starts.
pub fn ignore_empty_env(prefix: &str) {
    let empty: Vec<_> = std::env::vars_os()
        .filter(|(k, v)| v.is_empty() && k.to_str().is_some_and(|k| k.starts_with(prefix)))
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        std::env::remove_var(k);
    }
}
