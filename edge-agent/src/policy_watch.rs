//! The cloud's exit policy, followed live: a WatchPolicy stream kept open on one cloud replica,
//! moved to another when that one goes, every update applied between two batches.
//!
//! Every replica reads the same policy file, so the version decides: an update older than the
//! one in force is ignored (a replica that has not yet re-read the file, after a failover), and
//! the same version again is not applied twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use classynet_proto::control::control_client::ControlClient;
use classynet_proto::control::WatchPolicyRequest;
use classynet_serving::telemetry;
use tokio_stream::StreamExt;

use crate::cloud_client::Backoff;
use crate::replicas::Replica;
use crate::{Edge, Offer};

/// How long to wait for a usable replica before logging that there is none (and waiting on).
const NO_REPLICA_LOG: Duration = Duration::from_secs(30);

/// Keeps a WatchPolicy stream open on a usable replica, applying every newer update; moves to
/// another replica when the stream ends or fails.
pub(crate) async fn watch_policy(weak: std::sync::Weak<Edge>) {
    let Some(pool) = weak.upgrade().and_then(|e| e.pool.clone()) else { return };
    let mut backoff = Backoff::new();
    let mut last: Option<Arc<Replica>> = None;
    loop {
        let Some(replica) = pool.wait_usable(last.as_deref(), NO_REPLICA_LOG).await else {
            if weak.strong_count() == 0 {
                return;
            }
            tracing::warn!("no cloud replica usable for the policy stream ({}); still waiting", pool.describe());
            continue;
        };
        let Some(edge) = weak.upgrade() else { return };
        let fingerprint = edge.head.fingerprint.clone();
        drop(edge);
        let backoff = &mut backoff;
        let attempt = async {
            let mut client = ControlClient::new(replica.channel.clone());
            let mut stream = client
                .watch_policy(WatchPolicyRequest { fingerprint })
                .await
                .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
                .into_inner();
            while let Some(update) = stream.next().await {
                let update = update.map_err(|e| format!("{:?}: {}", e.code(), e.message()))?;
                // The stream works: the next outage starts again from the shortest wait.
                backoff.reset();
                let Some(edge) = weak.upgrade() else { return Ok(()) };
                let label = &replica.label;
                match edge.offer_policy(&update.policy_json).await {
                    Ok(Offer::Applied(v)) => {
                        metrics::gauge!(telemetry::POLICY_VERSION, "side" => "edge").set(v as f64);
                        tracing::info!(version = v, replica = %label, "exit policy from the cloud in force: applied")
                    }
                    Ok(Offer::Same(v)) => {
                        tracing::info!(version = v, replica = %label, "exit policy from the cloud in force: already applied")
                    }
                    Ok(Offer::Older { offered, in_force }) => {
                        edge.stats.older_policies_ignored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(
                        offered, in_force, replica = %label,
                        "this cloud replica offers an older exit policy; the newer one stays in force"
                        )
                    }
                    Err(e) => {
                        metrics::counter!(telemetry::POLICY_REJECTIONS, "side" => "edge").increment(1);
                        tracing::error!(version = update.version, replica = %label,
                            "policy refused, the previous one stays: {e}")
                    }
                }
                edge.policy_seen.send_replace(true);
            }
            Ok::<(), String>(())
        };
        let opened = Instant::now();
        let result = attempt.await;
        if weak.strong_count() == 0 {
            return;
        }
        // After a stream that had been working, another replica is usually there at once; back
        // off when none is, or when streams fail as soon as they open (no busy loop).
        let lived = opened.elapsed() >= Duration::from_secs(1);
        let wait = if lived && pool.pick(Some(&replica)).is_some() { Duration::ZERO } else { backoff.wait() };
        let next =
            if wait.is_zero() { "moving to another replica".to_string() } else { format!("reconnecting in {wait:?}") };
        match result {
            Ok(()) => tracing::info!(replica = %replica.label, "policy stream ended; {next}"),
            Err(e) => tracing::warn!(replica = %replica.label, "policy stream: {e}; {next}"),
        }
        last = Some(replica);
        tokio::time::sleep(wait).await;
    }
}

/// Whether an update of `version` (text `json`) is skipped, given the policy applied last: the
/// same version again, or an older one. None: apply it.
pub(crate) fn judge(in_force: Option<&(u64, String)>, version: u64, json: &str) -> Option<Offer> {
    let (v, text) = in_force?;
    if version < *v {
        return Some(Offer::Older { offered: version, in_force: *v });
    }
    if version > *v {
        return None;
    }
    if text != json {
        tracing::warn!(
            version,
            "cloud replicas disagree on the content of policy version {version}; the one \
            applied first stays (give every change of the policy file a new version)"
        );
    }
    Some(Offer::Same(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_versions_apply_once_and_older_ones_never() {
        let v3 = (3, r#"{"version":3}"#.to_string());
        assert_eq!(judge(None, 0, "{}"), None, "the first policy always applies, even version 0");
        assert_eq!(judge(Some(&v3), 4, "x"), None);
        assert_eq!(judge(Some(&v3), 3, r#"{"version":3}"#), Some(Offer::Same(3)), "a failover resends it");
        assert_eq!(judge(Some(&v3), 3, "different text"), Some(Offer::Same(3)), "the first one seen stays");
        assert_eq!(judge(Some(&v3), 2, "y"), Some(Offer::Older { offered: 2, in_force: 3 }));
    }
}
