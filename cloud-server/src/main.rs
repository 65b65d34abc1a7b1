//! `cloud-server`: runs the tail of a ClassyNet model for the edges and pushes exit policies
//! to them.
//!
//! Not built yet: split execution over gRPC is the next piece of work. Until then this binary
//! accepts its intended flags and says so.

use clap::Parser;

/// Cloud side of the ClassyNet split runtime (not implemented yet).
#[derive(Debug, Parser)]
#[command(name = "cloud-server", version, about)]
struct Config {
    /// Full ClassyNet ONNX model.
    #[arg(long, env = "CLOUD_SERVER_MODEL")]
    model: Option<std::path::PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "CLOUD_SERVER_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
}

fn main() -> std::process::ExitCode {
    let _config = Config::parse();
    eprintln!("cloud-server: split execution is not implemented in this version; use `classynet run` locally");
    std::process::ExitCode::from(2)
}
