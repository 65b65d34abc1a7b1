//! The lifecycle both servers share: bind at once, report NOT_SERVING while the model loads and
//! warms, report SERVING, and on SIGTERM report NOT_SERVING again, stop accepting and drain what
//! was accepted within a bounded time.
//!
//! Binding comes first so that a port conflict or a TLS mistake fails in milliseconds, and a
//! probe (Kubernetes, systemd, a load balancer) sees a live process that says "not yet" instead
//! of a refused connection while a large model loads.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::ServerTlsConfig;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::error::{ServeError, ServeResult};
use crate::security::{self, TlsFiles};
use crate::telemetry;
use crate::transport::Keepalive;

/// How a server listens; everything here comes from its flags.
#[derive(Debug, Clone)]
pub struct Listen {
    /// `host:port` to bind (port 0 picks a free port).
    pub addr: String,
    pub tls: TlsFiles,
    /// Allow plain text on a non-loopback address (`--insecure`).
    pub insecure: bool,
    /// Prefix of the binary's environment variables, for the message that names the flags.
    pub env_prefix: &'static str,
    pub keepalive: Keepalive,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<String>,
    /// The gRPC services whose health is reported, besides the whole server ("").
    pub services: &'static [&'static str],
    /// How long a stop waits for accepted requests before closing anyway.
    pub drain: Duration,
}

/// A bound listener whose services are not yet running.
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<ServerTlsConfig>,
    listen: Listen,
}

impl Bound {
    /// Installs the metrics recorder, loads TLS material, binds, refuses plain text off loopback
    /// unless allowed, and starts the metrics endpoint.
    pub async fn bind(listen: Listen) -> ServeResult<Bound> {
        telemetry::recorder();
        let tls = listen.tls.server()?;
        let listener = TcpListener::bind(&listen.addr)
            .await
            .map_err(|e| ServeError::Listen(format!("cannot listen on {}: {e}", listen.addr)))?;
        let addr = listener.local_addr().map_err(|e| ServeError::Listen(format!("{}: {e}", listen.addr)))?;
        security::check_listener(&addr, tls.is_some(), listen.insecure, listen.env_prefix)?;
        if let Some(m) = &listen.metrics {
            telemetry::serve_metrics(m).await?;
        }
        Ok(Bound { listener, addr, tls, listen })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts serving `routes` and the `grpc.health.v1` service, every service NOT_SERVING
    /// until [`Server::set_serving`].
    pub async fn serve(self, routes: Routes) -> ServeResult<Server> {
        let Bound { listener, addr, tls, listen } = self;
        let mut builder = listen.keepalive.server();
        if let Some(t) = tls {
            builder = builder.tls_config(t).map_err(|e| ServeError::Listen(format!("TLS configuration: {e}")))?;
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        // The reporter starts with the whole server ("") SERVING: say NOT_SERVING before the
        // first connection can be served, not after (a health check that raced the report
        // saw SERVING while the model was still loading).
        for service in std::iter::once("").chain(listen.services.iter().copied()) {
            health.set_service_status(service, ServingStatus::NotServing).await;
        }
        let (shutdown, stopped) = oneshot::channel::<()>();
        let router = builder.add_routes(routes.add_service(health_service));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(listen.keepalive.incoming(listener), async {
            let _ = stopped.await;
        }));
        Ok(Server { addr, health, services: listen.services, drain: listen.drain, shutdown: Some(shutdown), task })
    }
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    health: HealthReporter,
    services: &'static [&'static str],
    drain: Duration,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    async fn report(&self, status: ServingStatus) {
        // "" is the whole server, as load balancers and grpc_health_probe ask by default.
        for service in std::iter::once("").chain(self.services.iter().copied()) {
            self.health.set_service_status(service, status).await;
        }
    }

    /// Reports SERVING for the server and each of its services.
    pub async fn set_serving(&self) {
        self.report(ServingStatus::Serving).await;
    }

    /// Reports NOT_SERVING, stops accepting, and waits at most the drain time for accepted
    /// requests to be answered. Returns false when it had to close with requests unanswered.
    pub async fn stop(mut self) -> bool {
        self.report(ServingStatus::NotServing).await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(self.drain, &mut self.task).await.is_err() {
            tracing::warn!("requests still unanswered after {:?}; closing anyway", self.drain);
            self.task.abort();
            return false;
        }
        true
    }
}

/// A future that completes on SIGINT or SIGTERM (Ctrl-C outside Unix). Install it before
/// announcing readiness: a supervisor that signals as soon as it reads the ready line must get a
/// clean drain, not the default action, which kills the process.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    fn listen(addr: &str, services: &'static [&'static str]) -> Listen {
        Listen {
            addr: addr.into(),
            tls: TlsFiles::default(),
            insecure: false,
            env_prefix: "TEST",
            keepalive: Keepalive { interval_s: 10, timeout_s: 5 },
            metrics: None,
            services,
            drain: Duration::from_secs(2),
        }
    }

    async fn channel(addr: SocketAddr) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await
    }

    async fn status(addr: SocketAddr, service: &str) -> i32 {
        let mut c = HealthClient::new(channel(addr).await.unwrap());
        c.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status
    }

    #[tokio::test]
    async fn health_follows_the_lifecycle_for_every_service() {
        let bound = Bound::bind(listen("127.0.0.1:0", &["a.Service"])).await.unwrap();
        let addr = bound.addr();
        let server = bound.serve(Routes::default()).await.unwrap();
        for service in ["", "a.Service"] {
            assert_eq!(status(addr, service).await, Wire::NotServing as i32, "{service:?} before set_serving");
        }
        server.set_serving().await;
        for service in ["", "a.Service"] {
            assert_eq!(status(addr, service).await, Wire::Serving as i32, "{service:?}");
        }
        assert!(server.stop().await, "an idle server drains at once");
        assert!(channel(addr).await.is_err(), "stopped: no new connections");
    }

    #[tokio::test]
    async fn a_taken_port_and_plain_text_off_loopback_are_clear_errors() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = Bound::bind(listen(&addr, &[])).await.err().expect("port in use");
        assert!(e.to_string().starts_with(&format!("cannot listen on {addr}: ")), "{e}");
        let e = Bound::bind(listen("0.0.0.0:0", &[])).await.err().expect("plain text on every interface");
        assert!(e.to_string().contains("--insecure") && e.to_string().contains("TEST_TLS_CERT"), "{e}");
    }
}
