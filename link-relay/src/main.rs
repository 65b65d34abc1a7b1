//! `link-relay`: parses flags, runs [`link_relay::start`] until SIGINT or SIGTERM; SIGUSR1 stalls
//! the connections open at that moment ([`link_relay::Handle::stall_existing`]).
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// TCP relay that adds a fixed one-way delay to each direction, to emulate link latency where the
/// kernel has no netem.
///
/// Every connection accepted on --listen is relayed to --upstream; every byte, in each direction,
/// is delivered --delay-ms after the relay read it (a round trip gains 2 × delay). Once bound it
/// prints "link-relay listening on ADDR" on stdout; it runs until SIGINT or SIGTERM.
///
/// SIGUSR1 silently stalls every connection open at that moment, as a NAT timeout or a Wi-Fi drop
/// would: no FIN, no RST, nothing more delivered in either direction, until the relay stops.
/// Connections accepted afterwards are relayed normally. It logs how many it stalled.
#[derive(Debug, Parser)]
#[command(name = "link-relay", version)]
struct Args {
    /// Address to accept clients on, e.g. 127.0.0.1:0 (port 0 picks a free port; the address
    /// actually bound is printed).
    #[arg(long, env = "LINK_RELAY_LISTEN", value_name = "ADDR")]
    listen: SocketAddr,
    /// Server to relay every connection to, e.g. 10.0.0.2:50051 (resolved again per connection).
    #[arg(long, env = "LINK_RELAY_UPSTREAM", value_name = "HOST:PORT")]
    upstream: String,
    /// One-way delay added to each direction, in milliseconds; fractions allowed (0: a plain relay).
    /// Delivery is never early and typically about 1 ms late (timer granularity).
    #[arg(long, env = "LINK_RELAY_DELAY_MS", value_name = "MS", value_parser = parse_delay_ms)]
    delay_ms: Duration,
    /// Most bytes queued per direction per connection. When full, the relay stops reading from
    /// that sender, so one direction carries at most this many bytes per delay.
    #[arg(long, env = "LINK_RELAY_MAX_BUFFER", value_name = "BYTES", default_value_t = link_relay::DEFAULT_MAX_BUFFER)]
    max_buffer: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    link_relay::init_logging();
    // Installed before the listening line goes out, so a script that signals as soon as it has
    // read the line still gets a clean exit, or a stall rather than the default action of SIGUSR1,
    // which kills the process.
    let shutdown = classynet_serving::server::shutdown_signal()?;
    let mut stall = stall_signal()?;
    let relay = link_relay::start(link_relay::Config {
        listen: args.listen,
        upstream: args.upstream,
        delay: args.delay_ms,
        max_buffer: args.max_buffer,
    })
    .await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "link-relay listening on {}", relay.addr)?;
    stdout.flush()?;
    drop(stdout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            () = stall.next() => {
                let n = relay.stall_existing().await;
                tracing::info!("SIGUSR1: stalled {n} open connections silently; new connections are relayed");
            }
        }
    }
    tracing::info!("stopping");
    relay.stop().await;
    Ok(())
}

fn parse_delay_ms(value: &str) -> Result<Duration, String> {
    let ms: f64 = value.trim().parse().map_err(|_| "expected a number of milliseconds".to_string())?;
    if ms.is_nan() || ms < 0.0 {
        return Err("expected 0 or more milliseconds".into());
    }
    Duration::try_from_secs_f64(ms / 1e3).map_err(|_| "too long a delay".into())
}

/// Delivers every SIGUSR1.
#[cfg(unix)]
struct StallSignal(tokio::signal::unix::Signal);

#[cfg(unix)]
impl StallSignal {
    async fn next(&mut self) {
        if self.0.recv().await.is_none() {
            // The signal driver is gone, so no SIGUSR1 can arrive any more.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(unix)]
fn stall_signal() -> std::io::Result<StallSignal> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok(StallSignal(signal(SignalKind::user_defined1())?))
}

/// No SIGUSR1 outside Unix: never delivers.
#[cfg(not(unix))]
struct StallSignal;

#[cfg(not(unix))]
impl StallSignal {
    async fn next(&mut self) {
        std::future::pending::<()>().await;
    }
}

#[cfg(not(unix))]
fn stall_signal() -> std::io::Result<StallSignal> {
    Ok(StallSignal)
}
