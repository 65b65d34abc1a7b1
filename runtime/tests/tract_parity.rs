//! tract against ONNX Runtime on every zoo model: the same exit logits and cuts at every
//! partition (max |Δ| ≤ 1e-4), and the same answers on the Fashion-MNIST test set (all of it for
//! the served model, the first 2,000 samples for the others), where
//! a difference is allowed only for a sample whose entropy lies within 1e-5 of the threshold it
//! was compared with (float rounding may put it on either side); those are counted and shown.
#![cfg(all(feature = "ort", feature = "tract"))]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use classynet_runtime::backend::{Engine, EngineBackend, Tensor};
use classynet_runtime::dataset::Dataset;
use classynet_runtime::exit::{Answer, Policy};
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::Model;
use classynet_runtime::ort_backend::{init_ort, OrtEngine, SessionOptions};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::runner::{SampleResult, SegmentedRunner};
use classynet_runtime::tract_backend::TractEngine;

const TOLERANCE: f32 = 1e-4;
const NEAR_THRESHOLD: f32 = 1e-5;
/// The zoo model that `scripts/demo`, the README and the deploy files serve.
const SERVED: &str = "resnet110-7exit-cnc";

fn zoo() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo");
    let mut models: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("models/zoo exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    assert!(!models.is_empty(), "models/zoo holds at least the tiny model");
    models
}

fn engines() -> (Arc<dyn Engine>, Arc<dyn Engine>) {
    init_ort(None, 1).expect("ONNX Runtime from scripts/setup");
    (Arc::new(OrtEngine::new(SessionOptions::default()).unwrap()), Arc::new(TractEngine::new(1)))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape, "same output shapes");
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn every_partition_gives_the_same_logits_and_cuts_on_both_engines() {
    let (ort, tract) = engines();
    for path in zoo() {
        let m = Model::load(&path).unwrap();
        let ds = Dataset::open_for("fashion-mnist:test", None, Some(64), &m).unwrap();
        // Two batch sizes: the plans run with a symbolic batch, and survivors shrink it.
        let inputs = [ds.batch(&m, 0..64), ds.batch(&m, 0..5)];
        let segs = segments(&m).unwrap();
        let exits = m.num_exits();
        for k in 1..=exits {
            let head =
                extract_side(&m, &segs, &Side::parse(&format!("E{k}"), PartitionRole::Head, exits).unwrap()).unwrap();
            // tract gets a plan fixed at batch 64 as well: the 64-sample batch runs on it, the
            // 5-sample batch on the plan for any batch.
            let (mut h_ort, mut h_tract) = (ort.compile(&head).unwrap(), tract.compile_for(&head, &[64]).unwrap());
            let tail = (k < exits).then(|| {
                let side = Side::parse(&format!("E{k}"), PartitionRole::Tail, exits).unwrap();
                let proto = extract_side(&m, &segs, &side).unwrap();
                (ort.compile(&proto).unwrap(), tract.compile(&proto).unwrap())
            });
            let mut tail = tail;
            for x in &inputs {
                let (a, b) = (h_ort.run(x).unwrap(), h_tract.run(x).unwrap());
                assert_eq!(a.len(), b.len());
                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                    let d = max_abs_diff(a, b);
                    assert!(d <= TOLERANCE, "{}: head E{k} output {i}: max |Δ| {d:e}", path.display());
                }
                if let Some((t_ort, t_tract)) = tail.as_mut() {
                    // Both tails get ONNX Runtime's cut, so only the tail's own arithmetic differs.
                    let cut = a.last().unwrap();
                    let (ta, tb) = (t_ort.run(cut).unwrap(), t_tract.run(cut).unwrap());
                    for (i, (a, b)) in ta.iter().zip(&tb).enumerate() {
                        let d = max_abs_diff(a, b);
                        assert!(d <= TOLERANCE, "{}: tail E{k} output {i}: max |Δ| {d:e}", path.display());
                    }
                }
            }
        }
    }
}

fn answers(engine: Arc<dyn Engine>, m: &Model, ds: &Dataset, policy: &Policy) -> Vec<Answer> {
    let mut runner = SegmentedRunner::new(
        EngineBackend::new(engine, m).unwrap().with_batches(&[1, 64]),
        0,
        policy,
        Some(m.meta.input.shape.clone()),
    )
    .unwrap();
    let mut out = Vec::with_capacity(ds.len());
    for first in (0..ds.len()).step_by(64) {
        for r in runner.run(ds.batch(m, first..(first + 64).min(ds.len()))).unwrap().results {
            match r {
                SampleResult::Answered(a) => out.push(a),
                other => panic!("a full model answers every sample: {other:?}"),
            }
        }
    }
    out
}

#[test]
fn the_whole_test_set_gets_the_same_answers_on_both_engines() {
    let (ort, tract) = engines();
    for path in zoo() {
        let m = Model::load(&path).unwrap();
        // The served model (the README's, the demo's) on all 10,000 test samples; the other
        // zoo models on the first 2,000, which keeps this test to a few minutes of CI.
        let limit = (path.file_stem().and_then(|s| s.to_str()) != Some(SERVED)).then_some(2000);
        let ds = Dataset::open_for("fashion-mnist:test", None, limit, &m).unwrap();
        let policy = Policy::defaults(&m.meta);
        let (a, b) = (answers(ort.clone(), &m, &ds, &policy), answers(tract.clone(), &m, &ds, &policy));
        let mut near = 0;
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            if (a.class, a.exit) == (b.class, b.exit) {
                continue;
            }
            // The engine that answered earlier had an entropy just under that exit's threshold;
            // the other one's was just over it.
            let first = if a.exit <= b.exit { a } else { b };
            let t = policy.rules[first.exit].threshold.expect("an answering early exit has a threshold");
            assert!(
                a.exit != b.exit && (first.entropy - t).abs() <= NEAR_THRESHOLD,
                "{}: sample {i}: ort {a:?}, tract {b:?} (threshold {t}): a difference not explained by rounding",
                path.display()
            );
            near += 1;
        }
        let accuracy = |x: &[Answer]| x.iter().zip(&ds.labels).filter(|(a, &l)| i64::from(a.class) == l).count();
        println!(
            "{}: {} samples, {near} differ within {NEAR_THRESHOLD:e} of a threshold; correct: ort {}, tract {}",
            path.display(),
            ds.len(),
            accuracy(&a),
            accuracy(&b)
        );
        assert!(near <= ds.len() / 1000, "{}: {near} near-threshold differences", path.display());
    }
}
