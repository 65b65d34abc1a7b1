//! `edge-agent`: parses flags and runs [`edge_agent::run`].
use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before the runtime's threads exist: the environment is only safe to change single-threaded.
    classynet_serving::ignore_empty_env("EDGE_AGENT_");
    let config = edge_agent::Config::parse();
    edge_agent::init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(edge_agent::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
