//! Connection liveness shared by both servers: HTTP/2 PINGs with a timeout and TCP keepalive on
//! every accepted connection, so that a peer that vanished without a FIN (a NAT timeout, a
//! Wi-Fi drop, a killed VM) frees its streams within a bounded time instead of never.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::{Server, TcpIncoming};

/// Keepalive settings of a listener (seconds; an interval of 0 turns PINGs off).
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval_s: u64,
    pub timeout_s: u64,
}

impl Keepalive {
    fn interval(&self) -> Option<Duration> {
        (self.interval_s > 0).then(|| Duration::from_secs(self.interval_s))
    }

    /// A server builder that PINGs every connection and closes it when a PING goes unanswered.
    pub fn server(&self) -> Server {
        let builder = Server::builder().http2_keepalive_interval(self.interval());
        match self.interval() {
            Some(_) => builder.http2_keepalive_timeout(Some(Duration::from_secs(self.timeout_s.max(1)))),
            None => builder,
        }
    }

    /// Accepted connections with TCP keepalive and without Nagle (a batch's reply must not wait
    /// for a delayed ACK, 40 ms on Linux).
    pub fn incoming(&self, listener: TcpListener) -> TcpIncoming {
        TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(self.interval())
    }
}
