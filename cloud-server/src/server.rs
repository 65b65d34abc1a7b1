//! The server's lifecycle: listen at once (NOT_SERVING), load and warm the model, serve, and
//! drain on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use classynet_proto::control::control_server::ControlServer;
use classynet_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use classynet_runtime::model::{Dim, Model};
use classynet_serving::security::TlsFiles;
use classynet_serving::server::{shutdown_signal, Bound, Listen, Server};
use classynet_serving::systemd;
use classynet_serving::telemetry;
use classynet_serving::transport::Keepalive;
use tonic::service::Routes;

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
    server: Server,
}

impl Handle {
    /// Reports NOT_SERVING, ends policy streams, stops accepting, lets in-flight calls finish (at
    /// most `--shutdown-timeout-s`), and waits for the server to end.
    pub async fn stop(self) {
        // Policy streams never end by themselves; without this the drain would wait its full time.
        self.cloud.stopping.send_replace(true);
        self.server.stop().await;
    }
}

fn listen(config: &Config) -> Listen {
    Listen {
        addr: config.listen.clone(),
        tls: TlsFiles { cert: config.tls_cert.clone(), key: config.tls_key.clone(), ca: config.tls_ca.clone() },
        insecure: config.insecure,
        env_prefix: "CLOUD_SERVER",
        keepalive: Keepalive { interval_s: config.keepalive_interval_s, timeout_s: config.keepalive_timeout_s },
        metrics: config.metrics_listen.clone(),
        services: &["inference.GRPCInferenceService", "classynet.v1.Control"],
        drain: Duration::from_secs(config.shutdown_timeout_s),
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
    let bound = Bound::bind(listen(&config)).await?;
    let addr = bound.addr();
    let path = config.model.clone();
    let model = tokio::task::spawn_blocking(move || Model::load(&path)).await??;
    let limit = message_limit(&model, config.max_batch);
    drop(model);

    tracing::info!(%addr, "accepting connections; health is NOT_SERVING until the model is loaded and warm");
    let slot: Slot = Arc::default();
    // Forwards come compressed (zstd or gzip) or not; answers go back uncompressed (a few
    // bytes per sample).
    let inference = classynet_serving::wire::ACCEPTED
        .into_iter()
        .fold(GrpcInferenceServiceServer::new(InferenceApi(slot.clone())), |s, e| s.accept_compressed(e))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let control = ControlServer::new(ControlApi(slot.clone()));
    let server = bound.serve(Routes::new(inference).add_service(control)).await?;
    let cfg = config.clone();
    let cloud = match tokio::task::spawn_blocking(move || Cloud::load(&cfg)).await {
        Ok(Ok(c)) => c,
        failed => {
            server.stop().await;
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
    server.set_serving().await;
    tracing::info!(%addr, model = %cloud.name, exits = cloud.model.num_exits(), max_message_bytes = limit,
        tls = config.tls_cert.is_some(), mutual_tls = config.tls_ca.is_some(), "cloud-server ready");
    Ok(Handle { addr, cloud, server })
}

/// Runs the server until SIGINT or SIGTERM, then drains (see [`Handle::stop`]).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut signal = std::pin::pin!(shutdown_signal()?);
    let handle = tokio::select! {
        started = start(config) => started?,
        _ = &mut signal => {
            tracing::info!("stopped before the model was ready");
            return Ok(());
        }
    };
    println!("cloud-server listening on {}", handle.addr);
    systemd::ready(&format!("serving {} on {}", handle.cloud.name, handle.addr));
    signal.await;
    tracing::info!("shutting down: NOT_SERVING, no new connections, finishing in-flight calls");
    systemd::stopping("draining in-flight calls");
    handle.stop().await;
    tracing::info!("stopped");
    Ok(())
}
