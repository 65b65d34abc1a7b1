//! The agent's lifecycle: listen at once (NOT_SERVING), load and warm the head, serve, and drain
//! on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use classynet_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use classynet_serving::security::{self, BearerAuth, TlsFiles};
use classynet_serving::systemd;
use classynet_serving::telemetry;
use classynet_serving::transport::Keepalive;
use tokio::net::TcpListener;

use crate::api::{EdgeSlot, LocalApi};
use crate::classify::classify;
use crate::config::{Config, Verb};
use crate::Edge;

/// A running edge server.
pub struct Handle {
    pub addr: std::net::SocketAddr,
    pub edge: Arc<Edge>,
    health: tonic_health::server::HealthReporter,
    drain: Duration,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn set_health(health: &tonic_health::server::HealthReporter, status: tonic_health::ServingStatus) {
    for service in ["", "inference.GRPCInferenceService"] {
        health.set_service_status(service, status).await;
    }
}

impl Handle {
    /// Reports NOT_SERVING, stops accepting, and waits (at most `--shutdown-timeout-s`) until
    /// every accepted request is answered: by the cloud, or degraded when it is gone.
    pub async fn stop(mut self) {
        set_health(&self.health, tonic_health::ServingStatus::NotServing).await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(self.drain, &mut self.task).await.is_err() {
            tracing::warn!("requests still unanswered after {:?}; closing anyway", self.drain);
            self.task.abort();
        }
    }
}

/// Serves the local v2 API on `config.listen` at once (health NOT_SERVING), loads and warms
/// the head, then reports SERVING and returns.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    telemetry::recorder();
    let tls = TlsFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone(), ca: None };
    let server_tls = tls.server()?;
    let listen = &config.listen;
    let listener = TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    security::check_listener(&addr, server_tls.is_some(), config.insecure, "EDGE_AGENT")?;
    if let Some(m) = &config.metrics_listen {
        telemetry::serve_metrics(m).await?;
    }
    tracing::info!(%addr, "accepting connections; health is NOT_SERVING until the head is loaded and warm");
    let slot: EdgeSlot = Arc::default();
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, tonic_health::ServingStatus::NotServing).await;
    let keepalive = Keepalive { interval_s: config.keepalive_interval_s, timeout_s: config.keepalive_timeout_s };
    let mut builder = keepalive.server();
    if let Some(t) = server_tls {
        builder = builder.tls_config(t)?;
    }
    let api =
        GrpcInferenceServiceServer::with_interceptor(LocalApi(slot.clone()), BearerAuth::new(config.api_token.clone()));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(builder.add_service(health_service).add_service(api).serve_with_incoming_shutdown(
        keepalive.incoming(listener),
        async {
            let _ = rx.await;
        },
    ));
    let edge = match Edge::load(&config).await {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(());
            let _ = task.await;
            return Err(e);
        }
    };
    let _ = slot.set(edge.clone());
    set_health(&health, tonic_health::ServingStatus::Serving).await;
    tracing::info!(%addr, partition = edge.k, tls = tls.enabled(), "edge-agent ready");
    Ok(Handle { addr, edge, health, drain: Duration::from_secs(config.shutdown_timeout_s), shutdown: Some(tx), task })
}

/// Runs the agent: the classify verb, or the local server until SIGINT/SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    match config.command.clone() {
        Some(Verb::Classify { dataset, data_dir, limit, concurrency, json }) => {
            let edge = Edge::load(&config).await?;
            let out = classify(&edge, &dataset, data_dir, limit, concurrency).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out.json)?);
            } else {
                println!("{}", out.text);
            }
            Ok(())
        }
        None => {
            let handle = start(config).await?;
            println!("edge-agent listening on {}", handle.addr);
            systemd::ready(&format!("serving partition E{} on {}", handle.edge.k, handle.addr));
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down: NOT_SERVING, no new connections, answering accepted requests");
            systemd::stopping("answering accepted requests");
            handle.stop().await;
            tracing::info!("stopped");
            Ok(())
        }
    }
}
