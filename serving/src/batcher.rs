//! Dynamic batching in front of an inference [`Worker`].
//!
//! An actor task owns the queue: it takes the first waiting request, keeps adding requests of
//! the same per-sample shape until the batch holds `max_batch` samples or `max_delay` has passed
//! since the first one, and hands the batch to the worker thread. It does not wait for the
//! answer: a delivery task per batch gives every request its answer **as soon as all of its
//! rows are decided** — rows settled by an early exit while deeper segments still run, the
//! rest when the batch is done, and the survivors (rows that pass every segment held here) only
//! after the [`Forwarder`] has taken them to the next hop. A request whose samples all left at
//! an early exit never waits for the cloud.
//!
//! Admission happens before anything is queued:
//! * a semaphore counted in samples refuses work beyond `max_queue` (`ResourceExhausted`);
//! * with `max_queue_delay`, a request whose expected wait (samples ahead of it × the measured
//!   batch compute time) exceeds the limit is refused at once, so accepted requests keep a
//!   bounded latency under overload;
//! * a request's deadline (`grpc-timeout`) is checked again when it would join a batch and before
//!   its survivors are forwarded: work nobody waits for is not computed.
//!
//! Requests larger than `max_batch` are split into batch-sized pieces (a client need not know the
//! device's batch size); their permits are taken for the whole request at once, so an oversized
//! request is refused before any piece runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use classynet_runtime::backend::Tensor;
use classynet_runtime::runner::{Decided, Forward, SampleResult};
use classynet_runtime::worker::{Pending, Worker};
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

impl Origin {
    /// Metric and report label: where the sample was answered.
    pub fn label(self, side: &str) -> &'static str {
        match (self, side) {
            (Origin::Local, "cloud") | (Origin::Remote, _) => "cloud",
            (Origin::Local, _) => "edge",
            (Origin::Degraded, _) => "degraded",
        }
    }
}

/// The answers to one request, one per sample in request order.
#[derive(Debug, Clone)]
pub struct Served {
    pub results: Vec<SampleResult>,
    pub origin: Vec<Origin>,
}

/// Takes the survivors of a batch to the next hop and answers each of them: one entry per row of
/// `Forward::rows`, in that order. It never fails as a whole: an unreachable hop is an answer
/// per row (degraded, or failed).
pub type Forwarder =
    Arc<dyn Fn(Forward) -> Pin<Box<dyn Future<Output = Vec<(SampleResult, Origin)>> + Send>> + Send + Sync>;

/// Batching and admission limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most samples run together.
    pub max_batch: usize,
    /// Longest a sample waits for others to join its batch.
    pub max_delay: Duration,
    /// Most samples admitted and not yet answered.
    pub max_queue: usize,
    /// Refuse a request whose expected wait for compute exceeds this (`None`: no limit).
    pub max_queue_delay: Option<Duration>,
    /// `side` label of this batcher's metrics: "edge" or "cloud".
    pub side: &'static str,
}

/// Load figures shared by the handles and the actor.
#[derive(Default)]
struct Load {
    /// Samples admitted whose batch has not finished computing.
    computing: AtomicUsize,
    /// Smoothed compute time of one batch in microseconds (0 until a batch has run).
    batch_us: AtomicU64,
}

/// Counts a request's samples in [`Load::computing`] until its batch has computed (or it is
/// dropped unrun).
struct Ticket {
    load: Arc<Load>,
    n: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.load.computing.fetch_sub(self.n, Ordering::Relaxed);
    }
}

struct Item {
    input: Tensor,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<ServeResult<Served>>,
    ticket: Option<Ticket>,
    _permit: OwnedSemaphorePermit,
}

impl Item {
    /// Nobody waits for the answer any more: the client went away or its deadline passed (it is
    /// told so).
    fn abandoned(self) -> Option<Item> {
        if self.reply.is_closed() {
            return None;
        }
        match self.deadline {
            Some(d) if Instant::now() >= d => {
                let _ = self.reply.send(Err(deadline_passed()));
                None
            }
            _ => Some(self),
        }
    }
}

fn deadline_passed() -> ServeError {
    ServeError::DeadlineExceeded("the request's deadline passed before it was computed".into())
}

/// Cheap-to-clone handle to a batching actor.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Item>,
    permits: Arc<Semaphore>,
    load: Arc<Load>,
    cfg: BatchConfig,
}

impl Batcher {
    /// Starts the actor on the current tokio runtime. Without a forwarder every row must be
    /// decided by the worker (a full model or a tail); with one, survivors go to it.
    pub fn spawn(worker: Arc<Worker>, cfg: BatchConfig, forward: Option<Forwarder>) -> Batcher {
        let (tx, rx) = mpsc::channel(cfg.max_queue.clamp(1, 4096));
        let permits = Arc::new(Semaphore::new(cfg.max_queue));
        let load = Arc::new(Load::default());
        tokio::spawn(run_actor(rx, worker, cfg, forward, load.clone(), permits.clone()));
        Batcher { tx, permits, load, cfg }
    }

    /// Largest batch the worker runs.
    pub fn max_batch(&self) -> usize {
        self.cfg.max_batch
    }

    /// Most samples admitted at once (the largest request taken).
    pub fn max_queue(&self) -> usize {
        self.cfg.max_queue
    }

    /// Expected wait before a request of `n` more samples has computed, from the samples ahead
    /// of it and the measured batch time (zero until a batch has run).
    pub fn expected_wait(&self, n: usize) -> Duration {
        let ahead = self.load.computing.load(Ordering::Relaxed) + n;
        let batches = ahead.div_ceil(self.cfg.max_batch) as u64;
        Duration::from_micros(batches * self.load.batch_us.load(Ordering::Relaxed))
    }

    /// Runs `input` (`[n, ...]`, 1 ≤ n ≤ max_queue) as part of one or more batches; the answers
    /// cover exactly its n samples, in order. `deadline`: when the caller stops waiting.
    pub async fn infer(&self, input: Tensor, deadline: Option<Instant>) -> ServeResult<Served> {
        let n = input.batch();
        let side = self.cfg.side;
        let refuse = |why: &'static str, e: ServeError| {
            metrics::counter!(telemetry::SHED, "side" => side, "reason" => why).increment(1);
            Err(e)
        };
        if n == 0 {
            return Err(ServeError::InvalidArgument("a request needs at least one sample, found 0".into()));
        }
        if n > self.cfg.max_queue {
            return refuse(
                "too_large",
                ServeError::ResourceExhausted(format!(
                    "a request may hold at most {} samples (the queue limit), found {n}",
                    self.cfg.max_queue
                )),
            );
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return refuse("deadline", deadline_passed());
        }
        if let Some(limit) = self.cfg.max_queue_delay {
            let wait = self.expected_wait(n);
            if wait > limit {
                return refuse(
                    "queue_delay",
                    ServeError::ResourceExhausted(format!(
                        "server overloaded: the expected wait is {} ms, more than the queue delay limit of {} ms; \
                         retry later",
                        wait.as_millis(),
                        limit.as_millis()
                    )),
                );
            }
        }
        let Ok(mut permit) = self.permits.clone().try_acquire_many_owned(n as u32) else {
            return refuse(
                "queue_full",
                ServeError::ResourceExhausted(format!(
                    "server overloaded: {} samples already waiting, {n} more would exceed the queue limit of {}",
                    self.cfg.max_queue - self.permits.available_permits(),
                    self.cfg.max_queue
                )),
            );
        };
        self.load.computing.fetch_add(n, Ordering::Relaxed);
        metrics::gauge!(telemetry::QUEUE_DEPTH, "side" => side)
            .set((self.cfg.max_queue - self.permits.available_permits()) as f64);
        let mut replies = Vec::with_capacity(n.div_ceil(self.cfg.max_batch));
        let mut pieces = Vec::with_capacity(replies.capacity());
        if n <= self.cfg.max_batch {
            pieces.push((input, permit));
        } else {
            for start in (0..n).step_by(self.cfg.max_batch) {
                let rows: Vec<usize> = (start..(start + self.cfg.max_batch).min(n)).collect();
                let share = permit.split(rows.len()).expect("the permit holds one unit per sample");
                pieces.push((input.gather(&rows), share));
            }
        }
        for (input, permit) in pieces {
            let (reply, rx) = oneshot::channel();
            let ticket = Some(Ticket { load: self.load.clone(), n: input.batch() });
            let item = Item { input, enqueued: Instant::now(), deadline, reply, ticket, _permit: permit };
            self.tx.send(item).await.map_err(|_| ServeError::Unavailable("the batcher has stopped".into()))?;
            replies.push(rx);
        }
        let mut served = Served { results: Vec::with_capacity(n), origin: Vec::with_capacity(n) };
        for rx in replies {
            let part =
                rx.await.map_err(|_| ServeError::Unavailable("the batch was dropped before it ran".into()))??;
            served.results.extend(part.results);
            served.origin.extend(part.origin);
        }
        Ok(served)
    }
}

async fn run_actor(
    mut rx: mpsc::Receiver<Item>,
    worker: Arc<Worker>,
    cfg: BatchConfig,
    forward: Option<Forwarder>,
    load: Arc<Load>,
    permits: Arc<Semaphore>,
) {
    let side = cfg.side;
    let mut carry: Option<Item> = None;
    // When the previous batch finished computing: a batch's compute time is measured from the
    // later of its submission and that moment (the worker runs batches in order).
    let last_done = Arc::new(std::sync::Mutex::new(Instant::now()));
    loop {
        let first = match carry.take() {
            Some(i) => i,
            None => match rx.recv().await {
                Some(i) => i,
                None => return,
            },
        };
        let Some(first) = first.abandoned() else { continue };
        let deadline = Instant::now() + cfg.max_delay;
        let mut rows = first.input.batch();
        let mut items = vec![first];
        while rows < cfg.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => {
                    let Some(item) = item.abandoned() else { continue };
                    // Only requests of the same sample shape share a batch: the validation in
                    // front of the batcher guarantees it for a model with fixed shapes, and this
                    // keeps one request from ever changing what another gets.
                    if rows + item.input.batch() > cfg.max_batch || item.input.shape[1..] != items[0].input.shape[1..] {
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
        let (early_tx, early_rx) = mpsc::unbounded_channel();
        let submitted = Instant::now();
        // Waits while the worker's own queue is full: back-pressure that lets the next batch fill.
        let pending = worker.submit_streaming(batch, early_tx).await.map_err(ServeError::from);
        let delivery = Delivery::new(items, forward.clone(), side);
        let (worker, load, permits, last_done) = (worker.clone(), load.clone(), permits.clone(), last_done.clone());
        tokio::spawn(async move {
            delivery.run(pending, early_rx, &worker, &load, submitted, &last_done).await;
            metrics::gauge!(telemetry::QUEUE_DEPTH, "side" => side)
                .set((cfg.max_queue - permits.available_permits()) as f64);
        });
    }
}

/// Hands out the answers of one batch.
struct Delivery {
    /// Requests in batch order; `None` once answered.
    items: Vec<Option<Item>>,
    /// First batch row of each request.
    offsets: Vec<usize>,
    /// Per batch row: its answer once decided.
    rows: Vec<Option<(SampleResult, Origin)>>,
    forward: Option<Forwarder>,
    side: &'static str,
}

impl Delivery {
    fn new(items: Vec<Item>, forward: Option<Forwarder>, side: &'static str) -> Delivery {
        let mut offsets = Vec::with_capacity(items.len());
        let mut total = 0;
        for i in &items {
            offsets.push(total);
            total += i.input.batch();
        }
        Delivery { items: items.into_iter().map(Some).collect(), offsets, rows: vec![None; total], forward, side }
    }

    async fn run(
        mut self,
        pending: ServeResult<Pending>,
        mut early: mpsc::UnboundedReceiver<Decided>,
        worker: &Worker,
        load: &Load,
        submitted: Instant,
        last_done: &std::sync::Mutex<Instant>,
    ) {
        let outcome = match pending {
            Err(e) => Err(e),
            Ok(mut rx) => loop {
                tokio::select! {
                    biased;
                    Some(rows) = early.recv() => self.settle(rows),
                    out = &mut rx => break out.map_err(|_| worker.gone_error()).and_then(|r| r).map_err(ServeError::from),
                }
            },
        };
        // Every early message was sent before the final outcome.
        while let Ok(rows) = early.try_recv() {
            self.settle(rows);
        }
        {
            let now = Instant::now();
            let mut last = last_done.lock().expect("no code panics while holding the batch clock");
            let took = now - submitted.max(*last);
            *last = now;
            let old = load.batch_us.load(Ordering::Relaxed);
            let us = took.as_micros().min(u64::MAX as u128) as u64;
            load.batch_us.store(if old == 0 { us } else { (old * 7 + us) / 8 }, Ordering::Relaxed);
            metrics::histogram!(telemetry::STAGE_SECONDS, "side" => self.side, "stage" => "compute")
                .record(took.as_secs_f64());
        }
        for item in self.items.iter_mut().flatten() {
            item.ticket.take();
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                for item in self.items.iter_mut().filter_map(Option::take) {
                    let _ = item.reply.send(Err(e.duplicate()));
                }
                return;
            }
        };
        let decided: Decided =
            outcome.results.into_iter().enumerate().filter(|(_, r)| !matches!(r, SampleResult::Forwarded)).collect();
        self.settle(decided);
        let Some(fwd) = outcome.forward else { return self.fail_rest("no answer was produced for this sample") };
        // Survivors of requests nobody waits for any more are not sent on.
        let picks: Vec<usize> = (0..fwd.rows.len())
            .filter(|&i| {
                let at = self.item_of(fwd.rows[i]);
                match self.items[at].take().and_then(Item::abandoned) {
                    Some(item) => {
                        self.items[at] = Some(item);
                        true
                    }
                    None => false,
                }
            })
            .collect();
        if picks.is_empty() {
            return;
        }
        let fwd = if picks.len() == fwd.rows.len() { fwd } else { fwd.select(&picks, 0) };
        let Some(forward) = self.forward.clone() else {
            return self.fail_rest("this server holds no deeper exits and has no next hop");
        };
        let rows = fwd.rows.clone();
        let answers = forward(fwd).await;
        let settled: Vec<(usize, (SampleResult, Origin))> = rows.into_iter().zip(answers).collect();
        self.settle_with(settled);
        self.fail_rest("the next hop returned no answer for this sample");
    }

    fn item_of(&self, row: usize) -> usize {
        self.offsets.partition_point(|&o| o <= row) - 1
    }

    fn settle(&mut self, rows: Decided) {
        self.settle_with(rows.into_iter().map(|(at, r)| (at, (r, Origin::Local))).collect());
    }

    /// Records answers and replies to every request whose rows are now all decided.
    fn settle_with(&mut self, rows: Vec<(usize, (SampleResult, Origin))>) {
        let mut touched = Vec::new();
        for (at, answer) in rows {
            if at < self.rows.len() {
                self.rows[at] = Some(answer);
                touched.push(self.item_of(at));
            }
        }
        touched.dedup();
        for i in touched {
            let Some(item) = &self.items[i] else { continue };
            let span = self.offsets[i]..self.offsets[i] + item.input.batch();
            if self.rows[span.clone()].iter().all(Option::is_some) {
                let item = self.items[i].take().expect("checked above");
                let (results, origin) = self.rows[span].iter().map(|r| r.clone().expect("checked above")).unzip();
                let _ = item.reply.send(Ok(Served { results, origin }));
            }
        }
    }

    /// Answers what is still open with a per-sample failure (an invariant broke somewhere; the
    /// client still gets one answer per sample).
    fn fail_rest(&mut self, why: &str) {
        let open: Vec<usize> =
            (0..self.rows.len()).filter(|&r| self.rows[r].is_none() && self.items[self.item_of(r)].is_some()).collect();
        if open.is_empty() {
            return;
        }
        tracing::error!(samples = open.len(), "{why}");
        self.settle_with(open.into_iter().map(|r| (r, (SampleResult::Failed(why.into()), Origin::Local))).collect());
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
