//! `edge-agent`: runs the head partition of a ClassyNet model on a small device and forwards
//! the samples that do not exit early to `cloud-server`.
//!
//! Not built yet: split execution over gRPC is the next piece of work. Until then this binary
//! accepts its intended flags and says so, and `classynet run` / `classynet partition` cover
//! local use.

use clap::Parser;

/// Edge side of the ClassyNet split runtime (not implemented yet).
#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, about)]
struct Config {
    /// Address of cloud-server, host:port.
    #[arg(long, env = "EDGE_AGENT_SERVER")]
    server: Option<String>,
    /// Partition to run here, E1..EM.
    #[arg(long, env = "EDGE_AGENT_PARTITION")]
    partition: Option<String>,
    /// Model or head partition file.
    #[arg(long, env = "EDGE_AGENT_MODEL")]
    model: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    let _config = Config::parse();
    eprintln!(
        "edge-agent: split execution is not implemented in this version; use `classynet run` to run a model \
         locally and `classynet partition` to cut a head for a device"
    );
    std::process::ExitCode::from(2)
}
