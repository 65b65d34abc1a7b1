//! The server's lifecycle: listen at once (NOT_SERVING), load and warm the model, serve, and
//! drain on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use classynet_proto::control::control_server::ControlServer;
use classynet_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use classynet_runtime::model::{Dim, Model};
use classynet_serving::security::{self, TlsFiles};
use classynet_serving::systemd;
use classynet_serving::telemetry;
use classynet_serving::transport::Keepalive;
use tokio::net::TcpListener;

use crate::api::control::ControlApi;
use crate::api::inference::InferenceApi;
use crate::api::Slot;
use crate::cloud::Cloud;
use crate::config::Config;
use crate::policy_file::watch_policy_file;

/// A running server: its address and a way to stop it.
pub struct Handle {
    pub addr: SocketAddr,
    pub cloud: Arc<Cloud>,
    health: tonic_health::server::HealthReporter,
    drain: Duration,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn set_health(health: &tonic_health::server::HealthReporter, status: tonic_health::ServingStatus) {
    // "" is the whole server, as load balancers and grpc_health_probe ask by default.
    for service in ["", "inference.GRPCInferenceService", "classynet.v1.Control"] {
        health.set_service_status(service, status).await;
    }
}

impl Handle {
    /// Reports NOT_SERVING, stops accepting, ends policy streams, lets in-flight calls finish
    /// (at most `--shutdown-timeout-s`), and waits for the server to end.
    pub async fn stop(mut self) {
        set_health(&self.health, tonic_health::ServingStatus::NotServing).await;
        self.cloud.stopping.send_replace(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(self.drain, &mut self.task).await.is_err() {
            tracing::warn!("in-flight calls did not finish within {:?}; closing anyway", self.drain);
            self.task.abort();
        }
    }
}

/// Largest request a client may send: a full batch of the largest per-sample input (image or
/// cut tensor) in FP32, plus room for the envelope.
fn message_limit(model: &Model, max_batch: usize) -> usize {
    let mut shapes = vec![Some(model.meta.input.shape.clone())];
    for e in &model.meta.exits {
        if let Some(cut) = e.cut.as_deref() {
            shapes.push(
                model.tensor_shape(cut).and_then(|d| {
                    d.iter().skip(1).map(|x| if let Dim::Fixed(n) = x { Some(*n) } else { None }).collect()
                }),
            );
        }
    }
    let per_sample = shapes.iter().flatten().map(|s| s.iter().product::<usize>()).max().unwrap_or(1 << 16);
    max_batch.max(1) * per_sample * 4 + (64 << 10)
}

/// Serves on `config.listen` at once (health says NOT_SERVING, other calls UNAVAILABLE), loads
/// and warms the model, then reports SERVING (and READY=1 to systemd) and returns.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    telemetry::recorder();
    let tls = TlsFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone(), ca: config.tls_ca.clone() };
    let server_tls = tls.server()?;
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    security::check_listener(&addr, server_tls.is_some(), config.insecure, "CLOUD_SERVER")?;
    if let Some(m) = &config.metrics_listen {
        telemetry::serve_metrics(m).await?;
    }
    let path = config.model.clone();
    let model = tokio::task::spawn_blocking(move || Model::load(&path)).await??;
    let limit = message_limit(&model, config.max_batch);
    drop(model);

    tracing::info!(%addr, "accepting connections; health is NOT_SERVING until the model is loaded and warm");
    let slot: Slot = Arc::default();
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, tonic_health::ServingStatus::NotServing).await;
    let inference = GrpcInferenceServiceServer::new(InferenceApi(slot.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let control = ControlServer::new(ControlApi(slot.clone()));
    let keepalive = Keepalive { interval_s: config.keepalive_interval_s, timeout_s: config.keepalive_timeout_s };
    let mut builder = keepalive.server();
    if let Some(t) = server_tls {
        builder = builder.tls_config(t)?;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        builder.add_service(health_service).add_service(inference).add_service(control).serve_with_incoming_shutdown(
            keepalive.incoming(listener),
            async {
                let _ = rx.await;
            },
        ),
    );
    let cfg = config.clone();
    let cloud = match tokio::task::spawn_blocking(move || Cloud::load(&cfg)).await {
        Ok(Ok(c)) => c,
        failed => {
            let _ = tx.send(());
            let _ = task.await;
            return Err(match failed {
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("loading the model failed: {e}"),
                Ok(Ok(_)) => unreachable!(),
            });
        }
    };
    let _ = slot.set(cloud.clone());
    metrics::gauge!(telemetry::POLICY_VERSION, "side" => "cloud").set(cloud.policy_version() as f64);
    if let Some(path) = config.policy.clone() {
        tokio::spawn(watch_policy_file(cloud.clone(), path));
    }
    set_health(&health, tonic_health::ServingStatus::Serving).await;
    tracing::info!(%addr, model = %cloud.name, exits = cloud.model.num_exits(), max_message_bytes = limit,
        tls = tls.enabled(), mutual_tls = config.tls_ca.is_some(), "cloud-server ready");
    Ok(Handle { addr, cloud, health, drain: Duration::from_secs(config.shutdown_timeout_s), shutdown: Some(tx), task })
}

/// Runs the server until SIGINT or SIGTERM, then drains (see [`Handle::stop`]).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let handle = start(config).await?;
    println!("cloud-server listening on {}", handle.addr);
    systemd::ready(&format!("serving {} on {}", handle.cloud.name, handle.addr));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: NOT_SERVING, no new connections, finishing in-flight calls");
    systemd::stopping("draining in-flight calls");
    handle.stop().await;
    tracing::info!("stopped");
    Ok(())
}
