//! `edge-agent`: parses flags and runs [`edge_agent::run`].
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = edge_agent::Config::parse();
    edge_agent::init_logging(config.log_format);
    match edge_agent::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
