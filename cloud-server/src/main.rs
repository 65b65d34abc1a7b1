//! `cloud-server`: parses flags and runs [`cloud_server::run`].
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = cloud_server::Config::parse();
    cloud_server::init_logging(config.log_format);
    cloud_server::run(config).await
}
