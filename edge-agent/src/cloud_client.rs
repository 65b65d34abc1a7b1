//! The client side of the link to the cloud: the endpoint with TLS and keepalive, the link's
//! health with backoff.

use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_serving::codec::WireDtype;
use classynet_serving::security::TlsFiles;
use tonic::transport::Endpoint;

use crate::config::Config;

/// The cloud's endpoint: https with the TLS settings when a CA is given, http otherwise.
pub(crate) fn cloud_endpoint(config: &Config) -> anyhow::Result<Option<Endpoint>> {
    let Some(addr) = &config.server else { return Ok(None) };
    let tls = TlsFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone(), ca: config.tls_ca.clone() };
    // The edge's own certificate alone does not turn on TLS to the cloud: that needs the CA.
    let client_tls = if config.tls_ca.is_some() { tls.client(config.tls_server_name.as_deref())? } else { None };
    let scheme = if client_tls.is_some() { "https" } else { "http" };
    let uri = match addr.split_once("://") {
        Some((_, rest)) => format!("{scheme}://{rest}"),
        None => format!("{scheme}://{addr}"),
    };
    let mut ep = Endpoint::from_shared(uri.clone()).map_err(|e| anyhow::anyhow!("--server {addr}: {e}"))?;
    if let Some(t) = client_tls {
        ep = ep.tls_config(t).map_err(|e| anyhow::anyhow!("TLS settings for {uri}: {e}"))?;
    }
    Ok(Some(keepalive(ep.connect_timeout(Duration::from_millis(config.cloud_timeout_ms)), config)))
}

/// HTTP/2 PINGs (also while no call is open) and TCP keepalive on the cloud channel: a
/// connection that silently stops carrying packets (a NAT timeout, a Wi-Fi drop) is closed after
/// `--keepalive-interval-s` + `--keepalive-timeout-s` at most, and the next call or policy
/// stream dials a new one.
fn keepalive(ep: Endpoint, config: &Config) -> Endpoint {
    if config.keepalive_interval_s == 0 {
        return ep;
    }
    let interval = Duration::from_secs(config.keepalive_interval_s);
    ep.http2_keep_alive_interval(interval)
        .keep_alive_timeout(Duration::from_secs(config.keepalive_timeout_s.max(1)))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(interval))
}

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Capped exponential backoff with full jitter, so that many edges do not retry in step after a
/// cloud restart.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    /// How long to wait now; the next wait doubles (up to the cap).
    pub(crate) fn wait(&mut self) -> Duration {
        let jitter =
            (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
                % 1000) as f64
                / 1000.0;
        let wait = self.next.mul_f64(0.5 + 0.5 * jitter);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// The link to the cloud, with backoff after failures.
pub(crate) struct CloudLink {
    pub(crate) client: Option<GrpcInferenceServiceClient<Channel>>,
    pub(crate) timeout: Duration,
    pub(crate) dtype: WireDtype,
    state: Mutex<LinkState>,
}

struct LinkState {
    /// While set and in the future, the cloud is considered down: answer degraded at once.
    down_until: Option<Instant>,
    backoff: Backoff,
    /// Changes whenever the link is marked down or up again. A forward remembers it when sent:
    /// its failure counts only if nothing changed meanwhile, so the several forwards in flight
    /// when a link dies (the pipeline keeps two or three) double the backoff once, not each.
    generation: u64,
}

impl CloudLink {
    pub(crate) fn new(
        client: Option<GrpcInferenceServiceClient<Channel>>,
        timeout: Duration,
        dtype: WireDtype,
    ) -> Self {
        let state = LinkState { down_until: None, backoff: Backoff::new(), generation: 0 };
        CloudLink { client, timeout, dtype, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().expect("no code panics while holding the link state")
    }

    /// Whether to answer degraded without trying, and the generation a forward sent now carries.
    pub(crate) fn check(&self) -> (bool, u64) {
        let s = self.state();
        (matches!(s.down_until, Some(t) if Instant::now() < t), s.generation)
    }

    /// A forward sent at `generation` failed.
    pub(crate) fn failed(&self, generation: u64) {
        let mut s = self.state();
        if s.generation != generation {
            return; // this outage is already being waited out
        }
        let wait = s.backoff.wait();
        s.down_until = Some(Instant::now() + wait);
        s.generation += 1;
    }

    pub(crate) fn succeeded(&self) {
        let mut s = self.state();
        if s.down_until.is_some() {
            s.down_until = None;
            s.backoff.reset();
            s.generation += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let mut nominal = BACKOFF_MIN;
        for _ in 0..10 {
            let wait = b.wait();
            // Full jitter over the upper half: never shorter than half the nominal wait.
            assert!(wait >= nominal / 2 && wait <= nominal, "{wait:?} outside [{:?}, {nominal:?}]", nominal / 2);
            nominal = (nominal * 2).min(BACKOFF_MAX);
        }
        assert_eq!(nominal, BACKOFF_MAX, "ten failures reach the cap");
        assert!(b.wait() <= BACKOFF_MAX);
        b.reset();
        assert!(b.wait() <= BACKOFF_MIN, "a reset starts again from the minimum");
    }

    #[test]
    fn the_forwards_in_flight_when_a_link_dies_count_as_one_failure() {
        let link = CloudLink::new(None, Duration::from_secs(1), WireDtype::Fp32);
        let (down, g) = link.check();
        assert!(!down);
        // Three pipelined forwards, all sent before the link died, fail one after another.
        for _ in 0..3 {
            link.failed(g);
        }
        let s = link.state();
        let wait = s.down_until.unwrap() - Instant::now();
        assert!(wait <= BACKOFF_MIN, "one doubling at most: the wait is {wait:?}");
        assert_eq!(s.generation, g + 1);
        drop(s);
        // A probe after the wait fails too: that is a second failure, and the wait doubles.
        let (_, g2) = link.check();
        link.failed(g2);
        assert!(link.state().down_until.unwrap() - Instant::now() <= BACKOFF_MIN * 2);
        link.succeeded();
        assert!(!link.check().0, "one success ends the outage");
    }
}
