//! The loaded model and its tails: one inference thread and batcher per cut, the policy in
//! force, and the shared head partitions edges download.

use std::sync::Arc;
use std::time::Duration;

use classynet_proto::inference::*;
use classynet_runtime::backend::EngineBackend;
use classynet_runtime::backend::Tensor;
use classynet_runtime::engine;
use classynet_runtime::exit::{Policy, PolicyFile};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::{parse_partition, Dim, Model};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::runner::SegmentedRunner;
use classynet_runtime::worker::Worker;
use classynet_serving::batcher::{BatchConfig, Batcher};
use classynet_serving::codec::{self, Payload, PARAM_CUT, PARAM_FINGERPRINT};
use classynet_serving::request::{self, InputSpec};
use classynet_serving::telemetry;
use classynet_serving::{ServeError, ServeResult};
use prost::Message;
use tokio::sync::watch;

use crate::config::Config;
use crate::policy_file::read_policy;

/// The loaded model and everything that serves it.
pub struct Cloud {
    pub(crate) model: Model,
    pub(crate) name: String,
    /// Index k: 0 runs the whole model; k ≥ 1 runs the tail after exit k.
    pub(crate) batchers: Vec<Batcher>,
    pub(crate) workers: Vec<Arc<Worker>>,
    /// Per-sample shape of what index k takes (image or cut k), when the graph declares it.
    pub(crate) inputs: Vec<Option<Vec<usize>>>,
    pub(crate) policy: watch::Sender<(Policy, String)>,
    /// Set when the server stops: open policy streams end so the graceful shutdown can finish.
    pub(crate) stopping: watch::Sender<bool>,
    /// Head partition k+1 encoded once, shared by every download of it.
    pub(crate) heads: Vec<std::sync::OnceLock<bytes::Bytes>>,
    pub(crate) downloads: Arc<tokio::sync::Semaphore>,
    pub(crate) max_downloads: usize,
    pub(crate) max_batch: usize,
}

impl Cloud {
    /// Loads the model, opens one worker per cut and warms each up.
    pub fn load(config: &Config) -> anyhow::Result<Arc<Cloud>> {
        let engine = engine::open(&config.engine_options())?;
        let model = Model::load(&config.model)?;
        anyhow::ensure!(
            model.present == (0..model.num_exits()),
            "{} is a partition file; cloud-server needs the full model",
            config.model.display()
        );
        let name = config.model_name.clone().unwrap_or_else(|| {
            config.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        });
        let (policy, policy_json) = match &config.policy {
            Some(p) => {
                let file = read_policy(p)?;
                (Policy::resolve(&model.meta, &file)?, serde_json::to_string(&file)?)
            }
            None => (Policy::defaults(&model.meta), "{\"version\":0}".to_string()),
        };
        let segs = segments(&model)?;
        let m = model.num_exits();
        let batch = BatchConfig {
            max_batch: config.max_batch.max(1),
            max_delay: Duration::from_millis(config.max_delay_ms),
            max_queue: config.max_queue.max(config.max_batch),
            max_queue_delay: (config.max_queue_delay_ms > 0).then(|| Duration::from_millis(config.max_queue_delay_ms)),
            side: "cloud",
        };
        let mut workers = Vec::new();
        let mut inputs = Vec::new();
        let mut seeds = Vec::new();
        for k in 0..m {
            let part = if k == 0 {
                model.clone()
            } else {
                let tail = extract_side(&model, &segs, &Side::parse(&format!("E{k}"), PartitionRole::Tail, m)?)?;
                Model::from_bytes(&tail.encode_to_vec(), &format!("{name} tail E{k}"))?
            };
            let shape = if k == 0 {
                Some(model.meta.input.shape.clone())
            } else {
                let cut = model.meta.exits[k - 1].cut.as_deref().expect("every exit but the last has a cut");
                model.tensor_shape(cut).and_then(|d| {
                    d.iter().skip(1).map(|x| if let Dim::Fixed(n) = x { Some(*n) } else { None }).collect()
                })
            };
            let (p, s, e) = (policy.clone(), shape.clone(), engine.clone());
            let batches = [1, config.max_batch.max(1)];
            let worker = Worker::spawn(&format!("cloud-E{k}"), 2, move || {
                // A lone sample and the batcher's full batch get plans of their own.
                SegmentedRunner::new(EngineBackend::new(e, &part)?.with_batches(&batches), k, &p, s)
            })?;
            let mut one = None;
            if let Some(s) = &shape {
                // Warm-up: the first run allocates and picks kernels; do it before SERVING. The
                // second, timed, seeds the queue-delay estimate (a full batch costs at most
                // max_batch single runs).
                let n: usize = s.iter().product();
                let mut dims = vec![1];
                dims.extend(s);
                worker.run_blocking(Tensor { shape: dims.clone(), data: vec![0.0; n] })?;
                let t = std::time::Instant::now();
                worker.run_blocking(Tensor { shape: dims, data: vec![0.0; n] })?;
                one = Some(t.elapsed());
            }
            workers.push(Arc::new(worker));
            inputs.push(shape);
            seeds.push(one);
        }
        let batchers: Vec<Batcher> = workers.iter().map(|w| Batcher::spawn(w.clone(), batch, None)).collect();
        for (b, one) in batchers.iter().zip(seeds) {
            if let Some(one) = one {
                b.seed_batch_time(one * batch.max_batch as u32);
            }
        }
        let (policy_tx, _) = watch::channel((policy, policy_json));
        let (stopping, _) = watch::channel(false);
        Ok(Arc::new(Cloud {
            model,
            name,
            batchers,
            workers,
            inputs,
            policy: policy_tx,
            stopping,
            heads: (0..m).map(|_| std::sync::OnceLock::new()).collect(),
            downloads: Arc::new(tokio::sync::Semaphore::new(config.max_downloads.max(1))),
            max_downloads: config.max_downloads.max(1),
            max_batch: batch.max_batch,
        }))
    }

    /// Validates `file` against the model and puts it in force everywhere, or leaves the current
    /// policy untouched and says why.
    pub async fn apply_policy(&self, file: &PolicyFile) -> Result<(), String> {
        let policy = Policy::resolve(&self.model.meta, file).map_err(|e| e.to_string())?;
        for w in &self.workers {
            w.set_policy(policy.clone()).await.map_err(|e| e.to_string())?;
        }
        let json = serde_json::to_string(file).expect("policy files serialise");
        self.policy.send_replace((policy, json));
        tracing::info!(version = file.version, "exit policy in force");
        Ok(())
    }

    /// Version of the policy in force.
    pub fn policy_version(&self) -> u64 {
        self.policy.borrow().0.version
    }

    pub(crate) async fn infer(
        &self,
        req: ModelInferRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> ServeResult<ModelInferResponse> {
        let started = std::time::Instant::now();
        request::check_envelope(&req, &self.name)?;
        let m = self.model.num_exits();
        let k = match codec::param_str(&req.parameters, PARAM_CUT) {
            None => 0,
            Some(cut) => {
                let k = parse_partition(cut, m).map_err(|_| {
                    ServeError::NotFound(format!("cut {cut:?} is not in model {} (cuts E1..E{})", self.name, m - 1))
                })?;
                if k == m {
                    return Err(ServeError::InvalidArgument(format!(
                        "cut E{m} puts every exit on the edge; nothing is left to run here"
                    )));
                }
                k
            }
        };
        // Empty means "not given", as in WatchPolicy.
        if let Some(fp) = codec::param_str(&req.parameters, PARAM_FINGERPRINT).filter(|fp| !fp.is_empty()) {
            if fp != self.model.fingerprint {
                return Err(ServeError::FailedPrecondition(format!(
                    "the edge runs a model with fingerprint {fp}, this server runs {} ({}); deploy matching models",
                    self.model.fingerprint, self.name
                )));
            }
        }
        let what = if k == 0 {
            format!("an image batch of model {}", self.name)
        } else {
            format!("cut E{k} of model {}", self.name)
        };
        let spec = InputSpec {
            name: if k == 0 { "input" } else { "cut" },
            sample: self.inputs[k].as_deref(),
            max_samples: self.max_batch,
            pixels: k == 0,
            what: &what,
        };
        let mut decoded = request::decode(&req, &spec)?;
        if decoded.payload == Payload::Pixels {
            codec::normalise(&mut decoded.tensor, &self.model);
        }
        let input = std::mem::replace(&mut decoded.tensor, Tensor { shape: vec![0], data: vec![] });
        let version = self.policy_version();
        let served = decoded.merge(self.batchers[k].infer(input, deadline).await?);
        let took = started.elapsed().as_secs_f64();
        metrics::histogram!(telemetry::ANSWER_SECONDS, "side" => "cloud", "where" => "cloud")
            .record_many(took, served.results.len());
        for r in &served.results {
            if let classynet_runtime::runner::SampleResult::Answered(a) = r {
                metrics::counter!(telemetry::ANSWERED, "side" => "cloud", "where" => "cloud",
                    "exit" => self.model.meta.exits[a.exit].name.clone(),
                    "class" => self.model.meta.classes[a.class as usize].clone())
                .increment(1);
            }
        }
        tracing::debug!(samples = served.results.len(), cut = k, "answered");
        let resp = codec::answers_response(&self.name, &req.id, &served.results, version);
        let mut resp = request::select_outputs(&req, resp);
        // The edge subtracts this from its round trip to tell network time from cloud time.
        resp.parameters.insert(
            codec::PARAM_SERVER_MICROS.into(),
            codec::int_param(started.elapsed().as_micros().min(i64::MAX as u128) as i64),
        );
        Ok(resp)
    }
}
