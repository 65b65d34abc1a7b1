//! Exit thresholds chosen on data instead of typed: `classynet calibrate`.
//!
//! Samples are scored once with the exit rule itself ([`ExitRule::score`]: entropy and top class
//! at every exit), so that what is calibrated is exactly what the runtime serves. Then:
//!
//! * **`precision=p`**: exit by exit, in order, among the samples that reach the exit (those
//!   that left earlier under the thresholds already chosen are gone) and whose top class may
//!   leave there, the largest threshold at which the samples leaving are correct at least a
//!   fraction `p` of the time. With `--confidence 1-δ` the precision must hold for the
//!   Clopper-Pearson upper bound on the error, and thresholds are tried from the smallest up,
//!   stopping at the first that fails (fixed-sequence testing, which keeps the guarantee at δ
//!   per exit without a correction for the number of thresholds tried).
//! * **`accuracy-drop=d`**: thresholds such that the accuracy with early exits stays at most `d`
//!   points below the last exit's alone, spent where it saves the most compute. The search starts
//!   from the cheapest solution of a sweep of precision targets that fits the allowance (or from
//!   no early exits), then raises one exit threshold at a time (over a grid of its entropy
//!   quantiles): a step that loses nothing first, else the one that saves the most MACs per
//!   answer it loses, until no step fits the allowance. So it is never worse than a precision
//!   target of the sweep with the same drop.
//! * **`--classes-only`** keeps the thresholds and chooses which classes each exit may answer:
//!   a class stays when the samples leaving as that class are correct at least `p` of the time.
//! * **`--per-class`** (class-specific early exits, CS-EE): exit by exit, every allowed class
//!   gets a threshold of its own, the largest at which the samples leaving *as that class* are
//!   correct at least `p` of the time; a class that no threshold serves, or that too few samples
//!   reach as top class, may not leave there. So an exit answers exactly the classes it is good
//!   at, each as early as its own precision allows.
//!
//! An exit with fewer than `min_support` eligible samples keeps its threshold and says so. A
//! threshold falls strictly between two observed entropies, so the rule (`entropy < T`)
//! reproduces the calibration's exit counts exactly on the calibration data.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::exit::{ClassRef, ExitPolicy, Outcome, Policy, PolicyFile};
use crate::format::ModelMeta;

/// What calibration aims for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Per exit, the samples leaving there are correct at least this fraction of the time.
    Precision(f64),
    /// The accuracy with early exits at most this many percentage points below the last exit's.
    AccuracyDrop(f64),
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Target> {
        let bad = || {
            Error::Parse(format!(
                "--target `{s}`: expected precision=P (0 < P ≤ 1, e.g. precision=0.99) or accuracy-drop=D \
                 (points, D ≥ 0, e.g. accuracy-drop=0.5)"
            ))
        };
        let (key, value) = s.split_once('=').ok_or_else(bad)?;
        let v: f64 = value.trim().parse().map_err(|_| bad())?;
        match key.trim() {
            "precision" if v > 0.0 && v <= 1.0 => Ok(Target::Precision(v)),
            "accuracy-drop" if (0.0..=100.0).contains(&v) => Ok(Target::AccuracyDrop(v)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Precision(p) => write!(f, "precision={p}"),
            Target::AccuracyDrop(d) => write!(f, "accuracy-drop={d}"),
        }
    }
}

/// How to calibrate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    pub target: Target,
    /// Fewest eligible samples (or, with `classes_only`, samples of a class) an exit needs
    /// before its threshold (or the class) is changed.
    pub min_support: usize,
    /// With [`Target::Precision`]: the confidence (e.g. 0.95) with which the precision must hold,
    /// from a Clopper-Pearson bound on the error of the samples leaving.
    pub confidence: Option<f64>,
    /// Choose the classes each exit answers instead of its threshold (precision target only).
    pub classes_only: bool,
    /// Give every class at every exit a threshold of its own (precision target only).
    pub per_class: bool,
}

impl Options {
    /// Refuses combinations that cannot work, before any sample is scored.
    pub fn check(&self) -> Result<()> {
        if let Some(c) = self.confidence {
            if !(c > 0.0 && c < 1.0) {
                return Err(Error::Parse(format!("--confidence {c}: expected a level between 0 and 1, e.g. 0.95")));
            }
            if !matches!(self.target, Target::Precision(_)) {
                return Err(Error::Parse("--confidence goes with a precision target".into()));
            }
        }
        if self.classes_only && !matches!(self.target, Target::Precision(_)) {
            return Err(Error::Parse("--classes-only goes with a precision target".into()));
        }
        if self.per_class && !matches!(self.target, Target::Precision(_)) {
            return Err(Error::Parse(
                "--per-class goes with a precision target (each class is held to it at each exit)".into(),
            ));
        }
        if self.per_class && self.classes_only {
            return Err(Error::Parse(
                "--per-class and --classes-only exclude each other: --per-class chooses thresholds and classes".into(),
            ));
        }
        Ok(())
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            target: Target::Precision(0.99),
            min_support: 30,
            confidence: None,
            classes_only: false,
            per_class: false,
        }
    }
}

/// What an exit's rule sees of one sample: entropy and top class (`None`: the bag); `None` for
/// non-finite logits (see [`ExitRule::score`](crate::exit::ExitRule::score)).
pub type Score = Option<(f32, Option<u32>)>;

/// What every exit's rule sees of every sample, and the labels.
#[derive(Debug, Clone, Default)]
pub struct Scores {
    pub labels: Vec<u32>,
    /// `[exit][sample]`.
    pub exits: Vec<Vec<Score>>,
    /// Per sample, the last exit's answer as the runtime gives it; `None` where it fails.
    pub last: Vec<Option<u32>>,
}

impl Scores {
    /// Adds a batch: `logits[m]` is exit m's `[n, width]` block (row-major), `labels` the n labels.
    pub fn push(&mut self, policy: &Policy, logits: &[&[f32]], labels: &[u32]) -> Result<()> {
        if logits.len() != policy.rules.len() {
            return Err(Error::Backend(format!(
                "calibration needs the logits of all {} exits, got {}",
                policy.rules.len(),
                logits.len()
            )));
        }
        if self.exits.is_empty() {
            self.exits = vec![Vec::new(); policy.rules.len()];
        }
        for (m, (rule, block)) in policy.rules.iter().zip(logits).enumerate() {
            if block.len() != labels.len() * rule.width() {
                return Err(Error::Backend(format!(
                    "exit {} gave {} logits for {} samples of width {}",
                    rule.name,
                    block.len(),
                    labels.len(),
                    rule.width()
                )));
            }
            self.exits[m].extend(block.chunks_exact(rule.width()).map(|row| rule.score(row)));
            if rule.last {
                self.last.extend(rule.decide(block).into_iter().map(|o| match o {
                    Outcome::Exit(a) => Some(a.class),
                    _ => None,
                }));
            }
        }
        self.labels.extend_from_slice(labels);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// One exit's rule during calibration: a threshold (`None`: disabled), the classes allowed,
/// and per class a threshold of its own (`--per-class`; else all `None`).
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    threshold: Option<f32>,
    allowed: Vec<bool>,
    class_thresholds: Vec<Option<f32>>,
}

impl Rule {
    fn threshold_of(&self, c: u32) -> Option<f32> {
        self.class_thresholds[c as usize].or(self.threshold)
    }
}

/// The outcome for one exit.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitResult {
    pub name: String,
    /// The threshold before calibration (the model's or the starting policy's).
    pub before: Option<f32>,
    /// The threshold chosen; `None` for a disabled exit and for the last exit.
    pub threshold: Option<f32>,
    /// Per class id, the class's own threshold (`--per-class`); all `None` otherwise.
    pub class_thresholds: Vec<Option<f32>>,
    /// Per class id: may this exit answer it.
    pub allowed: Vec<bool>,
    /// Samples that reach the exit, that may leave there (finite, top class allowed), that
    /// leave, and that leave with the right class.
    pub reaching: usize,
    pub eligible: usize,
    pub exited: usize,
    pub correct: usize,
    /// Why the exit was left as it was, when it was.
    pub note: Option<String>,
}

/// A calibration: the rule of every exit and what it gives on the calibration data.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub target: Target,
    pub samples: usize,
    pub exits: Vec<ExitResult>,
    /// Accuracy with the calibrated early exits, and of the last exit alone.
    pub accuracy: f64,
    pub final_accuracy: f64,
    /// MACs per sample with the early exits, and of the whole model; counted per segment from
    /// the graph when `macs` was given, else in segments (one per exit).
    pub macs_per_sample: f64,
    pub final_macs: f64,
    pub macs_counted: bool,
    /// `[class][exit]`: how many samples of each true class leave at each exit.
    pub class_exits: Vec<Vec<usize>>,
}

/// Calibrates `base` (the model's policy, or one given to start from) on `scores`. `macs` are
/// the MACs per sample of each segment ([`crate::planner::segment_macs`]). Exits marked in
/// `fixed` (those a starting policy file disables) stay as they are; every other early exit is
/// calibrated, one without a threshold (a plain model's) included. Class thresholds of a
/// starting policy are replaced like its exit thresholds.
pub fn calibrate(
    meta: &ModelMeta,
    base: &Policy,
    fixed: &[bool],
    scores: &Scores,
    macs: Option<&[u64]>,
    opts: &Options,
) -> Result<Calibration> {
    let n = scores.len();
    let m = base.rules.len();
    if n == 0 {
        return Err(Error::Parse("calibration needs at least one sample".into()));
    }
    if scores.exits.len() != m {
        return Err(Error::Parse(format!("scores for {} exits, the model has {m}", scores.exits.len())));
    }
    opts.check()?;
    let k = meta.num_classes();
    if let Some(&bad) = scores.labels.iter().find(|&&y| y as usize >= k) {
        return Err(Error::Parse(format!("label {bad} is not a class of this model (it has {k})")));
    }
    let mut rules: Vec<Rule> = base
        .rules
        .iter()
        .map(|r| Rule { threshold: r.threshold, allowed: r.allowed.clone(), class_thresholds: vec![None; k] })
        .collect();
    let fixed: Vec<bool> = (0..m).map(|e| fixed.get(e).copied().unwrap_or(false)).collect();
    let mut notes: Vec<Option<String>> = vec![None; m];
    for e in (0..m).filter(|&e| fixed[e]) {
        notes[e] = Some("disabled in the starting policy; left so".into());
    }
    match (opts.target, opts.classes_only, opts.per_class) {
        (Target::Precision(p), _, true) => per_class(scores, &mut rules, &fixed, &mut notes, p, opts),
        (Target::Precision(p), false, false) => precision(scores, &mut rules, &fixed, &mut notes, p, opts),
        (Target::Precision(p), true, false) => classes_only(scores, &mut rules, &fixed, &mut notes, p, opts),
        (Target::AccuracyDrop(d), ..) => accuracy_drop(scores, &mut rules, &fixed, &mut notes, d, macs, opts),
    }
    Ok(summarise(meta, base, scores, &rules, notes, macs, opts.target))
}

/// Does sample `i` leave at early exit `e` under `rule`?
fn leaves(scores: &Scores, e: usize, i: usize, rule: &Rule) -> bool {
    match scores.exits[e][i] {
        Some((h, Some(c))) => rule.allowed[c as usize] && rule.threshold_of(c).is_some_and(|t| h < t),
        _ => false,
    }
}

fn exit_of(scores: &Scores, rules: &[Rule], i: usize) -> usize {
    let last = rules.len() - 1;
    (0..last).find(|&e| leaves(scores, e, i, &rules[e])).unwrap_or(last)
}

/// Samples sorted by entropy with whether each is right, and the threshold that lets the first
/// `k` of them leave.
fn threshold_for(cands: &[(f32, bool)], k: usize) -> f32 {
    let lo = cands[k - 1].0;
    let up = next_up(lo);
    match cands.get(k) {
        Some(&(hi, _)) => {
            let mid = ((lo as f64 + hi as f64) / 2.0) as f32;
            if mid > lo {
                mid
            } else {
                up
            }
        }
        None => up,
    }
}

fn next_up(x: f32) -> f32 {
    if x <= 0.0 {
        f32::from_bits(1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// The largest `k` (at a boundary between distinct entropies) whose first `k` samples meet the
/// precision target; with a confidence level, the fixed-sequence scan from the smallest.
fn largest_precise(cands: &[(f32, bool)], p: f64, confidence: Option<f64>) -> Option<usize> {
    let mut right = 0usize;
    let mut best = None;
    for k in 1..=cands.len() {
        right += cands[k - 1].1 as usize;
        if k < cands.len() && cands[k].0 <= cands[k - 1].0 {
            continue; // a threshold cannot separate equal entropies
        }
        if meets(right, k, p, confidence) {
            best = Some(k);
        } else if confidence.is_some() {
            break;
        }
    }
    best
}

/// Whether `right` of `n` samples meet precision `p`: observed, or with a confidence level, by
/// the Clopper-Pearson upper bound on the error.
fn meets(right: usize, n: usize, p: f64, confidence: Option<f64>) -> bool {
    match confidence {
        None => right as f64 >= p * n as f64 - 1e-9,
        Some(level) => 1.0 - error_upper_bound(n, n - right, 1.0 - level) >= p - 1e-12,
    }
}

/// Cost of answering at each exit: MACs per sample up to it, or, without MACs, its number of
/// segments.
fn cumulative_cost(macs: Option<&[u64]>, exits: usize) -> Vec<f64> {
    match macs {
        Some(per) => per.iter().scan(0u64, |s, &x| Some(std::mem::replace(s, *s + x) + x)).map(|c| c as f64).collect(),
        None => (1..=exits).map(|c| c as f64).collect(),
    }
}

/// Clopper-Pearson upper bound at level `1 - delta` on an error rate seen as `errors` of `n`:
/// the q at which `P(Binomial(n, q) ≤ errors) = delta`.
pub fn error_upper_bound(n: usize, errors: usize, delta: f64) -> f64 {
    if errors >= n {
        return 1.0;
    }
    let cdf = |q: f64| -> f64 {
        // sum_{j=0}^{errors} C(n, j) q^j (1-q)^(n-j), term by term in log space.
        let (lq, l1q) = (q.ln(), (1.0 - q).ln());
        let mut log_c = 0.0f64;
        let mut sum = 0.0f64;
        for j in 0..=errors {
            if j > 0 {
                log_c += ((n - j + 1) as f64).ln() - (j as f64).ln();
            }
            sum += (log_c + j as f64 * lq + (n - j) as f64 * l1q).exp();
        }
        sum
    };
    let (mut lo, mut hi) = (errors as f64 / n as f64, 1.0f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if cdf(mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// Walks the early exits in order, letting `choose` set each exit's rule (and note) from the
/// samples still present, then takes the samples that leave there out of the rest.
fn exit_by_exit(
    scores: &Scores,
    rules: &mut [Rule],
    fixed: &[bool],
    notes: &mut [Option<String>],
    mut choose: impl FnMut(usize, &[bool], &mut Rule, &mut Option<String>),
) {
    let mut present = vec![true; scores.len()];
    for e in (0..rules.len() - 1).filter(|&e| !fixed[e]) {
        choose(e, &present, &mut rules[e], &mut notes[e]);
        for (i, here) in present.iter_mut().enumerate() {
            if *here && leaves(scores, e, i, &rules[e]) {
                *here = false;
            }
        }
    }
}

fn precision(
    scores: &Scores,
    rules: &mut [Rule],
    fixed: &[bool],
    notes: &mut [Option<String>],
    p: f64,
    opts: &Options,
) {
    let n = scores.len();
    exit_by_exit(scores, rules, fixed, notes, |e, present, rule, note| {
        let name = format!("E{}", e + 1);
        let mut cands: Vec<(f32, bool)> = (0..n)
            .filter(|&i| present[i])
            .filter_map(|i| match scores.exits[e][i] {
                Some((h, Some(c))) if rule.allowed[c as usize] => Some((h, c == scores.labels[i])),
                _ => None,
            })
            .collect();
        if cands.len() < opts.min_support {
            *note = Some(format!(
                "only {} eligible samples reach {name} (--min-support {}): threshold kept",
                cands.len(),
                opts.min_support
            ));
        } else {
            cands.sort_by(|a, b| a.0.total_cmp(&b.0));
            match largest_precise(&cands, p, opts.confidence) {
                Some(k) => rule.threshold = Some(threshold_for(&cands, k)),
                None => {
                    rule.threshold = None;
                    *note =
                        Some(format!("no threshold reaches the target on {} eligible samples: disabled", cands.len()));
                }
            }
        }
    });
}

fn classes_only(
    scores: &Scores,
    rules: &mut [Rule],
    fixed: &[bool],
    notes: &mut [Option<String>],
    p: f64,
    opts: &Options,
) {
    let n = scores.len();
    exit_by_exit(scores, rules, fixed, notes, |e, present, rule, note| {
        if rule.threshold.is_none() {
            *note = Some("no threshold to keep (--classes-only keeps thresholds): nothing leaves".into());
            return;
        }
        let k = rule.allowed.len();
        let (mut out, mut right) = (vec![0usize; k], vec![0usize; k]);
        for i in (0..n).filter(|&i| present[i] && leaves(scores, e, i, rule)) {
            let (_, c) = scores.exits[e][i].expect("a sample that leaves has finite logits");
            let c = c.expect("a sample that leaves has a real class") as usize;
            out[c] += 1;
            right[c] += (c as u32 == scores.labels[i]) as usize;
        }
        let mut few = Vec::new();
        for c in 0..k {
            if !rule.allowed[c] || out[c] == 0 {
                continue;
            }
            if out[c] < opts.min_support {
                few.push(c);
            } else {
                rule.allowed[c] = meets(right[c], out[c], p, opts.confidence);
            }
        }
        if !few.is_empty() {
            *note =
                Some(format!("classes {few:?} leave on fewer than --min-support {} samples: kept", opts.min_support));
        }
    });
}

fn per_class(
    scores: &Scores,
    rules: &mut [Rule],
    fixed: &[bool],
    notes: &mut [Option<String>],
    p: f64,
    opts: &Options,
) {
    let n = scores.len();
    exit_by_exit(scores, rules, fixed, notes, |e, present, rule, note| {
        let k = rule.allowed.len();
        // Per class: the samples still present whose top class it is, by entropy.
        let mut cands: Vec<Vec<(f32, bool)>> = vec![Vec::new(); k];
        for i in (0..n).filter(|&i| present[i]) {
            if let Some((h, Some(c))) = scores.exits[e][i] {
                cands[c as usize].push((h, c == scores.labels[i]));
            }
        }
        let (mut few, mut missed) = (Vec::new(), Vec::new());
        rule.threshold = None; // only the classes with a threshold of their own leave
        for (c, cs) in cands.iter_mut().enumerate() {
            rule.class_thresholds[c] = None;
            if !rule.allowed[c] {
                continue;
            }
            if cs.len() < opts.min_support {
                few.push(c);
                rule.allowed[c] = false;
                continue;
            }
            cs.sort_by(|a, b| a.0.total_cmp(&b.0));
            match largest_precise(cs, p, opts.confidence) {
                Some(j) => rule.class_thresholds[c] = Some(threshold_for(cs, j)),
                None => {
                    missed.push(c);
                    rule.allowed[c] = false;
                }
            }
        }
        let mut parts = Vec::new();
        if !missed.is_empty() {
            parts.push(format!("classes {missed:?} reach the target at no threshold"));
        }
        if !few.is_empty() {
            parts.push(format!(
                "classes {few:?} are the top class of fewer than --min-support {} samples",
                opts.min_support
            ));
        }
        if !parts.is_empty() {
            let none = !rule.allowed.iter().any(|&a| a);
            *note = Some(format!("{}: {}", parts.join("; "), if none { "disabled" } else { "they do not leave here" }));
        }
    });
}

/// Candidate thresholds of early exit `e`: up to `LEVELS` quantiles of the entropies of the
/// samples whose top class may leave there, each placed just above its entropy.
const LEVELS: usize = 48;

/// Precision targets whose solutions `accuracy-drop` starts its search from.
const PRECISION_SWEEP: &[f64] = &[
    0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.9925, 0.995,
    0.9975, 0.999, 1.0,
];

fn accuracy_drop(
    scores: &Scores,
    rules: &mut [Rule],
    fixed: &[bool],
    notes: &mut [Option<String>],
    drop_points: f64,
    macs: Option<&[u64]>,
    opts: &Options,
) {
    let n = scores.len();
    let m = rules.len();
    let early = m - 1;
    // Cost of leaving at each exit: MACs to there, or segments when they cannot be counted.
    let cost = cumulative_cost(macs, m);
    // Per exit, per sample: the entropy when the sample may leave there (else infinity), and
    // whether the answer is right.
    let mut ent = vec![vec![f32::INFINITY; n]; m];
    let mut right = vec![vec![false; n]; m];
    for e in 0..early {
        for i in 0..n {
            if let Some((h, Some(c))) = scores.exits[e][i] {
                right[e][i] = c == scores.labels[i];
                if rules[e].allowed[c as usize] && !fixed[e] {
                    ent[e][i] = h;
                }
            }
        }
    }
    for (i, r) in right[early].iter_mut().enumerate() {
        *r = scores.last[i] == Some(scores.labels[i]);
    }
    let mut levels: Vec<Vec<f32>> = Vec::with_capacity(early);
    for e in 0..early {
        let mut cands: Vec<(f32, bool)> = ent[e].iter().filter(|h| h.is_finite()).map(|&h| (h, true)).collect();
        cands.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut t = vec![0.0f32]; // level 0: nothing leaves
        if cands.len() < opts.min_support {
            notes[e] = Some(format!(
                "only {} samples may leave at E{} (--min-support {}): disabled",
                cands.len(),
                e + 1,
                opts.min_support
            ));
        } else {
            for q in 1..=LEVELS {
                let mut k = (cands.len() * q).div_ceil(LEVELS);
                while k < cands.len() && cands[k].0 <= cands[k - 1].0 {
                    k += 1;
                }
                let th = threshold_for(&cands, k);
                if th > *t.last().expect("level 0") {
                    t.push(th);
                }
            }
        }
        levels.push(t);
    }
    // The precision targets' solutions are starting points: a greedy from nothing can be led
    // off by its first steps, and the precision sweep lands where calibration usually should.
    // Each one's thresholds join its exits' levels, so the greedy can start from any of them.
    let mut starts: Vec<Vec<f32>> = Vec::with_capacity(PRECISION_SWEEP.len());
    for &p in PRECISION_SWEEP {
        let (mut r, mut nn) = (rules.to_vec(), notes.to_vec());
        precision(scores, &mut r, fixed, &mut nn, p, opts);
        let t: Vec<f32> = (0..early)
            .map(|e| if levels[e].len() > 1 { r[e].threshold.unwrap_or(0.0).max(0.0) } else { 0.0 })
            .collect();
        for e in 0..early {
            levels[e].push(t[e]);
        }
        starts.push(t);
    }
    for l in levels.iter_mut() {
        l.sort_by(f32::total_cmp);
        l.dedup();
    }
    let simulate = |at: &[usize]| -> (usize, f64) {
        let (mut ok, mut spent) = (0usize, 0.0f64);
        for i in 0..n {
            let e = (0..early).find(|&e| ent[e][i] < levels[e][at[e]]).unwrap_or(early);
            ok += right[e][i] as usize;
            spent += cost[e];
        }
        (ok, spent)
    };
    let mut at = vec![0usize; early];
    let (base_ok, mut spent) = simulate(&at);
    let floor = base_ok as f64 - drop_points / 100.0 * n as f64 - 1e-9;
    let mut ok_now = base_ok;
    for t in &starts {
        let idx: Vec<usize> = (0..early)
            .map(|e| levels[e].iter().position(|&l| l == t[e]).expect("every start's threshold is a level"))
            .collect();
        let (ok, s) = simulate(&idx);
        if ok as f64 >= floor && s < spent {
            (at, spent, ok_now) = (idx, s, ok);
        }
    }
    // Then one level at a time: first the steps that lose nothing (the one saving most), then
    // the one that saves the most MACs per answer it loses (its own loss, not the total so far,
    // which would favour big lossy steps once anything is lost), while the allowance lasts.
    loop {
        let mut best: Option<((u8, f64), usize, f64, usize)> = None; // (rank, exit, spent, ok)
        for e in 0..early {
            if at[e] + 1 >= levels[e].len() {
                continue;
            }
            at[e] += 1;
            let (ok, s) = simulate(&at);
            at[e] -= 1;
            let saved = spent - s;
            if (ok as f64) < floor || saved <= 0.0 {
                continue;
            }
            let lost = ok_now as f64 - ok as f64;
            let rank = if lost <= 0.0 { (1, saved) } else { (0, saved / lost) };
            if best.is_none_or(|(b, ..)| rank > b) {
                best = Some((rank, e, s, ok));
            }
        }
        match best {
            Some((_, e, s, ok)) => {
                at[e] += 1;
                (spent, ok_now) = (s, ok);
            }
            None => break,
        }
    }
    for e in (0..early).filter(|&e| !fixed[e]) {
        rules[e].threshold = (at[e] > 0).then(|| levels[e][at[e]]);
        if at[e] == 0 && notes[e].is_none() {
            notes[e] = Some("no threshold saves compute within the allowance: disabled".into());
        }
    }
}

fn summarise(
    meta: &ModelMeta,
    base: &Policy,
    scores: &Scores,
    rules: &[Rule],
    notes: Vec<Option<String>>,
    macs: Option<&[u64]>,
    target: Target,
) -> Calibration {
    let n = scores.len();
    let m = rules.len();
    let k = meta.num_classes();
    let cost = cumulative_cost(macs, m);
    let mut res: Vec<ExitResult> = base
        .rules
        .iter()
        .zip(rules)
        .zip(notes)
        .map(|((b, r), note)| ExitResult {
            name: b.name.clone(),
            before: b.threshold,
            threshold: if b.last { None } else { r.threshold },
            class_thresholds: if b.last { vec![None; k] } else { r.class_thresholds.clone() },
            allowed: r.allowed.clone(),
            reaching: 0,
            eligible: 0,
            exited: 0,
            correct: 0,
            note,
        })
        .collect();
    let mut class_exits = vec![vec![0usize; m]; k];
    let (mut right, mut final_right, mut spent) = (0usize, 0usize, 0.0f64);
    for i in 0..n {
        let y = scores.labels[i];
        let answer_last = scores.last[i];
        final_right += (answer_last == Some(y)) as usize;
        let e = exit_of(scores, rules, i);
        for r in res.iter_mut().take(e + 1) {
            r.reaching += 1;
        }
        for (x, r) in res.iter_mut().enumerate().take(e + 1) {
            if let Some((_, Some(c))) = scores.exits[x][i] {
                if x + 1 == m || r.allowed[c as usize] {
                    r.eligible += 1;
                }
            }
        }
        let answer = if e + 1 == m { answer_last } else { scores.exits[e][i].and_then(|(_, c)| c) };
        res[e].exited += 1;
        if answer == Some(y) {
            res[e].correct += 1;
            right += 1;
        }
        class_exits[y as usize][e] += 1;
        spent += cost[e];
    }
    Calibration {
        target,
        samples: n,
        exits: res,
        accuracy: right as f64 / n as f64,
        final_accuracy: final_right as f64 / n as f64,
        macs_per_sample: spent / n as f64,
        final_macs: cost[m - 1],
        macs_counted: macs.is_some(),
        class_exits,
    }
}

impl Calibration {
    /// The policy file that serves this calibration: every early exit's threshold (or
    /// `disabled`), its classes where they differ from the model's, and its class thresholds.
    pub fn policy_file(&self, meta: &ModelMeta, version: u64) -> PolicyFile {
        let k = meta.num_classes();
        let exits = self
            .exits
            .iter()
            .zip(&meta.exits)
            .take(self.exits.len().saturating_sub(1))
            .map(|(r, e)| {
                let mut trained = vec![false; k];
                for &c in &e.classes {
                    trained[c] = true;
                }
                let classes = (r.allowed != trained)
                    .then(|| (0..k).filter(|&c| r.allowed[c]).map(ClassRef::Id).collect::<Vec<_>>());
                let class_thresholds: std::collections::BTreeMap<String, f32> = (0..k)
                    .filter(|&c| r.allowed[c])
                    .filter_map(|c| r.class_thresholds[c].map(|t| (c.to_string(), t)))
                    .collect();
                let disabled = r.threshold.is_none() && class_thresholds.is_empty();
                ExitPolicy { name: r.name.clone(), threshold: r.threshold, disabled, classes, class_thresholds }
            })
            .collect();
        PolicyFile { version, exits }
    }
}

/// A class-to-exit assignment: which classes each early exit owns (incrementally: an exit also
/// answers every class of the exits before it, the paper's IC scheme), the calibration it gives,
/// and its expected MACs per sample under the traffic prior.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Per early exit, the classes it adds.
    pub new_classes: Vec<Vec<u32>>,
    pub calibration: Calibration,
    /// Expected MACs (or segments, without MACs) per sample under the prior.
    pub expected_cost: f64,
}

impl Assignment {
    /// The trainer's `--assign` string: exits separated by `;`, classes by `,` (`9;8;6;1;7;0`).
    pub fn assign_string(&self) -> String {
        self.new_classes
            .iter()
            .map(|c| c.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// Parses an `--assign` string into the classes each early exit adds.
pub fn parse_assignment(text: &str, early_exits: usize, num_classes: usize) -> Result<Vec<Vec<u32>>> {
    let parts: Vec<&str> = text.split(';').collect();
    if parts.len() > early_exits {
        return Err(Error::Parse(format!(
            "assignment `{text}` names {} exits; the model has {early_exits} early exits",
            parts.len()
        )));
    }
    let mut out = vec![Vec::new(); early_exits];
    let mut seen = vec![false; num_classes];
    for (e, part) in parts.iter().enumerate() {
        for c in part.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let id: usize = c.parse().map_err(|_| {
                Error::Parse(format!("assignment `{text}`: `{c}` is not a class id (expected e.g. 9;8;6 or 0,1;2)"))
            })?;
            if id >= num_classes || std::mem::replace(&mut seen[id], true) {
                return Err(Error::Parse(format!(
                    "assignment `{text}`: class {id} is not one of 0..{} or is given twice",
                    num_classes - 1
                )));
            }
            out[e].push(id as u32);
        }
    }
    Ok(out)
}

/// The policy file that gates a plain-exit model by `new_classes` (incremental sets).
pub fn gating_policy(meta: &ModelMeta, new_classes: &[Vec<u32>]) -> PolicyFile {
    let mut so_far: Vec<ClassRef> = Vec::new();
    let exits = new_classes
        .iter()
        .enumerate()
        .map(|(e, add)| {
            so_far.extend(add.iter().map(|&c| ClassRef::Id(c as usize)));
            ExitPolicy { name: meta.exits[e].name.clone(), classes: Some(so_far.clone()), ..Default::default() }
        })
        .collect();
    PolicyFile { version: 0, exits }
}

/// Evaluates one assignment: gates, calibrates for the precision target, weighs the cost by
/// the prior (share of traffic per class).
pub fn evaluate_assignment(
    meta: &ModelMeta,
    scores: &Scores,
    macs: Option<&[u64]>,
    prior: &[f64],
    new_classes: &[Vec<u32>],
    opts: &Options,
) -> Result<Assignment> {
    let policy = Policy::resolve(meta, &gating_policy(meta, new_classes))?;
    let cal = calibrate(meta, &policy, &[], scores, macs, opts)?;
    let m = cal.exits.len();
    let cost = cumulative_cost(macs, m);
    let mut expected = 0.0;
    for (c, row) in cal.class_exits.iter().enumerate() {
        let n: usize = row.iter().sum();
        if n > 0 && prior[c] > 0.0 {
            expected += prior[c] * row.iter().zip(&cost).map(|(&k, &x)| k as f64 * x).sum::<f64>() / n as f64;
        }
    }
    Ok(Assignment { new_classes: new_classes.to_vec(), calibration: cal, expected_cost: expected })
}

/// Searches a class-to-exit assignment for a plain-exit model (BranchyNet: every exit trained
/// on every class) that minimises the expected MACs per sample under `prior` (class shares,
/// summing to 1) with every exit calibrated to the precision target. Greedy: from no class
/// assigned, each step moves the one class to the one exit (or to none) that lowers the
/// expected cost most, until no move does.
pub fn assign(
    meta: &ModelMeta,
    scores: &Scores,
    macs: Option<&[u64]>,
    prior: &[f64],
    opts: &Options,
) -> Result<Assignment> {
    if !matches!(opts.target, Target::Precision(_)) || opts.classes_only {
        return Err(Error::Parse("assigning classes to exits takes a precision target".into()));
    }
    let k = meta.num_classes();
    if prior.len() != k || prior.iter().any(|p| !(p.is_finite() && *p >= 0.0)) || prior.iter().sum::<f64>() <= 0.0 {
        return Err(Error::Parse(format!("the traffic prior needs {k} non-negative shares, not all zero")));
    }
    if let Some(e) = meta.exits[..meta.exits.len() - 1].iter().find(|e| e.bag) {
        return Err(Error::Parse(format!(
            "exit {} is a bag-of-classes exit trained for its classes; assigning classes needs a model whose early \
             exits answer every class (mode bn, BranchyNet)",
            e.name
        )));
    }
    let total: f64 = prior.iter().sum();
    let prior: Vec<f64> = prior.iter().map(|p| p / total).collect();
    let early = meta.exits.len() - 1;
    let mut at: Vec<Option<usize>> = vec![None; k]; // the exit that owns each class
    let sets = |at: &[Option<usize>]| -> Vec<Vec<u32>> {
        let mut v = vec![Vec::new(); early];
        for (c, e) in at.iter().enumerate() {
            if let Some(e) = e {
                v[*e].push(c as u32);
            }
        }
        v
    };
    let mut best = evaluate_assignment(meta, scores, macs, &prior, &sets(&at), opts)?;
    loop {
        let mut step: Option<(Assignment, usize, Option<usize>)> = None;
        for c in 0..k {
            for option in std::iter::once(None).chain((0..early).map(Some)) {
                if option == at[c] {
                    continue;
                }
                let was = std::mem::replace(&mut at[c], option);
                let a = evaluate_assignment(meta, scores, macs, &prior, &sets(&at), opts)?;
                at[c] = was;
                let bar = step.as_ref().map_or(best.expected_cost, |s| s.0.expected_cost);
                if a.expected_cost < bar * (1.0 - 1e-9) {
                    step = Some((a, c, option));
                }
            }
        }
        match step {
            Some((a, c, option)) => {
                at[c] = option;
                best = a;
            }
            None => return Ok(best),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_say_what_they_expect() {
        assert_eq!("precision=0.99".parse::<Target>().unwrap(), Target::Precision(0.99));
        assert_eq!("accuracy-drop=0.5".parse::<Target>().unwrap(), Target::AccuracyDrop(0.5));
        for bad in ["precision=1.5", "precision", "recall=0.9", "accuracy-drop=-1"] {
            let e = bad.parse::<Target>().unwrap_err().to_string();
            assert!(e.contains("expected precision=P") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn the_clopper_pearson_bound_matches_known_values() {
        // 0 errors of 100 at 95 %: 1 - 0.05^(1/100) = 0.0295.
        assert!((error_upper_bound(100, 0, 0.05) - 0.0295).abs() < 1e-4);
        // 1 error of 10 at 95 %: 0.3942 (the exact binomial interval's upper end).
        assert!((error_upper_bound(10, 1, 0.05) - 0.3942).abs() < 1e-3);
        assert_eq!(error_upper_bound(5, 5, 0.05), 1.0);
    }

    #[test]
    fn thresholds_fall_strictly_between_observed_entropies() {
        let c = [(0.1f32, true), (0.2, true), (0.2, false), (0.5, true)];
        let t = threshold_for(&c, 1);
        assert!(t > 0.1 && t < 0.2);
        let t = threshold_for(&c, 4);
        assert!(t > 0.5 && t - 0.5 < 1e-6);
        // Adjacent floats: the next one up still admits the first and not the second.
        let a = 0.3f32;
        let b = f32::from_bits(a.to_bits() + 1);
        let t = threshold_for(&[(a, true), (b, true)], 1);
        assert!(a < t && b >= t, "the rule is entropy < T: a leaves, b does not");
        // Equal entropies are never split.
        assert_eq!(largest_precise(&c, 0.9, None), Some(1));
        assert_eq!(largest_precise(&c, 0.7, None), Some(4));
    }
}

#[cfg(test)]
mod synthetic {
    //! Scores built by hand, with the answers worked out in the comments.
    use super::*;
    use crate::model::tests::tiny3;

    /// tiny3: E1 a bag exit for class 2, E2 plain, E3 last; 4 classes. 100 samples:
    /// * E1: samples 0..60 have top class 2 at entropy i/100; 0..40 are right (label 2), and
    ///   from 40 on every even one is wrong (label 0), so precision over the first k is 1 up to
    ///   k = 40, then 41/42, 41/43, 42/44 = 0.9545, 42/45 = 0.933, …, 50/60.
    /// * E2: samples 0..44 are wrong at entropy 0.05 (they never count if E1 took them); 44..100
    ///   are right at entropy 0.3 + (i-44)/100, but sample 99 (the least sure) is wrong.
    /// * The last exit answers every sample right.
    fn scores() -> Scores {
        let n = 100;
        let mut labels = vec![1u32; n];
        let mut e1 = vec![None; n];
        let mut e2 = vec![None; n];
        for i in 0..n {
            if i < 60 {
                let right = i < 40 || i % 2 == 1;
                labels[i] = if right { 2 } else { 0 };
                e1[i] = Some((i as f32 / 100.0, Some(2)));
            } else {
                e1[i] = Some((1.0, None)); // the bag wins
            }
            let y = labels[i];
            e2[i] = if i < 44 {
                Some((0.05, Some((y + 1) % 4)))
            } else {
                let right = i != 99;
                Some((0.3 + (i - 44) as f32 / 100.0, Some(if right { y } else { (y + 1) % 4 })))
            };
        }
        let e3 = labels.iter().map(|&y| Some((0.1, Some(y)))).collect();
        Scores { last: labels.iter().map(|&y| Some(y)).collect(), labels, exits: vec![e1, e2, e3] }
    }

    fn run(opts: Options) -> Calibration {
        let m = tiny3();
        calibrate(&m.meta, &Policy::defaults(&m.meta), &[], &scores(), None, &opts).unwrap()
    }

    #[test]
    fn precision_picks_the_largest_threshold_that_meets_it_taking_earlier_exits_into_account() {
        let c = run(Options { target: Target::Precision(0.95), min_support: 10, ..Options::default() });
        // E1: the largest k with precision ≥ 0.95 is 44 (42/44): between entropies 0.43 and 0.44.
        let t1 = c.exits[0].threshold.unwrap();
        assert!(t1 > 0.43 && t1 < 0.44, "{t1}");
        assert_eq!((c.exits[0].exited, c.exits[0].correct), (44, 42));
        // E2 sees only the 56 samples E1 left it; 55 of 56 are right, ≥ 0.95: all leave.
        assert_eq!(c.exits[1].reaching, 56);
        assert_eq!((c.exits[1].exited, c.exits[1].correct), (56, 55));
        assert_eq!(c.exits[2].exited, 0);
        assert_eq!(c.class_exits[2][0], 42);

        // At 0.99, E1 stops at k = 40 (sample 40 is the first wrong one). E2 then also sees
        // samples 40..44, wrong at its lowest entropy: no threshold reaches 0.99 there, and it
        // is disabled, saying why.
        let c = run(Options { target: Target::Precision(0.99), min_support: 10, ..Options::default() });
        assert_eq!((c.exits[0].exited, c.exits[0].correct), (40, 40));
        assert_eq!(c.exits[1].reaching, 60);
        assert_eq!((c.exits[1].threshold, c.exits[1].exited), (None, 0));
        assert!(c.exits[1].note.as_deref().unwrap().contains("no threshold reaches the target"));
    }

    #[test]
    fn an_exit_with_too_few_samples_keeps_its_threshold_and_says_so() {
        let c = run(Options { target: Target::Precision(0.95), min_support: 61, ..Options::default() });
        assert_eq!(c.exits[0].threshold, Some(0.5), "tiny3's own E1 threshold");
        let note = c.exits[0].note.as_deref().unwrap();
        assert!(note.contains("only 60 eligible samples reach E1") && note.contains("--min-support 61"), "{note}");
    }

    #[test]
    fn a_confidence_level_asks_for_more_than_the_observed_precision() {
        let plain = run(Options { target: Target::Precision(0.95), min_support: 10, ..Options::default() });
        let sure = run(Options {
            target: Target::Precision(0.95),
            min_support: 10,
            confidence: Some(0.9),
            ..Options::default()
        });
        // With 40 right of 40 the 90 % bound on the error is 1 - 0.1^(1/40) = 0.056 > 0.05, so
        // E1 cannot reach 0.95 with that confidence: it stops short or is disabled.
        assert!(sure.exits[0].exited < plain.exits[0].exited, "{:?}", sure.exits[0]);
    }

    #[test]
    fn accuracy_drop_zero_keeps_the_accuracy_and_saves_compute() {
        let c = run(Options { target: Target::AccuracyDrop(0.0), min_support: 10, ..Options::default() });
        assert!(c.accuracy >= c.final_accuracy, "{} vs {}", c.accuracy, c.final_accuracy);
        assert!(c.macs_per_sample < c.final_macs, "early exits save something: {}", c.macs_per_sample);
        // Allowing 100 points lets the greedy send everything it can to the cheapest exit.
        let all = run(Options { target: Target::AccuracyDrop(100.0), min_support: 10, ..Options::default() });
        assert!(all.macs_per_sample <= c.macs_per_sample);
        assert_eq!(all.exits[0].exited, 60, "every sample E1 may answer leaves there");
    }

    /// A larger fixture drawn from a fixed pseudo-random stream: tiny3's E1 a bag exit for class
    /// 2, E2 plain, the last exit right 95 % of the time; how sure and how right each exit is
    /// depends on a per-sample difficulty, with noise, as on real data.
    fn noisy_scores(n: usize, seed: u64) -> Scores {
        let mut state = seed;
        let mut unit = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut labels, mut e1, mut e2, mut e3, mut last) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..n {
            let y = (unit() * 4.0) as u32;
            let hard = unit();
            let wrong = |p: f64, u: f64| if u < p { (y + 1 + (u * 3.0) as u32 % 3) % 4 } else { y };
            labels.push(y);
            // E1 claims class 2 for most easy 2s and for a few others, more sure when easy.
            let claims = (y == 2 && hard < 0.8) || unit() < 0.08;
            e1.push(Some(if claims { ((0.1 + hard * 1.2 + unit() * 0.4) as f32, Some(2)) } else { (1.0, None) }));
            let c2 = wrong(0.35 * hard, unit());
            e2.push(Some(((hard * 1.0 + unit() * 0.6 + if c2 == y { 0.0 } else { 0.25 }) as f32, Some(c2))));
            let c3 = wrong(0.05, unit());
            e3.push(Some((0.1, Some(c3))));
            last.push(Some(c3));
        }
        Scores { labels, exits: vec![e1, e2, e3], last }
    }

    #[test]
    fn accuracy_drop_is_not_dominated_by_a_precision_target_with_the_same_drop() {
        // For a precision target, the accuracy-drop target allowing that target's drop must
        // answer at most as many MACs per sample (it may spend the allowance anywhere).
        let m = tiny3();
        let scores = noisy_scores(4000, 7);
        let macs = [2u64, 3, 10];
        for macs in [Some(&macs[..]), None] {
            for p in [0.8, 0.9, 0.95, 0.97, 0.985, 0.99, 0.996] {
                let cal = |target| {
                    let opts = Options { target, min_support: 20, ..Options::default() };
                    calibrate(&m.meta, &Policy::defaults(&m.meta), &[], &scores, macs, &opts).unwrap()
                };
                let prec = cal(Target::Precision(p));
                let d = ((prec.final_accuracy - prec.accuracy) * 100.0).max(0.0) + 1e-9;
                let drop = cal(Target::AccuracyDrop(d));
                assert!(
                    drop.accuracy >= drop.final_accuracy - d / 100.0 - 1e-12,
                    "p={p}: accuracy-drop={d} keeps its allowance: {} vs {}",
                    drop.accuracy,
                    drop.final_accuracy
                );
                assert!(
                    drop.macs_per_sample <= prec.macs_per_sample + 1e-9,
                    "p={p} macs={macs:?}: accuracy-drop={d:.3} spends {:.4} MACs/sample at {:.4}, precision {:.4} at {:.4}",
                    drop.macs_per_sample,
                    drop.accuracy,
                    prec.macs_per_sample,
                    prec.accuracy
                );
            }
        }
    }

    #[test]
    fn classes_only_drops_a_class_that_misses_the_target() {
        // tiny3's E2 answers every class at entropy < 0.9: class (y+1)%4 answers for the 44
        // wrong samples; with the thresholds kept, classes that leave wrongly are gated off.
        let c =
            run(Options { target: Target::Precision(0.95), min_support: 1, classes_only: true, ..Options::default() });
        assert_eq!(c.exits[0].threshold, Some(0.5));
        assert!(c.exits[1].allowed.iter().any(|a| !a), "{:?}", c.exits[1].allowed);
        let m = tiny3();
        let file = c.policy_file(&m.meta, 3);
        assert!(file.exits[1].classes.is_some());
        Policy::resolve(&m.meta, &file).expect("the written policy is valid for the model");
    }

    #[test]
    fn per_class_thresholds_keep_each_class_precise_where_one_threshold_cannot() {
        // E1 is a bag exit for class 2 alone: per class is the same as per exit (k = 44).
        // At E2 the 56 samples left are: class 0 right on 8 (even 44..58), class 2 right on 8
        // (odd 45..59) and wrong on sample 99 at the largest entropy, class 1 right on 39, no
        // class 3. One threshold for E2 lets all 56 go (55/56 ≥ 0.95); per class, class 2 is
        // 8/9 < 0.95 with sample 99 in, so its threshold stops below it and sample 99 goes on.
        let opts = Options { target: Target::Precision(0.95), min_support: 5, per_class: true, ..Options::default() };
        let c = run(opts);
        assert_eq!((c.exits[0].exited, c.exits[0].correct), (44, 42));
        assert_eq!((c.exits[1].exited, c.exits[1].correct), (55, 55));
        assert_eq!((c.exits[2].exited, c.exits[2].correct), (1, 1));
        let e2 = &c.exits[1];
        assert_eq!(e2.threshold, None, "only classes with thresholds of their own leave");
        let t2 = e2.class_thresholds[2].unwrap();
        assert!(t2 > 0.45 && t2 < 0.85, "class 2 stops between sample 59 and sample 99: {t2}");
        assert!(e2.class_thresholds[1].unwrap() > 0.84, "class 1 is right on all its samples");
        assert_eq!(e2.allowed, vec![true, true, true, false]);
        let note = e2.note.as_deref().unwrap();
        assert!(note.contains("classes [3]") && note.contains("--min-support 5"), "{note}");

        // The policy written serves exactly this: class thresholds, no exit threshold, E2
        // enabled; and it reads back through TOML.
        let m = tiny3();
        let file = c.policy_file(&m.meta, 2);
        assert!(!file.exits[1].disabled);
        let back = PolicyFile::from_toml(&file.to_toml().unwrap()).unwrap();
        assert_eq!(back, file);
        let rules = Policy::resolve(&m.meta, &back).unwrap().rules;
        assert!(rules[1].can_exit());
        for k in 0..3u32 {
            assert_eq!(rules[1].threshold_of(k), e2.class_thresholds[k as usize], "class {k}");
        }
        assert!(!rules[1].allowed[3]);

        // With more support asked, classes 0 and 2 (8 samples each) may not leave at E2.
        let c = run(Options { min_support: 10, ..opts });
        assert_eq!(c.exits[1].allowed, vec![false, true, false, false]);
        assert_eq!(c.exits[1].exited, 39);
    }

    #[test]
    fn per_class_goes_with_a_precision_target_only() {
        let bad = Options { target: Target::AccuracyDrop(1.0), per_class: true, ..Options::default() };
        assert!(bad.check().unwrap_err().to_string().contains("--per-class goes with a precision target"));
        let both = Options { per_class: true, classes_only: true, ..Options::default() };
        assert!(both.check().unwrap_err().to_string().contains("exclude each other"));
    }

    #[test]
    fn the_policy_file_round_trips_through_toml_and_the_policy_reader() {
        let c = run(Options { target: Target::Precision(0.95), min_support: 10, ..Options::default() });
        let m = tiny3();
        let file = c.policy_file(&m.meta, 7);
        let text = file.to_toml().unwrap();
        let back = PolicyFile::from_toml(&text).unwrap();
        assert_eq!(back, file);
        let p = Policy::resolve(&m.meta, &back).unwrap();
        assert_eq!(p.version, 7);
        assert_eq!(p.rules[0].threshold, c.exits[0].threshold, "the f32 threshold survives the text");
    }
}

#[cfg(test)]
mod assignment {
    use super::*;
    use crate::model::tests::fixture;
    use crate::model::Model;

    fn plain() -> Model {
        let cuts = vec!["cut1".to_string(), "cut2".to_string()];
        Model::load_plain(&fixture("tiny3-plain.onnx"), &cuts, &["exit1", "exit2", "exit3"].map(String::from)).unwrap()
    }

    /// 4 classes, 50 samples each, on tiny3-plain's 3 exits. Class 0 is predicted right and
    /// surely at E1 and E2. Class 1 is predicted as 1 at both early exits, but so is class 3,
    /// so "1" is right half the time there: only the last exit can answer it. Class 2 is
    /// predicted as 3 early (wrong). The last exit answers everything right.
    fn scores() -> Scores {
        let mut s = Scores::default();
        for i in 0..200u32 {
            let y = i % 4;
            let early = match y {
                0 => Some((0.1, Some(0))),
                1 | 3 => Some((0.2, Some(1))),
                _ => Some((0.3, Some(3))),
            };
            s.labels.push(y);
            s.last.push(Some(y));
            if s.exits.is_empty() {
                s.exits = vec![Vec::new(); 3];
            }
            s.exits[0].push(early);
            s.exits[1].push(early);
            s.exits[2].push(Some((0.1, Some(y))));
        }
        s
    }

    #[test]
    fn the_separable_class_goes_to_the_first_exit_and_the_others_to_none() {
        let m = plain();
        let opts = Options { target: Target::Precision(0.95), ..Options::default() };
        let a = assign(&m.meta, &scores(), Some(&[10, 20, 40]), &[0.25; 4], &opts).unwrap();
        assert_eq!(a.new_classes, vec![vec![0], vec![]]);
        assert_eq!(a.assign_string(), "0;");
        // Class 0 leaves at E1 (cost 10); the rest at E3 (cost 70): 0.25 * 10 + 0.75 * 70.
        assert!((a.expected_cost - 55.0).abs() < 1e-9, "{}", a.expected_cost);
        assert_eq!(a.calibration.class_exits[1], vec![0, 0, 50]);
        // A prior with no class-0 traffic finds nothing worth assigning.
        let none = assign(&m.meta, &scores(), Some(&[10, 20, 40]), &[0.0, 0.5, 0.25, 0.25], &opts).unwrap();
        assert_eq!(none.expected_cost, 70.0);
        // The paper's kind of fixed assignment, evaluated the same way, for comparison.
        let fixed =
            evaluate_assignment(&m.meta, &scores(), Some(&[10, 20, 40]), &[0.25; 4], &[vec![1], vec![0]], &opts)
                .unwrap();
        assert!(fixed.expected_cost > a.expected_cost);
        assert_eq!(parse_assignment("1;0", 2, 4).unwrap(), vec![vec![1], vec![0]]);
        assert!(parse_assignment("1;1", 2, 4).unwrap_err().to_string().contains("given twice"));
    }

    #[test]
    fn bag_exits_cannot_be_reassigned() {
        let m = crate::model::tests::tiny3();
        let e = assign(&m.meta, &Scores::default(), None, &[0.25; 4], &Options::default()).unwrap_err().to_string();
        assert!(e.contains("bag-of-classes exit") && e.contains("BranchyNet"), "{e}");
    }
}
