//! The exit policy file: read with the runtime's one reader, re-read when it changes or on
//! SIGHUP, validated, and put in force everywhere (or refused, the previous one staying).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use classynet_runtime::exit::PolicyFile;
use classynet_serving::telemetry;

use crate::cloud::Cloud;

/// Reads a policy file (see [`PolicyFile::load`]).
pub fn read_policy(path: &std::path::Path) -> anyhow::Result<PolicyFile> {
    Ok(PolicyFile::load(path)?)
}

/// Re-reads the policy file when its modification time changes or on SIGHUP.
pub(crate) async fn watch_policy_file(cloud: Arc<Cloud>, path: PathBuf) {
    let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = mtime(&path);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let forced = {
            #[cfg(unix)]
            {
                let sig = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => false,
                    _ = sig => true,
                }
            }
            #[cfg(not(unix))]
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                false
            }
        };
        let now = mtime(&path);
        if !forced && now == last {
            continue;
        }
        last = now;
        match read_policy(&path) {
            Ok(file) => {
                if let Err(e) = cloud.apply_policy(&file).await {
                    metrics::counter!(telemetry::POLICY_REJECTIONS, "side" => "cloud").increment(1);
                    tracing::error!(file = %path.display(), "policy refused, the previous one stays in force: {e}");
                } else {
                    metrics::gauge!(telemetry::POLICY_VERSION, "side" => "cloud").set(cloud.policy_version() as f64);
                }
            }
            Err(e) => {
                metrics::counter!(telemetry::POLICY_REJECTIONS, "side" => "cloud").increment(1);
                tracing::error!("policy refused, the previous one stays in force: {e}")
            }
        }
    }
}
