//! A dedicated OS thread that owns a [`SegmentedRunner`] and its backend sessions.
//!
//! ONNX Runtime calls block for milliseconds and its sessions run on `&mut self`, so they never
//! run on async worker threads: callers send jobs over a bounded channel and get the answer on
//! a oneshot, from async code (`run`) or plain threads (`run_blocking`, `submit`). The bounded
//! queue lets a caller prepare the next batch while the current one runs, without piling up
//! unbounded work.

use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::exit::Policy;
use crate::runner::{BatchOutcome, Decided, SegmentedRunner};

enum Job {
    Run(Tensor, tracing::Span, Option<mpsc::UnboundedSender<Decided>>, oneshot::Sender<Result<BatchOutcome>>),
    SetPolicy(Policy, oneshot::Sender<Result<()>>),
}

/// Handle to a runner thread. Dropping it stops the thread after the queued jobs.
pub struct Worker {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    name: String,
}

/// An answer that will arrive; see [`Worker::submit`].
pub type Pending = oneshot::Receiver<Result<BatchOutcome>>;

impl Worker {
    /// Starts a thread named `name`, builds the runner on it with `make` (so sessions are created
    /// on the thread that uses them) and waits until it is ready. `queue` is how many batches
    /// may wait while one runs.
    pub fn spawn<B, F>(name: &str, queue: usize, make: F) -> Result<Worker>
    where
        B: Backend + 'static,
        F: FnOnce() -> Result<SegmentedRunner<B>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Job>(queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut runner = match make() {
                    Ok(r) => {
                        let _ = ready_tx.send(Ok(()));
                        r
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(job) = rx.blocking_recv() {
                    match job {
                        Job::Run(input, span, early, reply) => {
                            let _enter = span.enter();
                            // A panic in a backend fails this batch, not the thread: the
                            // requests after it are still served.
                            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match early {
                                // A receiver that is gone only means nobody waits for early rows.
                                Some(tx) => runner.run_with(input, |rows| {
                                    let _ = tx.send(rows);
                                }),
                                None => runner.run(input),
                            }))
                            .unwrap_or_else(|panic| {
                                let why = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "unknown panic".into());
                                tracing::error!("the inference backend panicked on a batch: {why}");
                                Err(Error::Backend(format!("the inference backend failed on this batch: {why}")))
                            });
                            let _ = reply.send(out);
                        }
                        Job::SetPolicy(p, reply) => {
                            let _ = reply.send(runner.set_policy(&p));
                        }
                    }
                }
            })
            .map_err(|e| Error::WorkerGone(format!("cannot start thread {name}: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Worker { tx: Some(tx), thread: Some(thread), name: name.to_string() }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::WorkerGone(format!("{name} panicked while loading")))
            }
        }
    }

    fn gone(&self) -> Error {
        Error::WorkerGone(format!("{} is no longer running", self.name))
    }

    fn sender(&self) -> &mpsc::Sender<Job> {
        self.tx.as_ref().expect("the sender lives until drop")
    }

    /// Queues a batch from a plain thread (blocks while the queue is full) and returns the
    /// receiver of its answer.
    pub fn submit(&self, input: Tensor) -> Result<Pending> {
        let (reply, rx) = oneshot::channel();
        self.sender().blocking_send(Job::Run(input, tracing::Span::current(), None, reply)).map_err(|_| self.gone())?;
        Ok(rx)
    }

    /// Waits for a [`Pending`] answer from a plain thread.
    pub fn wait(&self, pending: Pending) -> Result<BatchOutcome> {
        pending.blocking_recv().map_err(|_| self.gone())?
    }

    /// Runs one batch from a plain thread.
    pub fn run_blocking(&self, input: Tensor) -> Result<BatchOutcome> {
        let p = self.submit(input)?;
        self.wait(p)
    }

    /// Runs one batch from async code without blocking the executor.
    pub async fn run(&self, input: Tensor) -> Result<BatchOutcome> {
        let (reply, rx) = oneshot::channel();
        self.sender().send(Job::Run(input, tracing::Span::current(), None, reply)).await.map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Queues one batch from async code; rows settled by an early exit arrive on `early` while
    /// deeper segments still run (every message is sent before the final outcome), and the
    /// returned receiver gives the whole outcome.
    pub async fn submit_streaming(&self, input: Tensor, early: mpsc::UnboundedSender<Decided>) -> Result<Pending> {
        let (reply, rx) = oneshot::channel();
        self.sender()
            .send(Job::Run(input, tracing::Span::current(), Some(early), reply))
            .await
            .map_err(|_| self.gone())?;
        Ok(rx)
    }

    /// Error for a [`Pending`] whose worker went away.
    pub fn gone_error(&self) -> Error {
        self.gone()
    }

    /// Replaces the exit policy; batches queued after this call use it.
    pub async fn set_policy(&self, policy: Policy) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.sender().send(Job::SetPolicy(policy, reply)).await.map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::tests::{meta3, Fake};
    use crate::runner::SampleResult;

    #[test]
    fn a_worker_answers_every_submitted_batch_in_order() {
        let w = Worker::spawn("test-worker", 2, || {
            let fake = Fake { segments: 3, widths: vec![4, 4, 4], calls: vec![] };
            SegmentedRunner::new(fake, 0, &Policy::defaults(&meta3()), None)
        })
        .unwrap();
        let pending: Vec<Pending> =
            (0..5).map(|i| w.submit(Tensor::new(vec![1, 1, 1, 1], vec![i as f32]).unwrap()).unwrap()).collect();
        for (i, p) in pending.into_iter().enumerate() {
            let out = w.wait(p).unwrap();
            assert!(matches!(out.results[0], SampleResult::Answered(a) if a.class == i as u32 % 4));
        }
    }

    #[test]
    fn a_runner_that_fails_to_load_reports_why() {
        let r = Worker::spawn::<Fake, _>("bad", 1, || Err(Error::Backend("no such model".into())));
        assert_eq!(r.err().unwrap().to_string(), "inference backend: no such model");
    }
}
