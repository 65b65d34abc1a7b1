//! The segmented runner on real ONNX Runtime sessions: what it answers must be what Algorithm 1
//! gives when applied exit by exit to the full model's logits, and it must reject bad input
//! without losing the worker.
#![cfg(feature = "ort")]

use std::path::{Path, PathBuf};

use classynet_runtime::backend::Tensor;
use classynet_runtime::exit::{Outcome, Policy, PolicyFile};
use classynet_runtime::model::Model;
use classynet_runtime::ort_backend::{init_ort, OrtEngine, OrtGraph, SessionOptions};
use classynet_runtime::runner::{SampleResult, SegmentedRunner};
use classynet_runtime::worker::Worker;
use prost::Message;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// Deterministic pseudo-random inputs (an LCG), wide enough to reach every exit of tiny3.
fn inputs(n: usize, seed: u64) -> Tensor {
    let mut s = seed;
    let data = (0..n * 16)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 8.0
        })
        .collect();
    Tensor::new(vec![n, 1, 4, 4], data).unwrap()
}

fn reference(model: &Model, policy: &Policy, x: &Tensor) -> Vec<(u32, usize)> {
    let mut whole = OrtGraph::from_bytes(&model.proto.encode_to_vec(), SessionOptions::default()).unwrap();
    let outs = whole.run(x).unwrap();
    let by_name = |n: &str| &outs[whole.output_names().iter().position(|o| o == n).unwrap()];
    (0..x.batch())
        .map(|i| {
            for (e, rule) in policy.rules.iter().enumerate() {
                let logits = by_name(&model.meta.exits[e].logits);
                let w = logits.shape[1];
                if let Outcome::Exit(a) = &rule.decide(&logits.data[i * w..(i + 1) * w])[0] {
                    return (a.class, a.exit);
                }
            }
            unreachable!("the last exit answers")
        })
        .collect()
}

fn answers(out: &[SampleResult]) -> Vec<(u32, usize)> {
    out.iter()
        .map(|r| match r {
            SampleResult::Answered(a) => (a.class, a.exit),
            other => panic!("expected an answer, got {other:?}"),
        })
        .collect()
}

#[test]
fn segmented_answers_equal_algorithm_1_on_the_full_model() {
    init_ort(None, 1).expect("ONNX Runtime from scripts/setup");
    let model = Model::load(&data("tiny3.onnx")).unwrap();
    // Thresholds loose enough that every exit answers some of the 200 samples.
    let file = PolicyFile::from_json(
        r#"{"version": 3, "exits": [{"name": "E1", "threshold": 0.6}, {"name": "E2", "threshold": 0.5}]}"#,
    )
    .unwrap();
    let policy = Policy::resolve(&model.meta, &file).unwrap();
    let x = inputs(200, 42);
    let want = reference(&model, &policy, &x);
    let per_exit: Vec<usize> = (0..3).map(|e| want.iter().filter(|a| a.1 == e).count()).collect();
    assert!(per_exit.iter().all(|&c| c > 0), "fixture inputs reach every exit: {per_exit:?}");

    let mut runner = SegmentedRunner::new(
        OrtEngine::backend(&model, SessionOptions::default()).unwrap(),
        0,
        &policy,
        Some(vec![1, 4, 4]),
    )
    .unwrap();
    let out = runner.run(x.clone()).unwrap();
    assert_eq!(answers(&out.results), want);
    assert_eq!(runner.policy_version(), 3);
    assert_eq!(runner.groups(), &[0..1, 1..2, 2..3]);

    // A live policy change that disables E2: E2 and E3 now run as one session, and the answers
    // are still Algorithm 1's.
    let file = PolicyFile::from_json(
        r#"{"version": 4, "exits": [{"name": "E1", "threshold": 0.6}, {"name": "E2", "disabled": true}]}"#,
    )
    .unwrap();
    let policy = Policy::resolve(&model.meta, &file).unwrap();
    runner.set_policy(&policy).unwrap();
    assert_eq!(runner.groups(), &[0..1, 1..3]);
    let out = runner.run(x.clone()).unwrap();
    assert_eq!(answers(&out.results), reference(&model, &policy, &x));
    assert!(answers(&out.results).iter().all(|a| a.1 != 1), "nothing leaves at the disabled E2");
}

#[test]
fn a_worker_refuses_a_wrong_shape_and_keeps_serving() {
    init_ort(None, 1).expect("ONNX Runtime from scripts/setup");
    let model = Model::load(&data("tiny3.onnx")).unwrap();
    let m = model.clone();
    let worker = Worker::spawn("test-ort", 2, move || {
        let policy = Policy::defaults(&m.meta);
        SegmentedRunner::new(OrtEngine::backend(&m, SessionOptions::default())?, 0, &policy, Some(vec![1, 4, 4]))
    })
    .unwrap();
    let bad = Tensor::new(vec![2, 1, 28, 28], vec![0.0; 2 * 784]).unwrap();
    let e = worker.run_blocking(bad).unwrap_err().to_string();
    assert_eq!(e, "input: expected a float32 batch of shape [N, 1, 4, 4] with N ≥ 1, found [2, 1, 28, 28]");
    let out = worker.run_blocking(inputs(5, 1)).unwrap();
    assert_eq!(out.results.len(), 5, "the worker still answers after a bad batch");
}

#[test]
fn a_head_partition_forwards_what_its_tail_finishes() {
    init_ort(None, 1).expect("ONNX Runtime from scripts/setup");
    use classynet_runtime::format::PartitionRole;
    use classynet_runtime::partition::{extract_side, segments, Side};
    let model = Model::load(&data("tiny3.onnx")).unwrap();
    let segs = segments(&model).unwrap();
    let side = |role| Side::parse("E1", role, 3).unwrap();
    let head =
        Model::from_bytes(&extract_side(&model, &segs, &side(PartitionRole::Head)).unwrap().encode_to_vec(), "head")
            .unwrap();
    let tail =
        Model::from_bytes(&extract_side(&model, &segs, &side(PartitionRole::Tail)).unwrap().encode_to_vec(), "tail")
            .unwrap();
    let policy = Policy::resolve(
        &model.meta,
        &PolicyFile::from_json(
            r#"{"version": 1, "exits": [{"name": "E1", "threshold": 0.6}, {"name": "E2", "threshold": 0.5}]}"#,
        )
        .unwrap(),
    )
    .unwrap();
    let x = inputs(200, 42);
    let want = reference(&model, &policy, &x);
    let opts = SessionOptions::default();
    let mut h =
        SegmentedRunner::new(OrtEngine::backend(&head, opts).unwrap(), 0, &policy, Some(vec![1, 4, 4])).unwrap();
    let mut t = SegmentedRunner::new(OrtEngine::backend(&tail, opts).unwrap(), 1, &policy, None).unwrap();
    let out = h.run(x).unwrap();
    let fwd = out.forward.expect("some samples go on past E1");
    let rest = t.run(fwd.cut).unwrap();
    let mut got: Vec<Option<(u32, usize)>> = out
        .results
        .iter()
        .map(|r| match r {
            SampleResult::Answered(a) => Some((a.class, a.exit)),
            _ => None,
        })
        .collect();
    for (row, r) in fwd.rows.iter().zip(answers(&rest.results)) {
        assert!(got[*row].is_none());
        got[*row] = Some(r);
    }
    assert_eq!(got.into_iter().map(Option::unwrap).collect::<Vec<_>>(), want);
}

/// A segment that starts at a cut inside a stage of residual blocks gets the blocked-layout
/// hint, and with it gives the same values as without (the hint is an identity); the model's
/// first segment (image input, one reader) is left alone.
#[test]
fn the_blocked_layout_hint_changes_no_value_of_any_segment() {
    init_ort(None, 1).expect("ONNX Runtime from scripts/setup");
    use classynet_runtime::ort_backend::keep_blocked_layout_at_inputs;
    use classynet_runtime::partition::{extract, segments, Logits};
    let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo/resnet110-7exit-cnc.onnx");
    let model = Model::load(&zoo).unwrap();
    let segs = segments(&model).unwrap();
    let mut s = 7u64;
    let data = (0..4 * 784)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 0.5
        })
        .collect();
    let mut x = Tensor::new(vec![4, 1, 28, 28], data).unwrap();
    let mut hinted_segments = 0;
    for k in 0..segs.len() {
        let proto = extract(&model, &segs[k..k + 1], Logits::Last, None, &format!("segment-{k}"));
        let hint = keep_blocked_layout_at_inputs(&proto);
        if k == 0 {
            assert!(hint.is_none(), "the image input has one reader: no hint");
        }
        hinted_segments += usize::from(hint.is_some());
        let mut plain = OrtGraph::from_bytes(&proto.encode_to_vec(), SessionOptions::default()).unwrap();
        let mut with_hint = OrtGraph::new(&proto, SessionOptions::default()).unwrap();
        let (a, b) = (plain.run(&x).unwrap(), with_hint.run(&x).unwrap());
        assert_eq!(a.len(), b.len());
        for (u, v) in a.iter().zip(&b) {
            assert_eq!(u.shape, v.shape);
            let scale = u.data.iter().fold(1e-6f32, |m, z| m.max(z.abs()));
            let worst = u.data.iter().zip(&v.data).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst <= 1e-5 * scale, "segment {k}: differs by {worst} (values up to {scale})");
        }
        if let Some(cut) = a.get(1) {
            x = cut.clone();
        }
    }
    assert!(hinted_segments >= 3, "cuts inside residual stages get the hint ({hinted_segments} did)");
}
