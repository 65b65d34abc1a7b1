//! The agent's lifecycle: listen at once (NOT_SERVING), load and warm the head, serve, and drain
//! on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use classynet_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use classynet_serving::security::{BearerAuth, TlsFiles};
use classynet_serving::server::{shutdown_signal, Bound, Listen, Server};
use classynet_serving::systemd;
use classynet_serving::transport::Keepalive;
use tonic::service::Routes;

use crate::api::{EdgeSlot, LocalApi};
use crate::classify::classify;
use crate::config::{Config, Verb};
use crate::Edge;

/// A running edge server.
pub struct Handle {
    pub addr: std::net::SocketAddr,
    pub edge: Arc<Edge>,
    server: Server,
}

impl Handle {
    /// Reports NOT_SERVING, stops accepting, and waits (at most `--shutdown-timeout-s`) until
    /// every accepted request is answered: by the cloud, or degraded when it is gone.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

fn listen(config: &Config) -> Listen {
    Listen {
        addr: config.listen.clone(),
        tls: TlsFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone(), ca: None },
        insecure: config.insecure,
        env_prefix: "EDGE_AGENT",
        keepalive: Keepalive { interval_s: config.keepalive_interval_s, timeout_s: config.keepalive_timeout_s },
        metrics: config.metrics_listen.clone(),
        services: &["inference.GRPCInferenceService"],
        drain: Duration::from_secs(config.shutdown_timeout_s),
    }
}

/// Serves the local v2 API on `config.listen` at once (health NOT_SERVING), loads and warms
/// the head, then reports SERVING and returns.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    let bound = Bound::bind(listen(&config)).await?;
    let addr = bound.addr();
    tracing::info!(%addr, "accepting connections; health is NOT_SERVING until the head is loaded and warm");
    let slot: EdgeSlot = Arc::default();
    // Clients may compress their images (zstd or gzip); answers go back uncompressed.
    let api = classynet_serving::wire::ACCEPTED
        .into_iter()
        .fold(GrpcInferenceServiceServer::new(LocalApi(slot.clone())), |s, e| s.accept_compressed(e));
    let api = tonic::service::interceptor::InterceptedService::new(api, BearerAuth::new(config.api_token.clone()));
    let server = bound.serve(Routes::new(api)).await?;
    let edge = match Edge::load(&config).await {
        Ok(e) => e,
        Err(e) => {
            server.stop().await;
            return Err(e);
        }
    };
    let _ = slot.set(edge.clone());
    server.set_serving().await;
    tracing::info!(%addr, partition = edge.k, tls = config.tls_cert.is_some(), "edge-agent ready");
    Ok(Handle { addr, edge, server })
}

/// Runs the agent: the classify verb, or the local server until SIGINT/SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    match config.command.clone() {
        Some(Verb::Classify { dataset, data_dir, limit, concurrency, json }) => {
            // A long job's progress (samples answered, by exit and place) can be watched as the
            // server's is.
            if let Some(m) = &config.metrics_listen {
                classynet_serving::telemetry::recorder();
                classynet_serving::telemetry::serve_metrics(m).await?;
            }
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
            let mut signal = std::pin::pin!(shutdown_signal()?);
            let handle = tokio::select! {
                started = start(config) => started?,
                _ = &mut signal => {
                    tracing::info!("stopped before the head was ready");
                    return Ok(());
                }
            };
            println!("edge-agent listening on {}", handle.addr);
            systemd::ready(&format!("serving partition E{} on {}", handle.edge.k, handle.addr));
            signal.await;
            tracing::info!("shutting down: NOT_SERVING, no new connections, answering accepted requests");
            systemd::stopping("answering accepted requests");
            handle.stop().await;
            tracing::info!("stopped");
            Ok(())
        }
    }
}
