//! How the edge dials the cloud: endpoints with TLS and keepalive, and capped backoff. Which
//! replica gets a forward is `replicas`' business.

use std::net::SocketAddr;
use std::time::Duration;

use classynet_serving::security::TlsFiles;
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::config::Config;

/// Builds the endpoint of one cloud replica from the agent's TLS and keepalive settings.
pub(crate) struct Dialer {
    tls: Option<TlsFiles>,
    server_name: Option<String>,
    connect_timeout: Duration,
    keepalive_interval_s: u64,
    keepalive_timeout_s: u64,
}

impl Dialer {
    pub(crate) fn new(config: &Config) -> anyhow::Result<Dialer> {
        // The edge's own certificate alone does not turn on TLS to the cloud: that needs the CA.
        let tls = config.tls_ca.is_some().then(|| TlsFiles {
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
            ca: config.tls_ca.clone(),
        });
        let dialer = Dialer {
            tls,
            server_name: config.tls_server_name.clone(),
            connect_timeout: Duration::from_millis(config.cloud_timeout_ms),
            keepalive_interval_s: config.keepalive_interval_s,
            keepalive_timeout_s: config.keepalive_timeout_s,
        };
        // Read the TLS files now: a missing CA is a start-up error, not a failed forward later.
        dialer.client_tls("localhost")?;
        Ok(dialer)
    }

    #[cfg(test)]
    pub(crate) fn plain() -> Dialer {
        Dialer {
            tls: None,
            server_name: None,
            connect_timeout: Duration::from_secs(1),
            keepalive_interval_s: 0,
            keepalive_timeout_s: 0,
        }
    }

    fn client_tls(&self, host: &str) -> anyhow::Result<Option<ClientTlsConfig>> {
        let Some(tls) = &self.tls else { return Ok(None) };
        // The replica is dialled by address; its certificate is checked against the name it was
        // found under (or --tls-server-name).
        Ok(tls.client(Some(self.server_name.as_deref().unwrap_or(host)))?)
    }

    /// The endpoint of the replica at `addr`, found under the name `host`: https with the TLS
    /// settings when a CA is given, http otherwise.
    pub(crate) fn endpoint(&self, host: &str, addr: SocketAddr) -> anyhow::Result<Endpoint> {
        let tls = self.client_tls(host)?;
        let uri = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
        let mut ep = Endpoint::from_shared(uri.clone()).map_err(|e| anyhow::anyhow!("cloud address {uri}: {e}"))?;
        if let Some(t) = tls {
            ep = ep.tls_config(t).map_err(|e| anyhow::anyhow!("TLS settings for {uri}: {e}"))?;
        }
        Ok(self.keepalive(ep.connect_timeout(self.connect_timeout)))
    }

    /// HTTP/2 PINGs (also while no call is open) and TCP keepalive on a cloud channel: a
    /// connection that silently stops carrying packets (a NAT timeout, a Wi-Fi drop) is closed
    /// after `--keepalive-interval-s` + `--keepalive-timeout-s` at most, and the next call or
    /// stream dials a new one.
    fn keepalive(&self, ep: Endpoint) -> Endpoint {
        if self.keepalive_interval_s == 0 {
            return ep;
        }
        let interval = Duration::from_secs(self.keepalive_interval_s);
        ep.http2_keep_alive_interval(interval)
            .keep_alive_timeout(Duration::from_secs(self.keepalive_timeout_s.max(1)))
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(interval))
    }
}

pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Capped exponential backoff with full jitter, so that many edges do not retry in step after a
/// cloud restart.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff::between(BACKOFF_MIN, BACKOFF_MAX)
    }

    pub(crate) fn between(min: Duration, max: Duration) -> Backoff {
        Backoff { next: min, min, max }
    }

    /// How long to wait now; the next wait doubles (up to the cap).
    pub(crate) fn wait(&mut self) -> Duration {
        let jitter =
            (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
                % 1000) as f64
                / 1000.0;
        let wait = self.next.mul_f64(0.5 + 0.5 * jitter);
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
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
}
