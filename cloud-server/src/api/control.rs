//! `classynet.v1.Control`: the exit policy stream and head downloads for edges.

use std::pin::Pin;

use classynet_proto::control::control_server::Control;
use classynet_proto::control::{
    DescribeRequest, GetPartitionRequest, PartitionChunk, PolicyUpdate, ServerInfo, WatchPolicyRequest,
};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::parse_partition;
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_serving::ServeError;
use prost::Message;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::{loaded, Slot};

pub(crate) struct ControlApi(pub(crate) Slot);

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlApi {
    type WatchPolicyStream = Streamed<PolicyUpdate>;
    type GetPartitionStream = Streamed<PartitionChunk>;

    async fn watch_policy(&self, r: Request<WatchPolicyRequest>) -> Result<Response<Self::WatchPolicyStream>, Status> {
        let c = loaded(&self.0)?.clone();
        let fp = &r.get_ref().fingerprint;
        if !fp.is_empty() && *fp != c.model.fingerprint {
            return Err(ServeError::FailedPrecondition(format!(
                "the edge runs a model with fingerprint {fp}, this server runs {}",
                c.model.fingerprint
            ))
            .into());
        }
        let mut rx = c.policy.subscribe();
        let mut stopping = c.stopping.subscribe();
        let fingerprint = c.model.fingerprint.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let update = {
                    let (p, json) = &*rx.borrow_and_update();
                    PolicyUpdate { version: p.version, policy_json: json.clone(), fingerprint: fingerprint.clone() }
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = until_set(&mut stopping) => {
                        let _ = tx.send(Err(Status::unavailable("cloud-server is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_partition(
        &self,
        r: Request<GetPartitionRequest>,
    ) -> Result<Response<Self::GetPartitionStream>, Status> {
        let c = loaded(&self.0)?;
        let m = c.model.num_exits();
        let partition = &r.get_ref().partition;
        let side = Side::parse(partition, PartitionRole::Head, m).map_err(|e| ServeError::NotFound(e.to_string()))?;
        let k = parse_partition(partition, m).map_err(|e| ServeError::NotFound(e.to_string()))?;
        // Held until the stream is dropped: a client that never reads ties up one permit, not
        // memory without bound.
        let permit = c.downloads.clone().try_acquire_owned().map_err(|_| {
            ServeError::ResourceExhausted(format!(
                "{} head downloads are already in progress (--max-downloads); retry later",
                c.max_downloads
            ))
        })?;
        let bytes = match c.heads[k - 1].get() {
            Some(b) => b.clone(),
            None => {
                let model = c.clone();
                let encoded = tokio::task::spawn_blocking(move || {
                    let segs = segments(&model.model)?;
                    Ok::<_, ServeError>(bytes::Bytes::from(extract_side(&model.model, &segs, &side)?.encode_to_vec()))
                })
                .await
                .map_err(|e| ServeError::Unavailable(format!("extracting partition {partition} failed: {e}")))??;
                c.heads[k - 1].get_or_init(|| encoded).clone()
            }
        };
        let total = bytes.len() as u64;
        let fingerprint = c.model.fingerprint.clone();
        const CHUNK: usize = 1 << 20;
        let chunks = (0..bytes.len().div_ceil(CHUNK)).map(move |i| {
            let _held = &permit;
            let start = i * CHUNK;
            Ok(PartitionChunk {
                data: bytes.slice(start..(start + CHUNK).min(bytes.len())),
                total_bytes: if i == 0 { total } else { 0 },
                fingerprint: if i == 0 { fingerprint.clone() } else { String::new() },
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn describe(&self, _: Request<DescribeRequest>) -> Result<Response<ServerInfo>, Status> {
        let c = loaded(&self.0)?;
        Ok(Response::new(ServerInfo {
            model: c.name.clone(),
            fingerprint: c.model.fingerprint.clone(),
            policy_version: c.policy_version(),
            exits: c.model.num_exits() as u32,
        }))
    }
}

/// Resolves once the flag is true (or its sender is gone).
async fn until_set(flag: &mut watch::Receiver<bool>) {
    loop {
        if *flag.borrow_and_update() {
            return;
        }
        if flag.changed().await.is_err() {
            return;
        }
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<T, F, Fut>(f: F) -> Streamed<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
