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

/// How a request is admitted.
#[derive(Debug, Clone, Copy)]
pub enum Admission {
    /// A client's request: refused when its deadline has passed or its expected wait exceeds the
    /// queue-delay limit; `deadline` is when the client stops waiting.
    Request { deadline: Option<Instant> },
    /// A batch job that bounds its own concurrency (`edge-agent classify`): waits its turn and is
    /// never shed, only refused beyond `max_queue`.
    Job,
}

impl From<Option<Instant>> for Admission {
    fn from(deadline: Option<Instant>) -> Admission {
        Admission::Request { deadline }
    }
}

/// Load figures shared by the handles and the actor.
#[derive(Default)]
struct Load {
    /// Samples admitted whose batch has not finished computing.
    computing: AtomicUsize,
    /// Smoothed compute time of one batch in microseconds (0 until a batch has run).
    batch_us: AtomicU64,
    /// `batch_us` is a seed from the warm-up, replaced outright by the first real batch.
    seeded: std::sync::atomic::AtomicBool,
    /// Batches handed to the worker that have not finished computing.
    running: AtomicUsize,
    /// Signalled whenever a batch finishes computing.
    finished: tokio::sync::Notify,
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

    /// Sets the batch compute time the queue-delay limit starts from (before any batch has run,
    /// the estimate would otherwise be zero and admit every request of a first burst). Servers
    /// time one full batch while warming up.
    pub fn seed_batch_time(&self, t: Duration) {
        let us = t.as_micros().clamp(1, u64::MAX as u128) as u64;
        if self.load.batch_us.compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.load.seeded.store(true, Ordering::Relaxed);
        }
    }

    /// Most samples admitted at once (the largest request taken).
    pub fn max_queue(&self) -> usize {
        self.cfg.max_queue
    }

    /// Expected wait before a new request starts computing, from the whole batches ahead of it
    /// and the measured batch time. A partial batch ahead will take the request along, so an
    /// idle server admits any request, whatever its size.
    pub fn expected_wait(&self) -> Duration {
        let batches = (self.load.computing.load(Ordering::Relaxed) / self.cfg.max_batch) as u64;
        Duration::from_micros(batches * self.load.batch_us.load(Ordering::Relaxed))
    }

    /// Runs `input` (`[n, ...]`, 1 ≤ n ≤ max_queue) as part of one or more batches; the answers
    /// cover exactly its n samples, in order.
    pub async fn infer(&self, input: Tensor, admission: impl Into<Admission>) -> ServeResult<Served> {
        let (deadline, shed) = match admission.into() {
            Admission::Request { deadline } => (deadline, true),
            Admission::Job => (None, false),
        };
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
        if let Some(limit) = self.cfg.max_queue_delay.filter(|_| shed) {
            let wait = self.expected_wait();
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
        // A batch closes when it is full, or when `max_delay` has passed and the worker is free
        // to take it. While the worker is busy the batch keeps filling: closing it at the delay
        // would queue a small batch behind the running one, and under a steady load (each answer
        // making room for the next request) the batches would shrink to a few samples.
        while rows < cfg.max_batch {
            let busy = load.running.load(Ordering::Acquire) > 0;
            let item = tokio::select! {
                biased;
                item = rx.recv() => item,
                _ = tokio::time::sleep_until(deadline), if !busy => break,
                _ = load.finished.notified(), if busy => continue,
            };
            let Some(item) = item else { break };
            let Some(item) = item.abandoned() else { continue };
            // Only requests of the same sample shape share a batch: the validation in front of
            // the batcher guarantees it for a model with fixed shapes, and this keeps one request
            // from ever changing what another gets.
            if rows + item.input.batch() > cfg.max_batch || item.input.shape[1..] != items[0].input.shape[1..] {
                carry = Some(item); // starts the next batch
                break;
            }
            rows += item.input.batch();
            items.push(item);
        }
        let batch = concat(items.iter().map(|i| &i.input));
        let queued = metrics::histogram!(telemetry::STAGE_SECONDS, "side" => side, "stage" => "queue");
        for item in &items {
            queued.record(item.enqueued.elapsed().as_secs_f64());
        }
        metrics::histogram!(telemetry::BATCH_SIZE, "side" => side).record(rows as f64);
        let (early_tx, early_rx) = mpsc::unbounded_channel();
        let submitted = Instant::now();
        load.running.fetch_add(1, Ordering::AcqRel);
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
        load.running.fetch_sub(1, Ordering::AcqRel);
        load.finished.notify_one();
        {
            let now = Instant::now();
            let mut last = last_done.lock().expect("no code panics while holding the batch clock");
            let took = now - submitted.max(*last);
            *last = now;
            let old = load.batch_us.load(Ordering::Relaxed);
            let us = took.as_micros().min(u64::MAX as u128) as u64;
            let fresh = old == 0 || load.seeded.swap(false, Ordering::Relaxed);
            load.batch_us.store(if fresh { us } else { (old * 7 + us) / 8 }, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use classynet_runtime::backend::{Backend, SegmentOutput};
    use classynet_runtime::exit::Policy;
    use classynet_runtime::format::ModelMeta;
    use classynet_runtime::runner::SegmentedRunner;

    use super::*;

    /// A fake model over 1-value samples with `segments` segments of 4 classes: a sample of value
    /// v leaves at exit v / 10 with class v mod 4 (or is forwarded past the last segment held);
    /// segment s sleeps `pause[s]` per batch, like a deeper, slower block.
    struct Fake {
        segments: usize,
        total: usize,
        pause: Vec<Duration>,
    }

    impl Backend for Fake {
        fn num_segments(&self) -> usize {
            self.segments
        }
        fn prepare(&mut self, _groups: &[Range<usize>]) -> classynet_runtime::Result<()> {
            Ok(())
        }
        fn run_group(&mut self, group: Range<usize>, input: &Tensor) -> classynet_runtime::Result<SegmentOutput> {
            let s = group.end - 1;
            for g in group {
                std::thread::sleep(self.pause[g]);
            }
            let mut logits = vec![0f32; input.batch() * 4];
            for i in 0..input.batch() {
                let v = input.data[i * input.row_len()] as usize;
                logits[i * 4 + v % 4] = if s >= v / 10 { 20.0 } else { 0.1 };
            }
            let cut = (s + 1 < self.total).then(|| input.clone());
            Ok(SegmentOutput { logits: Tensor::new(vec![input.batch(), 4], logits)?, cut })
        }
    }

    fn meta() -> ModelMeta {
        let exit = |i: usize, last: bool| {
            serde_json::json!({"name": format!("E{}", i + 1), "logits": format!("o{i}"),
                "cut": if last { serde_json::Value::Null } else { format!("c{i}").into() },
                "classes": [0, 1, 2, 3], "bag": false, "threshold": if last { serde_json::Value::Null } else { 0.5.into() }})
        };
        ModelMeta::from_json(
            &serde_json::json!({
                "format_version": 1,
                "classes": ["a", "b", "c", "d"],
                "input": {"shape": [1, 1, 1], "mean": [0.0], "std": [1.0]},
                "exits": [exit(0, false), exit(1, false), exit(2, true)]
            })
            .to_string(),
        )
        .unwrap()
    }

    /// A worker over the first `segments` of the 3-exit fake.
    fn worker(segments: usize, pause: Vec<Duration>) -> Arc<Worker> {
        Arc::new(
            Worker::spawn("test-head", 2, move || {
                SegmentedRunner::new(Fake { segments, total: 3, pause }, 0, &Policy::defaults(&meta()), None)
            })
            .unwrap(),
        )
    }

    fn cfg(max_batch: usize, delay_ms: u64) -> BatchConfig {
        BatchConfig {
            max_batch,
            max_delay: Duration::from_millis(delay_ms),
            max_queue: 64,
            max_queue_delay: None,
            side: "edge",
        }
    }

    fn sample(v: f32) -> Tensor {
        Tensor::new(vec![1, 1, 1, 1], vec![v]).unwrap()
    }

    fn exit_of(s: &Served) -> Option<(u32, usize)> {
        match &s.results[0] {
            SampleResult::Answered(a) => Some((a.class, a.exit)),
            _ => None,
        }
    }

    /// A forwarder that answers every row at exit 2 after `wait`.
    fn slow_cloud(wait: Duration) -> Forwarder {
        Arc::new(move |fwd: Forward| {
            Box::pin(async move {
                tokio::time::sleep(wait).await;
                fwd.rows
                    .iter()
                    .map(|_| {
                        let a = classynet_runtime::exit::Answer { class: 3, exit: 2, entropy: 0.0, probability: 1.0 };
                        (SampleResult::Answered(a), Origin::Remote)
                    })
                    .collect()
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_early_exit_is_answered_before_its_batch_mates_come_back_from_the_cloud() {
        let b =
            Batcher::spawn(worker(2, vec![Duration::ZERO; 3]), cfg(16, 20), Some(slow_cloud(Duration::from_secs(3))));
        let t0 = Instant::now();
        // Value 1 leaves at E1; 25 passes both held exits and goes to the (slow) cloud. They
        // share a batch (20 ms window).
        let (early, late) = tokio::join!(b.infer(sample(1.0), None), async {
            let r = b.infer(sample(25.0), None).await;
            (r, t0.elapsed())
        });
        let early_at = t0.elapsed();
        let early = early.unwrap();
        assert_eq!(exit_of(&early), Some((1, 0)));
        assert_eq!(early.origin, vec![Origin::Local]);
        let (late, late_at) = (late.0.unwrap(), late.1);
        assert_eq!(late.origin, vec![Origin::Remote]);
        assert!(late_at >= Duration::from_secs(3));
        // join! polls both, so `early_at` is when both finished; time the early one alone below.
        assert!(early_at >= late_at);
        let t0 = Instant::now();
        let fut_late = tokio::spawn({
            let b = b.clone();
            async move { b.infer(sample(26.0), None).await }
        });
        let early = b.infer(sample(2.0), None).await.unwrap();
        let took = t0.elapsed();
        assert_eq!(exit_of(&early), Some((2, 0)));
        assert!(took < Duration::from_secs(1), "the E1 answer waited {took:?} for the cloud");
        assert_eq!(fut_late.await.unwrap().unwrap().origin, vec![Origin::Remote]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_answers_its_early_exits_before_the_deep_segments_finish() {
        // A full model whose last segment takes 800 ms: E1 answers must not wait for it.
        let pause = vec![Duration::ZERO, Duration::ZERO, Duration::from_millis(800)];
        let b = Batcher::spawn(worker(3, pause), cfg(16, 20), None);
        let deep = tokio::spawn({
            let b = b.clone();
            async move { b.infer(sample(29.0), None).await }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        let t0 = Instant::now();
        let early = b.infer(sample(1.0), None).await.unwrap();
        let took = t0.elapsed();
        assert_eq!(exit_of(&early), Some((1, 0)));
        assert!(took < Duration::from_millis(600), "the E1 answer took {took:?}: it waited for E3");
        assert_eq!(exit_of(&deep.await.unwrap().unwrap()), Some((1, 2)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_of_another_shape_never_share_a_batch() {
        let b = Batcher::spawn(worker(3, vec![Duration::ZERO; 3]), cfg(16, 20), None);
        let odd = Tensor::new(vec![1, 2, 1, 1], vec![1.0, 1.0]).unwrap();
        let (a, c, d) = tokio::join!(b.infer(sample(1.0), None), b.infer(odd, None), b.infer(sample(13.0), None));
        assert_eq!(exit_of(&a.unwrap()), Some((1, 0)));
        assert_eq!(exit_of(&d.unwrap()), Some((1, 1)));
        // The fake takes any row length: what matters is that each request got its own rows.
        assert_eq!(c.unwrap().results.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_requests_are_split_and_oversized_ones_refused_before_any_work() {
        let b = Batcher::spawn(worker(3, vec![Duration::ZERO; 3]), cfg(4, 1), None);
        let values: Vec<f32> = (0..10).map(|i| (i * 3) as f32).collect();
        let served = b.infer(Tensor::new(vec![10, 1, 1, 1], values.clone()).unwrap(), None).await.unwrap();
        let exits: Vec<usize> = served
            .results
            .iter()
            .map(|r| match r {
                SampleResult::Answered(a) => a.exit,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(exits, values.iter().map(|v| (*v as usize / 10).min(2)).collect::<Vec<_>>());
        let e = b.infer(Tensor::new(vec![65, 1, 1, 1], vec![0.0; 65]).unwrap(), None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(e.to_string(), "a request may hold at most 64 samples (the queue limit), found 65");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadlines_and_the_queue_delay_limit_refuse_work_before_it_runs() {
        let mut c = cfg(1, 0);
        c.max_queue_delay = Some(Duration::from_millis(250));
        let b = Batcher::spawn(worker(3, vec![Duration::from_millis(100), Duration::ZERO, Duration::ZERO]), c, None);
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(b.infer(sample(1.0), Some(past)).await.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        // One batch measures the compute time (~100 ms a sample, batch 1).
        b.infer(sample(1.0), None).await.unwrap();
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    (b.infer(sample(1.0), None).await, t.elapsed())
                })
            })
            .collect();
        let (mut ok, mut shed) = (0, 0);
        for c in calls {
            let (r, took) = c.await.unwrap();
            match r {
                Ok(_) => {
                    ok += 1;
                    assert!(took < Duration::from_millis(250 + 100 + 150), "accepted but waited {took:?}");
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                    assert!(e.to_string().contains("more than the queue delay limit of 250 ms"), "{e}");
                    assert!(took < Duration::from_millis(50), "refusing took {took:?}");
                    shed += 1;
                }
            }
        }
        assert!(ok >= 1 && shed >= 1, "{ok} accepted, {shed} refused");
        // Recovered: once the queue drained, a request is accepted again.
        b.infer(sample(1.0), None).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_keeps_filling_while_the_worker_is_busy() {
        // Each batch takes 200 ms; the delay is 1 ms. While the first batch runs, 12 requests
        // arrive one by one: they must run as one batch after it, not as 12 small ones.
        let b = Batcher::spawn(
            worker(3, vec![Duration::from_millis(200), Duration::ZERO, Duration::ZERO]),
            cfg(16, 1),
            None,
        );
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.infer(sample(1.0), None).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = Instant::now();
        let mut later = Vec::new();
        for _ in 0..12 {
            let b = b.clone();
            later.push(tokio::spawn(async move { b.infer(sample(2.0), None).await }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        first.await.unwrap().unwrap();
        for l in later {
            l.await.unwrap().unwrap();
        }
        let took = t0.elapsed();
        // One more batch of 200 ms after the first (which had ~180 ms left), not twelve.
        // Without the rule two single-request batches would queue behind the first (about 780 ms).
        assert!(took < Duration::from_millis(600), "12 requests took {took:?}: they did not share a batch");
    }
}
