//! The per-exit, per-class tally of a run over a labelled dataset, printed as a table or as the
//! JSON object scripts rely on. `classynet run` and `edge-agent classify` share it.

use serde_json::{json, Value};

use crate::exit::Answer;
use crate::model::Model;

/// Counts of one run.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub model: String,
    pub fingerprint: String,
    pub dataset: String,
    pub classes: Vec<String>,
    pub exit_names: Vec<String>,
    pub batch: usize,
    pub policy_version: u64,
    pub count: Vec<u64>,
    pub correct: Vec<u64>,
    pub per_class: Vec<Vec<u64>>,
    /// `confusion[exit][true label][predicted]`: what exit efficiency (precision and recall per
    /// exit) is computed from, and what `per_class` cannot tell (it counts predictions only).
    pub confusion: Vec<Vec<Vec<u64>>>,
    pub failed: u64,
    pub samples: u64,
    pub seconds: f64,
}

impl RunReport {
    pub fn new(model: &Model, dataset: &str, batch: usize, policy_version: u64) -> RunReport {
        let (k, m) = (model.meta.num_classes(), model.num_exits());
        RunReport {
            model: model.name().to_string(),
            fingerprint: model.fingerprint.clone(),
            dataset: dataset.to_string(),
            classes: model.meta.classes.clone(),
            exit_names: model.meta.exits.iter().map(|e| e.name.clone()).collect(),
            batch,
            policy_version,
            count: vec![0; m],
            correct: vec![0; m],
            per_class: vec![vec![0; k]; m],
            confusion: vec![vec![vec![0; k]; k]; m],
            failed: 0,
            samples: 0,
            seconds: 0.0,
        }
    }

    /// Records one answered sample whose true label is `label`.
    pub fn answered(&mut self, a: &Answer, label: i64) {
        self.samples += 1;
        self.count[a.exit] += 1;
        self.per_class[a.exit][a.class as usize] += 1;
        if label == a.class as i64 {
            self.correct[a.exit] += 1;
        }
        // A label outside the model's classes is counted as wrong above but cannot have a row.
        if let Some(row) = usize::try_from(label).ok().and_then(|l| self.confusion[a.exit].get_mut(l)) {
            row[a.class as usize] += 1;
        }
    }

    /// Records a sample that got an error instead of a label.
    pub fn failed(&mut self) {
        self.samples += 1;
        self.failed += 1;
    }

    pub fn accuracy(&self) -> f64 {
        self.correct.iter().sum::<u64>() as f64 / self.samples.max(1) as f64
    }

    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.seconds.max(1e-9)
    }

    /// The JSON object of `classynet run --json`.
    pub fn json(&self) -> Value {
        json!({
            "model": self.model, "fingerprint": self.fingerprint, "dataset": self.dataset, "samples": self.samples,
            "accuracy": self.accuracy(), "correct": self.correct.iter().sum::<u64>(), "failed": self.failed,
            "samples_per_second": self.samples_per_second(), "seconds": self.seconds, "batch": self.batch,
            "policy_version": self.policy_version, "classes": self.classes,
            "exits": (0..self.count.len()).map(|e| json!({
                "name": self.exit_names[e], "count": self.count[e], "correct": self.correct[e], "per_class": self.per_class[e],
                "confusion": self.confusion[e],
            })).collect::<Vec<_>>(),
        })
    }

    /// The table of `classynet run`.
    pub fn table(&self, policy_note: &str) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model {} · {} · {} samples · batch {} · policy v{}{policy_note}",
            self.model, self.dataset, self.samples, self.batch, self.policy_version
        );
        let _ = write!(s, "{:<4} {:>7} {:>7} {:>7} ", "exit", "count", "correct", "acc");
        for c in &self.classes {
            let short: String = c.chars().take(7).collect();
            let _ = write!(s, " {short:>7}");
        }
        s.push('\n');
        for e in 0..self.count.len() {
            let acc = if self.count[e] > 0 {
                format!("{:.1}%", 100.0 * self.correct[e] as f64 / self.count[e] as f64)
            } else {
                "-".into()
            };
            let _ = write!(s, "{:<4} {:>7} {:>7} {:>7} ", self.exit_names[e], self.count[e], self.correct[e], acc);
            for c in &self.per_class[e] {
                let _ = write!(s, " {c:>7}");
            }
            s.push('\n');
        }
        let correct: u64 = self.correct.iter().sum();
        let _ = writeln!(
            s,
            "accuracy {:.2}% ({correct}/{}){}",
            100.0 * self.accuracy(),
            self.samples,
            if self.failed > 0 { format!(", {} failed", self.failed) } else { String::new() }
        );
        let _ = write!(s, "throughput {:.0} samples/s ({:.2} s)", self.samples_per_second(), self.seconds);
        s
    }
}
