//! `cloud-server`: parses flags and runs [`cloud_server::run`].
use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads exist: the environment is only safe to change single-threaded.
    classynet_serving::ignore_empty_env("CLOUD_SERVER_");
    let config = cloud_server::Config::parse();
    cloud_server::init_logging(config.log_format);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(cloud_server::run(config))
}
