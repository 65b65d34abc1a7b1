//! `classynet run`: a whole model over a dataset with early exits, on the inference thread the
//! servers use, reporting per-exit and per-class counts.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use classynet_runtime::backend::{Engine, EngineBackend};
use classynet_runtime::report::RunReport;
use classynet_runtime::runner::{SampleResult, SegmentedRunner};
use classynet_runtime::worker::{Pending, Worker};
use classynet_runtime::{Error, Result};

use crate::args::{load_policy, print_json, DataArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Exit policy JSON (per exit: threshold or disabled, allowed classes); defaults come from
    /// the model.
    #[arg(long, env = "CLASSYNET_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

pub fn run(a: &RunArgs, engine: Arc<dyn Engine>) -> Result<()> {
    let m = a.model.load()?;
    if !m.starts_at_input() || m.present.end != m.num_exits() {
        return Err(Error::Partition(format!(
            "{} is a partition file; `run` needs the full model (the split runs in edge-agent and cloud-server)",
            m.origin
        )));
    }
    let ds = a.data.open(&m)?;
    let policy = load_policy(a.policy.as_deref(), &m)?;
    let (mm, pp) = (m.clone(), policy.clone());
    let sample = m.meta.input.shape.clone();
    let name = format!("classynet-{}", engine.name());
    let batches = [a.data.batch];
    let worker = Worker::spawn(&name, 2, move || {
        SegmentedRunner::new(EngineBackend::new(engine, &mm)?.with_batches(&batches), 0, &pp, Some(sample))
    })?;
    let mut report = RunReport::new(&m, &ds.name, a.data.batch, policy.version);
    let n = ds.len();
    let start = Instant::now();
    let mut pending: VecDeque<(usize, Pending)> = VecDeque::new();
    let absorb = |report: &mut RunReport, first: usize, p: Pending| -> Result<()> {
        let out = worker.wait(p)?;
        for (row, r) in out.results.iter().enumerate() {
            match r {
                SampleResult::Answered(ans) => report.answered(ans, ds.labels[first + row]),
                SampleResult::Failed(msg) => {
                    report.failed();
                    tracing::warn!(sample = first + row, "{msg}");
                }
                SampleResult::Forwarded => unreachable!("a full model's last exit answers every sample"),
            }
        }
        Ok(())
    };
    // Progress on a terminal only: scripts read stdout, and logs should not fill with it.
    let show_progress = std::io::stderr().is_terminal() && n > 2000;
    let mut last_progress = Instant::now();
    for first in (0..n).step_by(a.data.batch) {
        let batch = ds.batch(&m, first..(first + a.data.batch).min(n));
        pending.push_back((first, worker.submit(batch)?));
        // Two batches in flight: the next one is normalised while the current one runs.
        if pending.len() > 2 {
            let (f, p) = pending.pop_front().expect("non-empty");
            absorb(&mut report, f, p)?;
            if show_progress && last_progress.elapsed().as_millis() > 250 {
                last_progress = Instant::now();
                eprint!("\r{}/{n} samples", f + a.data.batch);
            }
        }
    }
    while let Some((f, p)) = pending.pop_front() {
        absorb(&mut report, f, p)?;
    }
    if show_progress {
        eprint!("\r{:width$}\r", "", width = 30);
    }
    report.seconds = start.elapsed().as_secs_f64();
    if a.model.json {
        print_json(&report.json());
    } else {
        println!("{}", report.table(if a.policy.is_none() { " (model defaults)" } else { "" }));
    }
    Ok(())
}
