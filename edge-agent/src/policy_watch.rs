//! The cloud's exit policy, followed live: a WatchPolicy stream kept open and re-opened with
//! backoff, every update applied between two batches.

use classynet_proto::control::control_client::ControlClient;
use classynet_proto::control::WatchPolicyRequest;
use classynet_serving::telemetry;
use tokio_stream::StreamExt;

use crate::cloud_client::Backoff;
use crate::Edge;

/// Keeps a WatchPolicy stream open, applying every update; reconnects with backoff.
pub(crate) async fn watch_policy(weak: std::sync::Weak<Edge>) {
    let Some((server, ep)) = weak.upgrade().and_then(|e| e.server.clone().zip(e.cloud.clone())) else { return };
    let mut backoff = Backoff::new();
    loop {
        let Some(edge) = weak.upgrade() else { return };
        let fingerprint = edge.head.fingerprint.clone();
        drop(edge);
        let backoff = &mut backoff;
        let attempt = async {
            let mut client = ControlClient::new(ep.connect().await.map_err(|e| format!("{e:?}"))?);
            let mut stream = client
                .watch_policy(WatchPolicyRequest { fingerprint })
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            while let Some(update) = stream.next().await {
                let update = update.map_err(|e| e.message().to_string())?;
                // The stream works: the next outage starts again from the shortest wait.
                backoff.reset();
                let Some(edge) = weak.upgrade() else { return Ok(()) };
                match edge.apply_policy(&update.policy_json).await {
                    Ok(v) => {
                        metrics::gauge!(telemetry::POLICY_VERSION, "side" => "edge").set(v as f64);
                        tracing::info!(version = v, "exit policy from the cloud in force")
                    }
                    Err(e) => {
                        metrics::counter!(telemetry::POLICY_REJECTIONS, "side" => "edge").increment(1);
                        tracing::error!(version = update.version, "policy refused, the previous one stays: {e}")
                    }
                }
                edge.policy_seen.send_replace(true);
            }
            Ok::<(), String>(())
        };
        let result = attempt.await;
        if weak.strong_count() == 0 {
            return;
        }
        let wait = backoff.wait();
        match result {
            Ok(()) => tracing::info!("policy stream from {server} ended; reconnecting in {wait:?}"),
            Err(e) => tracing::warn!("policy stream from {server}: {e}; retrying in {wait:?}"),
        }
        tokio::time::sleep(wait).await;
    }
}
