//! The edge side of the split: runs the head partition `Ek` of a ClassyNet model with its early
//! exits, answers what exits at once, and forwards the survivors of each batch to cloud-server
//! as one Open Inference Protocol ModelInfer carrying the cut tensor.
//!
//! * Local clients use the same v2 API (`inference.GRPCInferenceService`) on a loopback address.
//! * Requests are batched dynamically (16 samples by default, as in the paper). The next batch's
//!   head runs while the previous batch's round trip to the cloud is in flight.
//! * The exit policy comes from the cloud's `WatchPolicy` stream and is applied between batches.
//! * When the cloud cannot be reached (an error, or no answer within `--cloud-timeout-ms`), the
//!   samples that needed it get the deepest local exit's answer, flagged degraded, and the link
//!   is retried with capped exponential backoff and jitter. Every request gets one answer.
//!
//! One file per step of the data path: `config` (flags), `head` (which head runs: a file, a cut
//! of the full model, a budget, a download), `api` (the local v2 API), this file (the loaded
//! [`Edge`]: runner thread and batcher), `forward` (survivors → the cloud → answers or degraded),
//! `cloud_client` (the endpoint, keepalive, link health and backoff), `policy_watch` (the live
//! exit policy), `server` (listen, warm up, serve, drain) and `classify` (the batch verb).

mod api;
mod classify;
mod cloud_client;
mod config;
mod forward;
mod head;
mod memory;
mod policy_watch;
mod replicas;
mod server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::Names;
pub use classify::{classify, ClassifyOutput};
use classynet_runtime::backend::EngineBackend;
use classynet_runtime::backend::Tensor;
use classynet_runtime::engine;
use classynet_runtime::exit::{Policy, PolicyFile};
use classynet_runtime::model::Model;
use classynet_runtime::runner::SegmentedRunner;
use classynet_runtime::split::SplitPlanner;
use classynet_runtime::worker::Worker;
use classynet_serving::batcher::{Admission, BatchConfig, Batcher, Origin, Served};
pub use classynet_serving::codec::WireDtype;
use classynet_serving::ServeResult;
pub use config::{init_logging, Config, Verb};
pub use forward::Stats;
use forward::{forwarder, ForwardContext};
use head::load_head;
use policy_watch::watch_policy;
use replicas::CloudPool;
pub use server::{run, start, Handle};

/// A loaded edge: head model, runner thread, batcher and cloud link.
pub struct Edge {
    pub head: Model,
    /// Exits on this device.
    pub k: usize,
    /// `--partition auto`: each batch's cut is chosen among the head's exits.
    pub adaptive: bool,
    worker: Arc<Worker>,
    batcher: Batcher,
    pub stats: Arc<Stats>,
    names: Names,
    policy_version: Arc<AtomicU64>,
    /// Set once the first update of the cloud's policy stream has been dealt with, so that a run
    /// can start under the cloud's policy instead of switching to it part-way.
    policy_seen: tokio::sync::watch::Sender<bool>,
    /// The policy applied last (its version and text), to tell new, same and older updates apart.
    applied: Mutex<Option<(u64, String)>>,
    server: Option<String>,
    /// The cloud replicas (none without --server).
    pool: Option<Arc<CloudPool>>,
}

/// What became of a policy update offered by a cloud replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    Applied(u64),
    /// This version is already in force.
    Same(u64),
    /// Older than the one in force: ignored.
    Older {
        offered: u64,
        in_force: u64,
    },
}

impl Edge {
    /// Loads the head, starts its runner thread and the link to the cloud.
    pub async fn load(config: &Config) -> anyhow::Result<Arc<Edge>> {
        config.validate()?;
        let opts = config.engine_options();
        let engine = tokio::task::spawn_blocking(move || engine::open(&opts)).await??;
        let head::Head { model: head, k, max_batch, plan_bytes, baseline_bytes, adaptive } = load_head(config).await?;
        let m = head.num_exits();
        anyhow::ensure!(
            !adaptive || config.server.is_some(),
            "--partition auto forwards at a cut it chooses per batch: give --server ADDR"
        );
        // The candidate cuts are set from the runner's groups once it is built.
        let split = adaptive.then(|| Arc::new(SplitPlanner::new(Vec::new(), m)));
        anyhow::ensure!(
            k == m || config.server.is_some(),
            "partition E{k} leaves exits E{}..E{m} to the cloud: give --server ADDR",
            k + 1
        );
        let policy = Policy::defaults(&head.meta);
        let sample = head.meta.input.shape.clone();
        let (h, p, planner) = (head.clone(), policy.clone(), split.clone());
        let worker = tokio::task::spawn_blocking(move || {
            Worker::spawn("edge-head", 2, move || {
                // A lone sample, the latency case, gets a plan of its own (tract: 1.8x faster
                // than its plan for any batch). A full batch gains 1.1x from one, which costs a
                // third copy of the packed weights (20 MB more peak at E7); not on the device.
                let backend = EngineBackend::new(engine, &h)?.with_batches(&[1]);
                let runner = SegmentedRunner::new(backend, 0, &p, Some(sample))?;
                Ok(match planner {
                    Some(planner) => runner.with_split(planner),
                    None => runner,
                })
            })
        })
        .await??;
        let n: usize = head.meta.input.shape.iter().product();
        let mut dims = vec![1];
        dims.extend(&head.meta.input.shape);
        // Warm-up: the first run allocates and picks kernels. The second, timed, seeds the
        // queue-delay estimate (a full batch costs at most max_batch single runs).
        worker.run(Tensor { shape: dims.clone(), data: vec![0.0; n] }).await?;
        let t = Instant::now();
        worker.run(Tensor { shape: dims, data: vec![0.0; n] }).await?;
        let one = t.elapsed();
        let worker = Arc::new(worker);
        let pool = match &config.server {
            Some(_) => Some(CloudPool::start(config, head.fingerprint.clone()).await?),
            None => None,
        };
        let stats = Arc::new(Stats::default());
        let policy_version = Arc::new(AtomicU64::new(0));
        let names = Names {
            exits: head.meta.exits.iter().map(|e| e.name.clone()).collect(),
            classes: head.meta.classes.clone(),
        };
        let context = ForwardContext {
            // With every exit here nothing is forwarded; the pool still carries the policy.
            pool: pool.clone().filter(|_| k < m || adaptive),
            timeout: Duration::from_millis(config.cloud_timeout_ms),
            dtype: config.wire_dtype,
            int8_levels: config.wire_int8_levels,
            compression: config.wire_compression,
            compression_fallback: Mutex::new(None),
            split: split.clone(),
            stats: stats.clone(),
            fingerprint: head.fingerprint.clone(),
            policy_version: policy_version.clone(),
        };
        let batcher = Batcher::spawn(
            worker.clone(),
            BatchConfig {
                max_batch: max_batch.max(1),
                max_delay: Duration::from_millis(config.max_delay_ms),
                max_queue: config.max_queue.max(max_batch),
                max_queue_delay: (config.max_queue_delay_ms > 0)
                    .then(|| Duration::from_millis(config.max_queue_delay_ms)),
                side: "edge",
            },
            Some(forwarder(Arc::new(context))),
        );
        batcher.seed_batch_time(one * max_batch.max(1) as u32);
        let edge = Arc::new(Edge {
            head,
            k,
            adaptive,
            worker,
            batcher,
            stats,
            names,
            policy_version,
            policy_seen: tokio::sync::watch::Sender::new(false),
            applied: Mutex::new(None),
            server: config.server.clone(),
            pool,
        });
        tokio::spawn(memory::watch(
            Arc::downgrade(&edge),
            memory::MemoryPlan { batch: max_batch, plan_bytes, baseline_bytes },
        ));
        // Also with every exit on the edge: the cloud still owns the class sets and thresholds.
        if edge.server.is_some() {
            // The task holds a weak reference: dropping the last Edge ends it.
            tokio::spawn(watch_policy(Arc::downgrade(&edge)));
        }
        Ok(edge)
    }

    /// Waits until the cloud's policy has been received (true), or `timeout` passed or there is
    /// no cloud (false).
    pub async fn wait_for_policy(&self, timeout: Duration) -> bool {
        if self.server.is_none() {
            return false;
        }
        let mut rx = self.policy_seen.subscribe();
        let seen = tokio::time::timeout(timeout, rx.wait_for(|seen| *seen)).await.is_ok_and(|r| r.is_ok());
        seen
    }

    /// Forwards answered so far by each cloud replica the edge knows now, by address.
    pub fn forwards_per_replica(&self) -> Vec<(String, u64)> {
        self.pool.as_ref().map(|p| p.answered()).unwrap_or_default()
    }

    /// Version of the exit policy in force on this edge.
    pub fn policy_version(&self) -> u64 {
        self.policy_version.load(Ordering::SeqCst)
    }

    /// Classifies a normalised image batch; answers in order, with where each came from. Samples
    /// an edge exit answers do not wait for the cloud (unless the same request also holds samples
    /// that go there). Requests larger than the edge batch run as several batches, so a client
    /// need not know the device's batch size.
    pub async fn infer(&self, input: Tensor, admission: impl Into<Admission>) -> ServeResult<Served> {
        let started = Instant::now();
        let served = self.batcher.infer(input, admission).await?;
        let local = served.origin.iter().filter(|o| **o == Origin::Local).count();
        self.stats.edge.fetch_add(local as u64, Ordering::Relaxed);
        self.names.count(&served, started.elapsed());
        Ok(served)
    }

    /// Applies a policy update from a cloud replica unless the same or a newer version is in
    /// force already. Versions only grow: after a failover the new replica may not have re-read
    /// the shared policy file yet, and must not take the edge back.
    async fn offer_policy(&self, json: &str) -> Result<Offer, String> {
        let file = PolicyFile::from_json(json).map_err(|e| e.to_string())?;
        let in_force = self.applied.lock().expect("no code panics while holding the policy").clone();
        if let Some(skip) = policy_watch::judge(in_force.as_ref(), file.version, json) {
            return Ok(skip);
        }
        let policy = Policy::resolve(&self.head.meta, &file).map_err(|e| e.to_string())?;
        self.worker.set_policy(policy).await.map_err(|e| e.to_string())?;
        self.policy_version.store(file.version, Ordering::SeqCst);
        *self.applied.lock().expect("no code panics while holding the policy") = Some((file.version, json.to_string()));
        Ok(Offer::Applied(file.version))
    }
}

impl Edge {
    fn batcher_max(&self) -> usize {
        self.batcher.max_batch()
    }
}
