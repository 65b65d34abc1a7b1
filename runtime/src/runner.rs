//! The segmented runner: feeds a batch through the segments a backend holds, applies the exit
//! rule after each, and compacts the batch to the samples still running before the next
//! segment. Samples that pass every segment it holds are handed back with their cut tensor,
//! ready to be forwarded (an edge head) — for a full model the last exit answers everything.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::exit::{Answer, ExitRule, Outcome, Policy};
use crate::split::{Reason, SplitPlanner};

/// The fate of one sample of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum SampleResult {
    Answered(Answer),
    /// Non-finite logits at the last exit; the message says where.
    Failed(String),
    /// Still running after the last segment held here; see [`BatchOutcome::forward`].
    Forwarded,
}

/// Samples that left the held segments unanswered.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Their positions in the input batch.
    pub rows: Vec<usize>,
    /// Their cut tensor, one row each, in `rows` order.
    pub cut: Tensor,
    /// The deepest held exit's best guess for each, in `rows` order (`None` for non-finite
    /// logits): the answer to give when the rest of the network cannot be reached.
    pub fallback: Vec<Option<Answer>>,
    /// The exits run before the cut (the cut is after exit `after_exit`, 1 = E1): the head's
    /// deepest, or the one a [`SplitPlanner`] chose for this batch.
    pub after_exit: usize,
    /// Why the batch was cut there.
    pub reason: Reason,
}

impl Forward {
    /// The rows at positions `picks` of this forward (a request's share of a batch).
    pub fn select(&self, picks: &[usize], offset: usize) -> Forward {
        Forward {
            rows: picks.iter().map(|&i| self.rows[i] - offset).collect(),
            cut: self.cut.gather(picks),
            fallback: picks.iter().map(|&i| self.fallback[i]).collect(),
            after_exit: self.after_exit,
            reason: self.reason,
        }
    }
}

/// Rows of a batch settled by one group (positions in the batch and their results), handed out
/// before the rest of the batch runs; see [`SegmentedRunner::run_with`].
pub type Decided = Vec<(usize, SampleResult)>;

/// Result of one batch, in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutcome {
    pub results: Vec<SampleResult>,
    pub forward: Option<Forward>,
}

/// Runs the segments of one backend with the exit rules of the exits it holds.
pub struct SegmentedRunner<B> {
    backend: B,
    /// Index of the first exit held (0 for a model or a head).
    first_exit: usize,
    rules: Vec<ExitRule>,
    /// Consecutive segments run as one unit: each group ends at an exit that can answer, or at
    /// the last segment held.
    groups: Vec<Range<usize>>,
    /// Run disabled exits' segments together (the default); off keeps one unit per segment.
    merge: bool,
    policy_version: u64,
    /// Expected shape of one input sample, when known (checked before anything runs).
    sample_shape: Option<Vec<usize>>,
    /// Chooses each batch's cut (`--partition auto`); without it a head runs every segment.
    split: Option<Arc<SplitPlanner>>,
}

impl<B: Backend> SegmentedRunner<B> {
    /// `first_exit` is the model exit index of the backend's segment 0; `policy` covers every
    /// exit of the model.
    pub fn new(backend: B, first_exit: usize, policy: &Policy, sample_shape: Option<Vec<usize>>) -> Result<Self> {
        Self::with_merging(backend, first_exit, policy, sample_shape, true)
    }

    /// Like [`SegmentedRunner::new`]; `merge = false` keeps a boundary at every exit even when it
    /// is disabled (to measure what the boundaries cost).
    pub fn with_merging(
        backend: B,
        first_exit: usize,
        policy: &Policy,
        sample_shape: Option<Vec<usize>>,
        merge: bool,
    ) -> Result<Self> {
        let mut r = SegmentedRunner {
            backend,
            first_exit,
            rules: Vec::new(),
            groups: Vec::new(),
            merge,
            policy_version: 0,
            sample_shape,
            split: None,
        };
        r.set_policy(policy)?;
        Ok(r)
    }

    /// Lets `planner` choose, per batch, after which group end the survivors are handed back
    /// (a head only: a model's last exit answers everything). Its candidate cuts follow the
    /// policy's groups.
    pub fn with_split(mut self, planner: Arc<SplitPlanner>) -> Self {
        planner.set_cuts(self.cut_candidates());
        self.split = Some(planner);
        self
    }

    /// Exit counts after which a batch can be cut: the ends of the groups.
    fn cut_candidates(&self) -> Vec<usize> {
        self.groups.iter().map(|g| self.first_exit + g.end).collect()
    }

    /// The groups of segments run as one unit under the current policy.
    pub fn groups(&self) -> &[Range<usize>] {
        &self.groups
    }

    /// Swaps the exit rules; the next batch uses them.
    pub fn set_policy(&mut self, policy: &Policy) -> Result<()> {
        let n = self.backend.num_segments();
        let rules = policy.rules.get(self.first_exit..self.first_exit + n).ok_or_else(|| {
            Error::Policy(format!(
                "policy covers {} exits, but this runner holds exits {}..{}",
                policy.rules.len(),
                self.first_exit + 1,
                self.first_exit + n
            ))
        })?;
        let mut groups = Vec::new();
        let mut start = 0;
        for (i, rule) in rules.iter().enumerate() {
            if !self.merge || rule.can_exit() || i + 1 == n {
                groups.push(start..i + 1);
                start = i + 1;
            }
        }
        // Prepare first: if the backend cannot build what the new policy needs, the old policy
        // stays in force.
        self.backend.prepare(&groups)?;
        self.rules = rules.to_vec();
        self.groups = groups;
        self.policy_version = policy.version;
        if let Some(p) = &self.split {
            p.set_cuts(self.cut_candidates());
        }
        Ok(())
    }

    /// Version of the policy in force.
    pub fn policy_version(&self) -> u64 {
        self.policy_version
    }

    /// Runs one batch (`[n, ...]`).
    pub fn run(&mut self, input: Tensor) -> Result<BatchOutcome> {
        self.run_with(input, |_| {})
    }

    /// Like [`SegmentedRunner::run`], and calls `decided` after every group that is followed by
    /// another with the rows (positions in `input`) whose fate that group settled, so that a
    /// caller can answer them before the deeper segments run. The returned outcome still holds
    /// every row.
    pub fn run_with(&mut self, input: Tensor, mut decided: impl FnMut(Decided)) -> Result<BatchOutcome> {
        let n = input.batch();
        if let Some(want) = &self.sample_shape {
            if input.shape.len() != want.len() + 1 || input.shape[1..] != want[..] || n == 0 {
                return Err(Error::Input(format!(
                    "expected a float32 batch of shape [N, {}] with N ≥ 1, found {:?}",
                    want.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                    input.shape
                )));
            }
        }
        let mut results = vec![SampleResult::Forwarded; n];
        // Positions in the original batch of the rows of `current`.
        let mut alive: Vec<usize> = (0..n).collect();
        let mut current = input;
        let held = self.first_exit + self.groups.last().map_or(0, |g| g.end);
        let (cut, reason) = match &self.split {
            Some(p) => p.choose(n),
            None => (held, Reason::Fixed),
        };
        for (gi, group) in self.groups.iter().enumerate() {
            let rule = &self.rules[group.end - 1];
            let started = Instant::now();
            let out = self.backend.run_group(group.clone(), &current)?;
            let seconds = started.elapsed().as_secs_f64();
            let end = self.first_exit + group.end;
            let last = gi + 1 == self.groups.len() || end >= cut;
            if out.logits.shape != [alive.len(), rule.width()] {
                return Err(Error::Backend(format!(
                    "exit {} returned logits of shape {:?}, expected [{}, {}]",
                    rule.name,
                    out.logits.shape,
                    alive.len(),
                    rule.width()
                )));
            }
            let mut keep = Vec::with_capacity(alive.len());
            let mut settled = Vec::new();
            let mut left = 0;
            for (row, outcome) in rule.decide(&out.logits.data).into_iter().enumerate() {
                let at = alive[row];
                match outcome {
                    Outcome::Exit(a) => {
                        results[at] = SampleResult::Answered(a);
                        left += 1;
                    }
                    Outcome::Failed(m) => results[at] = SampleResult::Failed(m),
                    Outcome::Continue => {
                        keep.push(row);
                        continue;
                    }
                }
                settled.push(at);
            }
            if let Some(p) = &self.split {
                p.record_group(end, alive.len(), left, seconds, out.cut.as_ref().map_or(0, Tensor::row_len));
            }
            let w = rule.width();
            let Some(cut_tensor) = out.cut else {
                debug_assert!(keep.is_empty(), "the last exit answers every sample");
                return Ok(BatchOutcome { results, forward: None });
            };
            // A sample whose cut is not finite (an input far outside the training range) cannot
            // go on: it fails alone instead of poisoning the batch it would travel with.
            let row_len = cut_tensor.row_len();
            keep.retain(|&row| {
                let finite = cut_tensor.data[row * row_len..(row + 1) * row_len].iter().all(|v| v.is_finite());
                if !finite {
                    let at = alive[row];
                    results[at] = SampleResult::Failed(format!(
                        "the activations after exit {} are not finite (input values far outside what the model \
                         was trained on?)",
                        rule.name
                    ));
                    settled.push(at);
                }
                finite
            });
            if !settled.is_empty() && !keep.is_empty() && !last {
                decided(settled.iter().map(|&at| (at, results[at].clone())).collect());
            }
            // Compaction: only the samples that did not exit go on. When none exited the cut
            // tensor is passed on as it is (no copy).
            current = if keep.len() == alive.len() { cut_tensor } else { cut_tensor.gather(&keep) };
            alive = keep.iter().map(|&r| alive[r]).collect();
            if alive.is_empty() {
                return Ok(BatchOutcome { results, forward: None });
            }
            if last {
                // The deepest exit run guesses each survivor's class, for degraded answers.
                let fallback = keep.iter().map(|&r| rule.fallback(&out.logits.data[r * w..(r + 1) * w])).collect();
                return Ok(BatchOutcome {
                    results,
                    forward: Some(Forward { rows: alive, cut: current, fallback, after_exit: end, reason }),
                });
            }
        }
        unreachable!("the last group returns")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::SegmentOutput;
    use crate::format::ModelMeta;

    /// A fake backend over 1-value samples: segment s's logits put `x` on the logit whose class
    /// is `x mod K`, with confidence growing with depth; the cut passes `x` on unchanged.
    pub(crate) struct Fake {
        pub segments: usize,
        pub widths: Vec<usize>,
        pub calls: Vec<(usize, usize)>,
    }

    impl Backend for Fake {
        fn num_segments(&self) -> usize {
            self.segments
        }
        fn prepare(&mut self, _groups: &[Range<usize>]) -> Result<()> {
            Ok(())
        }
        fn run_group(&mut self, group: Range<usize>, input: &Tensor) -> Result<SegmentOutput> {
            self.calls.push((group.start, input.batch()));
            let mut out = None;
            for s in group {
                out = Some(self.run_one(s, input)?);
            }
            Ok(out.expect("groups are not empty"))
        }
    }

    impl Fake {
        fn run_one(&mut self, segment: usize, input: &Tensor) -> Result<SegmentOutput> {
            let w = self.widths[segment];
            let mut logits = vec![0f32; input.batch() * w];
            for (i, &x) in input.data.iter().enumerate() {
                if x.is_nan() {
                    logits[i * w] = f32::NAN;
                } else {
                    // Sample value v: strong logit at index (v mod w) only from segment v/10 on.
                    let v = x as usize;
                    let strong = segment >= v / 10;
                    logits[i * w + v % w] = if strong { 20.0 } else { 0.1 };
                }
            }
            let cut = (segment + 1 < self.segments || self.segments < self.widths.len()).then(|| input.clone());
            Ok(SegmentOutput { logits: Tensor::new(vec![input.batch(), w], logits)?, cut })
        }
    }

    pub(crate) fn meta3() -> ModelMeta {
        ModelMeta::from_json(
            &serde_json::json!({
                "format_version": 1,
                "classes": ["a", "b", "c", "d"],
                "input": {"shape": [1, 1, 1], "mean": [0.0], "std": [1.0]},
                "exits": [
                    {"name": "E1", "logits": "o1", "cut": "c1", "classes": [0, 1, 2, 3], "bag": false, "threshold": 0.5},
                    {"name": "E2", "logits": "o2", "cut": "c2", "classes": [0, 1, 2, 3], "bag": false, "threshold": 0.5},
                    {"name": "E3", "logits": "o3", "cut": null, "classes": [0, 1, 2, 3], "bag": false, "threshold": null}
                ]
            })
            .to_string(),
        )
        .unwrap()
    }

    fn batch(values: &[f32]) -> Tensor {
        Tensor::new(vec![values.len(), 1, 1, 1], values.to_vec()).unwrap()
    }

    fn exits_of(out: &BatchOutcome) -> Vec<Option<(u32, usize)>> {
        out.results
            .iter()
            .map(|r| match r {
                SampleResult::Answered(a) => Some((a.class, a.exit)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn samples_leave_at_their_exit_and_batches_shrink() {
        let fake = Fake { segments: 3, widths: vec![4, 4, 4], calls: vec![] };
        let mut r = SegmentedRunner::new(fake, 0, &Policy::defaults(&meta3()), Some(vec![1, 1, 1])).unwrap();
        // values 1, 2 are confident at E1; 13 at E2; 25 only reaches confidence at E3.
        let out = r.run(batch(&[13.0, 1.0, 25.0, 2.0])).unwrap();
        assert_eq!(exits_of(&out), vec![Some((1, 1)), Some((1, 0)), Some((1, 2)), Some((2, 0))]);
        assert_eq!(out.forward, None);
        assert_eq!(r.backend.calls, vec![(0, 4), (1, 2), (2, 1)], "each segment sees only the survivors");
    }

    #[test]
    fn a_head_forwards_survivors_with_their_cut_rows() {
        let fake = Fake { segments: 2, widths: vec![4, 4, 4], calls: vec![] };
        let mut r = SegmentedRunner::new(fake, 0, &Policy::defaults(&meta3()), None).unwrap();
        let out = r.run(batch(&[25.0, 1.0, 31.0])).unwrap();
        assert_eq!(
            out.results[1],
            SampleResult::Answered(match &out.results[1] {
                SampleResult::Answered(a) => *a,
                _ => panic!("sample 1 exits at E1"),
            })
        );
        assert_eq!(out.results[0], SampleResult::Forwarded);
        let f = out.forward.unwrap();
        assert_eq!(f.rows, vec![0, 2]);
        assert_eq!(f.cut.data, vec![25.0, 31.0], "forwarded rows keep input order");
        // The deepest held exit (E2) guesses each forwarded sample's class for degraded answers.
        let guesses: Vec<(u32, usize)> = f.fallback.iter().map(|a| (a.unwrap().class, a.unwrap().exit)).collect();
        assert_eq!(guesses, vec![(1, 1), (3, 1)]);
    }

    #[test]
    fn a_tail_starts_at_its_first_exit_and_nan_fails_only_its_sample() {
        let fake = Fake { segments: 1, widths: vec![4], calls: vec![] };
        let mut r = SegmentedRunner::new(fake, 2, &Policy::defaults(&meta3()), None).unwrap();
        let out = r.run(batch(&[f32::NAN, 3.0])).unwrap();
        assert!(matches!(&out.results[0], SampleResult::Failed(m) if m.contains("E3")));
        assert_eq!(exits_of(&out)[1], Some((3, 2)));
    }

    #[test]
    fn disabling_every_early_exit_runs_all_segments_on_the_whole_batch() {
        let file = crate::exit::PolicyFile::from_json(
            r#"{"version": 7, "exits": [{"name": "E1", "disabled": true}, {"name": "E2", "disabled": true}]}"#,
        )
        .unwrap();
        let policy = Policy::resolve(&meta3(), &file).unwrap();
        let fake = Fake { segments: 3, widths: vec![4, 4, 4], calls: vec![] };
        let mut r = SegmentedRunner::new(fake, 0, &policy, None).unwrap();
        let out = r.run(batch(&[1.0, 2.0])).unwrap();
        assert_eq!(r.policy_version(), 7);
        assert!(exits_of(&out).iter().all(|e| e.unwrap().1 == 2));
        assert_eq!(r.groups(), std::slice::from_ref(&(0..3)), "nothing can leave at E1 or E2: one unit");
        assert_eq!(r.backend.calls, vec![(0, 2)]);

        // Without merging every exit keeps its boundary, with the same answers.
        let fake = Fake { segments: 3, widths: vec![4, 4, 4], calls: vec![] };
        let mut r = SegmentedRunner::with_merging(fake, 0, &policy, None, false).unwrap();
        assert_eq!(exits_of(&r.run(batch(&[1.0, 2.0])).unwrap()), exits_of(&out));
        assert_eq!(r.backend.calls, vec![(0, 2), (1, 2), (2, 2)]);
    }

    #[test]
    fn a_split_planner_cuts_each_batch_where_it_chooses_with_the_answers_of_a_static_head_there() {
        let planner = Arc::new(SplitPlanner::new(vec![], 3));
        let fake = Fake { segments: 2, widths: vec![4, 4, 4], calls: vec![] };
        let mut adaptive =
            SegmentedRunner::new(fake, 0, &Policy::defaults(&meta3()), None).unwrap().with_split(planner.clone());
        assert_eq!(planner.cuts(), vec![1, 2], "the head's group ends are the candidates");
        let input = [25.0, 1.0, 13.0, 31.0];
        // Exploring: the deepest cut first (its batch measures every group), then E1.
        let at_e2 = adaptive.run(batch(&input)).unwrap();
        assert_eq!(at_e2.forward.as_ref().unwrap().after_exit, 2);
        assert_eq!(at_e2.forward.unwrap().rows, vec![0, 3], "13 left at E2");
        assert_eq!(adaptive.backend.calls.len(), 2, "both segments ran");
        adaptive.backend.calls.clear();
        // Its forward comes back (a fast link): now E1 is worth a try.
        planner.record_forward(2, 2, 100, 0.002, 0.001, &[2, 2]);
        let at_e1 = adaptive.run(batch(&input)).unwrap();
        let static_e1 = SegmentedRunner::new(
            Fake { segments: 1, widths: vec![4, 4, 4], calls: vec![] },
            0,
            &Policy::defaults(&meta3()),
            None,
        )
        .unwrap()
        .run(batch(&input))
        .unwrap();
        assert_eq!(at_e1.results, static_e1.results);
        let (a, s) = (at_e1.forward.unwrap(), static_e1.forward.unwrap());
        assert_eq!((a.rows.clone(), a.cut.data.clone(), a.after_exit), (s.rows, s.cut.data, 1));
        assert_eq!(a.reason, Reason::Explore);
        assert_eq!(adaptive.backend.calls, vec![(0, 4)], "E2's segment did not run");
    }

    #[test]
    fn a_batch_of_the_wrong_shape_is_refused_before_running() {
        let fake = Fake { segments: 3, widths: vec![4, 4, 4], calls: vec![] };
        let mut r = SegmentedRunner::new(fake, 0, &Policy::defaults(&meta3()), Some(vec![1, 1, 1])).unwrap();
        let e = r.run(Tensor::new(vec![2, 3, 1, 1], vec![0.0; 6]).unwrap()).unwrap_err().to_string();
        assert_eq!(e, "input: expected a float32 batch of shape [N, 1, 1, 1] with N ≥ 1, found [2, 3, 1, 1]");
        assert!(r.backend.calls.is_empty());
        // A backend whose logits are not the exit's width is a backend error, not a wrong answer.
        let fake = Fake { segments: 3, widths: vec![3, 4, 4], calls: vec![] };
        let mut r = SegmentedRunner::new(fake, 0, &Policy::defaults(&meta3()), None).unwrap();
        assert!(r.run(batch(&[1.0])).unwrap_err().to_string().contains("expected [1, 4]"));
    }
}
