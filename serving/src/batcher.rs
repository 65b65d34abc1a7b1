//! Dynamic batching in front of an inference [`Worker`].
//!
//! An actor task owns the queue: it takes the first waiting request, keeps adding requests
//! until the batch holds `max_batch` samples or `max_delay` has passed since the first one,
//! hands the concatenated batch to the worker thread and, without waiting for it, starts
//! collecting the next batch (the worker's own bounded queue provides back-pressure). Each
//! request gets exactly its rows of the outcome back on a oneshot. Admission is a semaphore
//! counted in samples: when `max_queue` samples are waiting, new requests are refused with
//! `ResourceExhausted` instead of queueing without bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use classynet_runtime::backend::Tensor;
use classynet_runtime::runner::BatchOutcome;
use classynet_runtime::worker::Worker;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::{ServeError, ServeResult};
use crate::telemetry;

/// Where a sample's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Decided by the segments run here.
    Local,
    /// Decided by the next hop (the cloud, for an edge).
    Remote,
    /// The next hop was unreachable: the deepest local exit's best guess.
    Degraded,
}

/// A batch's outcome after the finisher: the runner's outcome plus where each answer came from.
#[derive(Debug, Clone)]
pub struct Served {
    pub outcome: BatchOutcome,
    pub origin: Vec<Origin>,
}

/// Runs after the worker, on the whole batch (an edge forwards the batch's survivors here in one
/// call). It must answer or keep every row.
pub type Finisher =
    Arc<dyn Fn(BatchOutcome) -> Pin<Box<dyn Future<Output = ServeResult<Served>> + Send>> + Send + Sync>;

struct Item {
    input: Tensor,
    enqueued: Instant,
    reply: oneshot::Sender<ServeResult<Served>>,
    _permit: OwnedSemaphorePermit,
}

/// Cheap-to-clone handle to a batching actor.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Item>,
    permits: Arc<Semaphore>,
    max_batch: usize,
    max_queue: usize,
    side: &'static str,
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most samples run together.
    pub max_batch: usize,
    /// Longest a sample waits for others to join its batch.
    pub max_delay: Duration,
    /// Most samples admitted and not yet answered.
    pub max_queue: usize,
    /// `side` label of this batcher's metrics: "edge" or "cloud".
    pub side: &'static str,
}

impl Batcher {
    /// Starts the actor on the current tokio runtime; every answer is [`Origin::Local`].
    pub fn spawn(worker: Arc<Worker>, cfg: BatchConfig) -> Batcher {
        let local: Finisher = Arc::new(|outcome: BatchOutcome| {
            Box::pin(async move {
                let origin = vec![Origin::Local; outcome.results.len()];
                Ok(Served { outcome, origin })
            })
        });
        Batcher::spawn_with(worker, cfg, local)
    }

    /// Starts the actor with a batch-level finisher.
    pub fn spawn_with(worker: Arc<Worker>, cfg: BatchConfig, finish: Finisher) -> Batcher {
        let (tx, rx) = mpsc::channel(1024);
        let permits = Arc::new(Semaphore::new(cfg.max_queue));
        tokio::spawn(run_actor(rx, worker, cfg, finish, permits.clone()));
        Batcher { tx, permits, max_batch: cfg.max_batch, max_queue: cfg.max_queue, side: cfg.side }
    }

    /// Largest request (in samples) this batcher takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Runs `input` (`[n, ...]`, 1 ≤ n ≤ max_batch) as part of a batch; the outcome covers
    /// exactly its n samples, in order.
    pub async fn infer(&self, input: Tensor) -> ServeResult<Served> {
        let n = input.batch();
        if n == 0 || n > self.max_batch {
            return Err(ServeError::ResourceExhausted(format!(
                "a request may hold 1 to {} samples (--max-batch), found {n}",
                self.max_batch
            )));
        }
        let permit = self.permits.clone().try_acquire_many_owned(n as u32).map_err(|_| {
            ServeError::ResourceExhausted(format!(
                "server overloaded: {} samples already waiting (--max-queue {})",
                self.max_queue - self.permits.available_permits(),
                self.max_queue
            ))
        })?;
        metrics::gauge!(telemetry::QUEUE_DEPTH, "side" => self.side)
            .set((self.max_queue - self.permits.available_permits()) as f64);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Item { input, enqueued: Instant::now(), reply, _permit: permit })
            .await
            .map_err(|_| ServeError::Unavailable("the batcher has stopped".into()))?;
        rx.await.map_err(|_| ServeError::Unavailable("the batch was dropped before it ran".into()))?
    }
}

async fn run_actor(
    mut rx: mpsc::Receiver<Item>,
    worker: Arc<Worker>,
    cfg: BatchConfig,
    finish: Finisher,
    permits: Arc<Semaphore>,
) {
    let side = cfg.side;
    let mut carry: Option<Item> = None;
    loop {
        let first = match carry.take() {
            Some(i) => i,
            None => match rx.recv().await {
                Some(i) => i,
                None => return,
            },
        };
        let deadline = Instant::now() + cfg.max_delay;
        let mut rows = first.input.batch();
        let mut items = vec![first];
        while rows < cfg.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => {
                    if rows + item.input.batch() > cfg.max_batch {
                        carry = Some(item); // starts the next batch
                        break;
                    }
                    rows += item.input.batch();
                    items.push(item);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let batch = concat(items.iter().map(|i| &i.input));
        let queued = metrics::histogram!(telemetry::STAGE_SECONDS, "side" => side, "stage" => "queue");
        for item in &items {
            queued.record(item.enqueued.elapsed().as_secs_f64());
        }
        metrics::histogram!(telemetry::BATCH_SIZE, "side" => side).record(rows as f64);
        let worker = worker.clone();
        // The worker thread runs batches in order; awaiting here would stop collecting, and
        // the finisher's round trip would stall the next batch.
        let pending = tokio::spawn(async move {
            let t = Instant::now();
            let out = worker.run(batch).await;
            metrics::histogram!(telemetry::STAGE_SECONDS, "side" => side, "stage" => "compute")
                .record(t.elapsed().as_secs_f64());
            out
        });
        let finish = finish.clone();
        let (permits, max_queue) = (permits.clone(), cfg.max_queue);
        tokio::spawn(async move {
            let outcome = match pending.await {
                Ok(Ok(o)) => finish(o).await,
                Ok(Err(e)) => Err(ServeError::from(e)),
                Err(e) => Err(ServeError::Unavailable(format!("inference task failed: {e}"))),
            };
            split(outcome, items);
            // The items (and their permits) are gone now.
            metrics::gauge!(telemetry::QUEUE_DEPTH, "side" => side)
                .set((max_queue - permits.available_permits()) as f64);
        });
    }
}

/// Concatenates `[n_i, ...]` tensors along the batch axis.
fn concat<'a>(parts: impl Iterator<Item = &'a Tensor> + Clone) -> Tensor {
    let first = parts.clone().next().expect("a batch has at least one request");
    let n: usize = parts.clone().map(Tensor::batch).sum();
    let mut data = Vec::with_capacity(n * first.row_len());
    for p in parts {
        data.extend_from_slice(&p.data);
    }
    let mut shape = first.shape.clone();
    shape[0] = n;
    Tensor { shape, data }
}

/// Gives every request its rows of the batch outcome.
fn split(served: ServeResult<Served>, items: Vec<Item>) {
    let Served { outcome, origin } = match served {
        Ok(o) => o,
        Err(e) => {
            let msg = e.to_string();
            let kind = e.error_type();
            for item in items {
                let err = match kind {
                    "invalid_argument" | "input" | "policy" => ServeError::InvalidArgument(msg.clone()),
                    _ => ServeError::Unavailable(msg.clone()),
                };
                let _ = item.reply.send(Err(err));
            }
            return;
        }
    };
    let mut start = 0;
    for item in items {
        let n = item.input.batch();
        let results = outcome.results[start..start + n].to_vec();
        let forward = outcome.forward.as_ref().and_then(|f| {
            let picks: Vec<usize> = (0..f.rows.len()).filter(|&i| (start..start + n).contains(&f.rows[i])).collect();
            (!picks.is_empty()).then(|| f.select(&picks, start))
        });
        let origin = origin[start..start + n].to_vec();
        let _ = item.reply.send(Ok(Served { outcome: BatchOutcome { results, forward }, origin }));
        start += n;
    }
}
