//! The class-aware exit engine (Algorithm 1 of the ClassyNet paper), vectorised over a batch,
//! and the runtime exit policy that configures it.
//!
//! At exit m a sample leaves when: its logits are all finite, the exit is enabled, the Shannon
//! entropy (nats) of the softmax is strictly below the threshold T_m, the argmax is not the
//! bag-of-classes logit, and the argmax class is in the exit's allowed set. The last exit always
//! answers. Ties in the argmax go to the lowest logit index.
//!
//! The policy is what the cloud pushes to edges at run time: per exit a threshold (or
//! disabled), the allowed classes, and optionally a threshold per class (class-specific early
//! exits, CS-EE: the threshold the entropy is held to is that of the top class). For a bag exit the allowed classes must be among those it
//! was trained for; for a plain exit any subset of all classes is fine, which turns any
//! class-agnostic early-exit model into a class-aware one without retraining.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::ModelMeta;

/// The decision rule of one exit, resolved from model defaults and a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitRule {
    /// `E1`..`EM`.
    pub name: String,
    /// Index of the exit in the model.
    pub index: usize,
    /// Class id of each logit; `None` marks the bag logit.
    pub class_of: Vec<Option<u32>>,
    /// Per class id: may this exit answer it early?
    pub allowed: Vec<bool>,
    /// Entropy threshold in nats; `None` when the exit is disabled.
    pub threshold: Option<f32>,
    /// Per class id: a threshold of its own that replaces `threshold` when that class is the top
    /// one (`None`: the exit's threshold applies). Empty when no class has one.
    pub class_thresholds: Vec<Option<f32>>,
    /// The last exit answers every sample that reaches it.
    pub last: bool,
}

/// What happened to one sample at one exit.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Answered here.
    Exit(Answer),
    /// Goes on to the next segment.
    Continue,
    /// Could not be answered (non-finite logits at the last exit).
    Failed(String),
}

/// An answered sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    /// Class id in the model's class list.
    pub class: u32,
    /// Index of the exit that answered (0-based).
    pub exit: usize,
    /// Shannon entropy of the exit's softmax, in nats.
    pub entropy: f32,
    /// Softmax probability of the answered logit.
    pub probability: f32,
}

impl ExitRule {
    /// Number of logits this exit produces.
    pub fn width(&self) -> usize {
        self.class_of.len()
    }

    /// Whether any sample can leave here: the last exit, or an exit with at least one allowed
    /// class that has a threshold.
    pub fn can_exit(&self) -> bool {
        self.last || (0..self.allowed.len()).any(|c| self.allowed[c] && self.threshold_of(c as u32).is_some())
    }

    /// The entropy threshold a sample whose top class is `class` is held to: the class's own
    /// threshold where the policy gives one, else the exit's; `None` when it cannot leave.
    pub fn threshold_of(&self, class: u32) -> Option<f32> {
        self.class_thresholds.get(class as usize).copied().flatten().or(self.threshold)
    }

    /// The best answer this exit can give a sample regardless of threshold and allowed classes:
    /// the most probable real class (never the bag). Used when a sample cannot go deeper (the
    /// edge lost its cloud). `None` for non-finite logits.
    pub fn fallback(&self, row: &[f32]) -> Option<Answer> {
        if row.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut probs = vec![0f32; row.len()];
        let entropy = softmax_entropy(row, &mut probs);
        let i = argmax(&probs, |i| self.class_of[i].is_some());
        Some(Answer { class: self.class_of[i]?, exit: self.index, entropy, probability: probs[i] })
    }

    /// What the exit rule sees of one row, whatever the threshold: the entropy (nats) and the
    /// class of the top logit (`None` when the bag logit wins). `None` for non-finite logits,
    /// which never leave early. Calibration scores samples with this so that it chooses
    /// thresholds for exactly the rule that [`ExitRule::decide`] applies.
    pub fn score(&self, row: &[f32]) -> Option<(f32, Option<u32>)> {
        if row.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut probs = vec![0f32; row.len()];
        let entropy = softmax_entropy(row, &mut probs);
        Some((entropy, self.class_of[argmax(&probs, |_| true)]))
    }

    /// Decides every sample of a `[n, width]` logits block (row-major).
    pub fn decide(&self, logits: &[f32]) -> Vec<Outcome> {
        let w = self.width();
        assert_eq!(logits.len() % w, 0, "logits block is a whole number of rows (checked by the runner)");
        let mut probs = vec![0f32; w];
        logits.chunks_exact(w).map(|row| self.decide_row(row, &mut probs)).collect()
    }

    fn decide_row(&self, row: &[f32], probs: &mut [f32]) -> Outcome {
        if row.iter().any(|v| !v.is_finite()) {
            return if self.last {
                Outcome::Failed(format!("exit {} produced non-finite logits {row:?}", self.name))
            } else {
                Outcome::Continue
            };
        }
        let entropy = softmax_entropy(row, probs);
        let top = argmax(probs, |_| true);
        let top_class = self.class_of[top];
        if self.last {
            // The last exit must answer. If it is itself a bag exit and the bag wins, the best
            // real class is the answer.
            let i = if top_class.is_some() { top } else { argmax(probs, |i| self.class_of[i].is_some()) };
            return Outcome::Exit(Answer {
                class: self.class_of[i].expect("a last exit has at least one real class"),
                exit: self.index,
                entropy,
                probability: probs[i],
            });
        }
        let confident = top_class.and_then(|c| self.threshold_of(c)).is_some_and(|t| entropy < t);
        match top_class {
            Some(c) if confident && self.allowed[c as usize] => {
                Outcome::Exit(Answer { class: c, exit: self.index, entropy, probability: probs[top] })
            }
            _ => Outcome::Continue,
        }
    }
}

/// Softmax of `z` into `p` (numerically stable); returns the entropy in nats.
pub fn softmax_entropy(z: &[f32], p: &mut [f32]) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (pi, &zi) in p.iter_mut().zip(z) {
        *pi = (zi - max).exp();
        sum += *pi;
    }
    // H = -sum p ln p = ln(sum) - sum(e_i * (z_i - max)) / sum, computed without log(0).
    let mut weighted = 0f32;
    for (pi, &zi) in p.iter_mut().zip(z) {
        weighted += *pi * (zi - max);
        *pi /= sum;
    }
    (sum.ln() - weighted / sum).max(0.0)
}

/// First index of the largest value among those `keep` accepts.
fn argmax(p: &[f32], keep: impl Fn(usize) -> bool) -> usize {
    let mut best = usize::MAX;
    for (i, &v) in p.iter().enumerate() {
        if keep(i) && (best == usize::MAX || v > p[best]) {
            best = i;
        }
    }
    best
}

/// A policy document as a person writes it (JSON).
///
/// ```json
/// {"version": 3, "exits": [{"name": "E1", "threshold": 0.3, "classes": [9]},
///                          {"name": "E2", "disabled": true}]}
/// ```
/// Exits not listed keep the model's defaults; a listed exit without `classes` keeps its trained
/// classes, and without `threshold` its default threshold. `class_thresholds` gives classes
/// thresholds of their own (keys are class names or ids), as class-specific early exits do:
///
/// ```json
/// {"version": 4, "exits": [{"name": "E1", "classes": [8, 9], "class_thresholds": {"8": 0.02, "Ankle boot": 0.3}}]}
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Increases with every change; edges report which version answered.
    pub version: u64,
    #[serde(default)]
    pub exits: Vec<ExitPolicy>,
}

/// The policy of one exit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExitPolicy {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Class ids or class names allowed to exit here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<ClassRef>>,
    /// Thresholds of single classes (key: class name or id), replacing `threshold` for a sample
    /// whose top class it is. Each class must be allowed here.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub class_thresholds: std::collections::BTreeMap<String, f32>,
}

/// A class given by id or by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ClassRef {
    Id(usize),
    Name(String),
}

/// The resolved rules of every exit of a model, with the policy version they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// 0 for the model's defaults.
    pub version: u64,
    pub rules: Vec<ExitRule>,
}

impl PolicyFile {
    /// Parses a policy file's JSON, naming the offending key on error.
    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            Error::Policy(format!("at `{path}`: {}", e.into_inner()))
        })
    }

    /// The policy as TOML, in the form [`PolicyFile::from_toml`] reads back.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Policy(format!("writing TOML: {e}")))
    }

    /// Parses a policy file's TOML.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Policy(e.to_string()))
    }

    /// Reads a policy file: JSON when its name ends in `.json`, TOML when it ends in `.toml`, and
    /// otherwise JSON when it starts with `{` and TOML when it does not. The one reader of policy
    /// files, used by `classynet run` and `cloud-server` alike.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        let json = match ext.as_deref() {
            Some("json") => true,
            Some("toml") => false,
            _ => text.trim_start().starts_with('{'),
        };
        let parsed = if json { PolicyFile::from_json(&text) } else { PolicyFile::from_toml(&text) };
        parsed.map_err(|e| match e {
            Error::Policy(m) => Error::Policy(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}

impl Policy {
    /// The model's own defaults: exported thresholds and trained class sets.
    pub fn defaults(meta: &ModelMeta) -> Policy {
        Policy::resolve(meta, &PolicyFile::default()).expect("model defaults always form a valid policy")
    }

    /// Applies `file` over the model's defaults, validating it against the model.
    pub fn resolve(meta: &ModelMeta, file: &PolicyFile) -> Result<Policy> {
        let k = meta.num_classes();
        let m = meta.exits.len();
        let mut rules: Vec<ExitRule> = meta
            .exits
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let class_of = if e.bag {
                    e.classes.iter().map(|&c| Some(c as u32)).chain([None]).collect()
                } else {
                    (0..k as u32).map(Some).collect()
                };
                let mut allowed = vec![false; k];
                for &c in &e.classes {
                    allowed[c] = true;
                }
                ExitRule {
                    name: e.name.clone(),
                    index: i,
                    class_of,
                    allowed,
                    threshold: e.threshold,
                    class_thresholds: Vec::new(),
                    last: i + 1 == m,
                }
            })
            .collect();
        let mut seen = vec![false; m];
        for p in &file.exits {
            let i = meta.exit_index(&p.name)?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(Error::Policy(format!("exit {} is listed twice", p.name)));
            }
            let exit = &meta.exits[i];
            let rule = &mut rules[i];
            if rule.last
                && (p.disabled || p.threshold.is_some() || p.classes.is_some() || !p.class_thresholds.is_empty())
            {
                return Err(Error::Policy(format!(
                    "{} is the last exit: it answers every sample that reaches it, so it takes no threshold, \
                     classes, class thresholds or disabled flag",
                    p.name
                )));
            }
            match (p.disabled, p.threshold) {
                (true, Some(_)) => {
                    return Err(Error::Policy(format!("exit {} is both disabled and given a threshold", p.name)))
                }
                (true, None) => rule.threshold = None,
                (false, Some(t)) if !(t.is_finite() && t >= 0.0) => {
                    return Err(Error::Policy(format!(
                        "exit {} threshold must be a non-negative number of nats, found {t}",
                        p.name
                    )))
                }
                (false, Some(t)) => rule.threshold = Some(t),
                (false, None) => {}
            }
            if p.disabled && !p.class_thresholds.is_empty() {
                return Err(Error::Policy(format!("exit {} is both disabled and given class thresholds", p.name)));
            }
            if let Some(classes) = &p.classes {
                let mut allowed = vec![false; k];
                for c in classes {
                    let id = class_id(meta, &p.name, c)?;
                    if exit.bag && !exit.classes.contains(&id) {
                        let trained: Vec<String> = exit.classes.iter().map(|&c| meta.class_label(c)).collect();
                        return Err(Error::Policy(format!(
                            "exit {} is a bag-of-classes exit trained for {{{}}}; it cannot answer {}",
                            p.name,
                            trained.join(", "),
                            meta.class_label(id)
                        )));
                    }
                    allowed[id] = true;
                }
                rule.allowed = allowed;
            }
            if !p.class_thresholds.is_empty() {
                let mut own = vec![None; k];
                for (key, &t) in &p.class_thresholds {
                    // A key is a class name, or else an id written as a string (JSON and TOML keys
                    // are strings).
                    let c = match meta.classes.iter().position(|c| c == key) {
                        Some(id) => ClassRef::Id(id),
                        None => key.trim().parse::<usize>().map(ClassRef::Id).unwrap_or(ClassRef::Name(key.clone())),
                    };
                    let id = class_id(meta, &p.name, &c)?;
                    if !(t.is_finite() && t >= 0.0) {
                        return Err(Error::Policy(format!(
                            "exit {} threshold of class {} must be a non-negative number of nats, found {t}",
                            p.name,
                            meta.class_label(id)
                        )));
                    }
                    if !rule.allowed[id] {
                        return Err(Error::Policy(format!(
                            "exit {} gives class {} a threshold but does not allow it (allowed: {}); list it in `classes`",
                            p.name,
                            meta.class_label(id),
                            allowed_labels(meta, &rule.allowed)
                        )));
                    }
                    own[id] = Some(t);
                }
                rule.class_thresholds = own;
            }
        }
        Ok(Policy { version: file.version, rules })
    }
}

/// The id of a class a policy names for exit `exit`, or an error that says what the model has.
fn class_id(meta: &ModelMeta, exit: &str, c: &ClassRef) -> Result<usize> {
    let k = meta.num_classes();
    match c {
        ClassRef::Id(id) if *id < k => Ok(*id),
        ClassRef::Id(id) => {
            Err(Error::Policy(format!("exit {exit} names class {id}, but the model has {k} classes (0..{})", k - 1)))
        }
        ClassRef::Name(n) => meta.classes.iter().position(|c| c == n).ok_or_else(|| {
            Error::Policy(format!(
                "exit {exit} names class {n:?}, which is not a class of this model ({})",
                meta.classes.join(", ")
            ))
        }),
    }
}

fn allowed_labels(meta: &ModelMeta, allowed: &[bool]) -> String {
    let v: Vec<String> = (0..allowed.len()).filter(|&c| allowed[c]).map(|c| meta.class_label(c)).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ModelMeta {
        ModelMeta::from_json(
            &serde_json::json!({
                "format_version": 1,
                "classes": ["a", "b", "c"],
                "input": {"shape": [1, 2, 2], "mean": [0.0], "std": [1.0]},
                "exits": [
                    {"name": "E1", "logits": "o1", "cut": "c1", "classes": [1], "bag": true, "threshold": 0.5},
                    {"name": "E2", "logits": "o2", "cut": "c2", "classes": [0, 1, 2], "bag": false, "threshold": 0.5},
                    {"name": "E3", "logits": "o3", "cut": null, "classes": [0, 1, 2], "bag": false, "threshold": null}
                ]
            })
            .to_string(),
        )
        .unwrap()
    }

    fn rules(policy: serde_json::Value) -> Result<Vec<ExitRule>> {
        let file: PolicyFile = PolicyFile::from_json(&policy.to_string())?;
        Ok(Policy::resolve(&meta(), &file)?.rules)
    }

    fn answer(o: &Outcome) -> (u32, usize) {
        match o {
            Outcome::Exit(a) => (a.class, a.exit),
            other => panic!("expected an exit, got {other:?}"),
        }
    }

    #[test]
    fn entropy_is_in_nats() {
        let mut p = [0.0; 4];
        let h = softmax_entropy(&[1.0, 1.0, 1.0, 1.0], &mut p);
        assert!((h - 4f32.ln()).abs() < 1e-6 && p.iter().all(|&x| (x - 0.25).abs() < 1e-7));
        let h = softmax_entropy(&[100.0, 0.0], &mut [0.0; 2]);
        assert!((0.0..1e-6).contains(&h), "{h}");
    }

    #[test]
    fn a_confident_allowed_class_exits_at_a_bag_exit() {
        let r = &Policy::defaults(&meta()).rules[0];
        // Logit 0 is class 1 (the exit's only trained class), logit 1 the bag.
        let out = r.decide(&[8.0, 0.0, /* second sample: the bag wins */ 0.0, 8.0]);
        assert_eq!(answer(&out[0]), (1, 0));
        match &out[0] {
            Outcome::Exit(a) => assert!(a.probability > 0.99 && a.entropy < 0.01),
            _ => unreachable!(),
        }
        assert_eq!(out[1], Outcome::Continue, "a sample whose argmax is the bag never exits");
    }

    #[test]
    fn uncertain_samples_continue_and_the_threshold_is_strict() {
        let r = &Policy::defaults(&meta()).rules[1];
        let out = r.decide(&[1.0, 1.0, 1.0]); // entropy ln 3 > 0.5
        assert_eq!(out[0], Outcome::Continue);
        // Exactly at the threshold does not exit: e < T_m.
        let mut p = [0.0; 3];
        let z = [4.0, 0.0, 0.0];
        let h = softmax_entropy(&z, &mut p);
        let mut at = r.clone();
        at.threshold = Some(h);
        assert_eq!(at.decide(&z)[0], Outcome::Continue);
        at.threshold = Some(h + 1e-4);
        assert_eq!(answer(&at.decide(&z)[0]), (0, 1));
    }

    #[test]
    fn a_class_not_allowed_continues_even_when_confident() {
        let r = rules(serde_json::json!({"version": 2, "exits": [{"name": "E2", "classes": ["c"]}]})).unwrap();
        let out = r[1].decide(&[9.0, 0.0, 0.0, /* */ 0.0, 0.0, 9.0]);
        assert_eq!(out[0], Outcome::Continue, "class a is not allowed at E2 by the policy");
        assert_eq!(answer(&out[1]), (2, 1));
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        let mut r = Policy::defaults(&meta()).rules[1].clone();
        r.threshold = Some(10.0);
        assert_eq!(answer(&r.decide(&[5.0, 5.0, 0.0])[0]), (0, 1));
        let last = &Policy::defaults(&meta()).rules[2];
        assert_eq!(answer(&last.decide(&[0.0, 3.0, 3.0])[0]), (1, 2));
    }

    #[test]
    fn non_finite_logits_never_exit_early_and_fail_at_the_last_exit() {
        let mut r = Policy::defaults(&meta()).rules[1].clone();
        r.threshold = Some(10.0);
        assert_eq!(r.decide(&[f32::NAN, 9.0, 0.0])[0], Outcome::Continue);
        assert_eq!(r.decide(&[f32::INFINITY, 0.0, 0.0])[0], Outcome::Continue);
        let last = &Policy::defaults(&meta()).rules[2];
        let out = last.decide(&[f32::NAN, 1.0, 0.0, /* */ 0.0, 2.0, 0.0]);
        assert!(matches!(&out[0], Outcome::Failed(m) if m.contains("E3") && m.contains("non-finite")), "{out:?}");
        assert_eq!(answer(&out[1]), (1, 2), "one bad sample does not spoil its batch");
    }

    #[test]
    fn the_last_exit_always_answers() {
        let last = &Policy::defaults(&meta()).rules[2];
        assert!(last.threshold.is_none());
        assert_eq!(answer(&last.decide(&[1.0, 1.1, 1.0])[0]), (1, 2)); // high entropy, still answers
                                                                       // A bag logit at the last exit is skipped in favour of the best real class.
        let bag_last = ExitRule {
            name: "E9".into(),
            index: 8,
            class_of: vec![Some(2), None],
            allowed: vec![false, false, true],
            threshold: None,
            class_thresholds: Vec::new(),
            last: true,
        };
        assert_eq!(answer(&bag_last.decide(&[0.0, 5.0])[0]), (2, 8));
    }

    #[test]
    fn a_disabled_exit_never_answers() {
        let r = rules(serde_json::json!({"version": 1, "exits": [{"name": "E1", "disabled": true}]})).unwrap();
        assert_eq!(r[0].decide(&[50.0, 0.0])[0], Outcome::Continue);
    }

    #[test]
    fn plain_exits_become_class_aware_by_policy() {
        let r = rules(serde_json::json!({"version": 4, "exits": [{"name": "E2", "threshold": 2.0, "classes": [1]}]}))
            .unwrap();
        assert_eq!(r[1].allowed, vec![false, true, false]);
        assert_eq!(r[1].threshold, Some(2.0));
        assert_eq!(answer(&r[1].decide(&[0.0, 6.0, 0.0])[0]), (1, 1));
        assert_eq!(r[1].decide(&[6.0, 0.0, 0.0])[0], Outcome::Continue);
    }

    #[test]
    fn a_class_threshold_replaces_the_exit_threshold_for_its_class_only() {
        // E2 is plain: classes a, b, c. Class c gets a strict threshold of its own, b a loose one.
        let r = rules(serde_json::json!({"version": 5, "exits": [
            {"name": "E2", "threshold": 0.5, "class_thresholds": {"c": 0.01, "1": 2.0}}]}))
        .unwrap();
        assert_eq!(r[1].class_thresholds, vec![None, Some(2.0), Some(0.01)]);
        let mut p = [0.0; 3];
        let z = [0.0, 0.0, 4.0]; // class c, entropy about 0.07: under 0.5, over c's own 0.01
        assert!((0.01..0.5).contains(&softmax_entropy(&z, &mut p)));
        assert_eq!(r[1].decide(&z)[0], Outcome::Continue, "c is held to its own threshold");
        assert_eq!(answer(&r[1].decide(&[4.0, 0.0, 0.0])[0]), (0, 1), "a keeps the exit's threshold");
        // Entropy ln 3 · 0.9 or so: above the exit's 0.5, below b's own 2.0.
        assert_eq!(answer(&r[1].decide(&[0.0, 0.5, 0.0])[0]), (1, 1));
        // An exit with no threshold of its own answers only the classes that have one.
        let r = rules(serde_json::json!({"version": 5, "exits": [
            {"name": "E2", "disabled": false, "classes": [0, 2], "class_thresholds": {"0": 0.5}}]}))
        .unwrap();
        let mut plain = r[1].clone();
        plain.threshold = None;
        assert!(plain.can_exit());
        assert_eq!(answer(&plain.decide(&[4.0, 0.0, 0.0])[0]), (0, 1));
        assert_eq!(plain.decide(&[0.0, 0.0, 9.0])[0], Outcome::Continue);
        plain.class_thresholds = vec![None; 3];
        assert!(!plain.can_exit());
    }

    #[test]
    fn class_thresholds_round_trip_through_toml_and_refuse_what_cannot_work() {
        let file = PolicyFile::from_json(
            r#"{"version": 2, "exits": [{"name": "E2", "classes": ["b", "c"], "class_thresholds": {"b": 0.3, "2": 0.1}}]}"#,
        )
        .unwrap();
        let back = PolicyFile::from_toml(&file.to_toml().unwrap()).unwrap();
        assert_eq!(back, file);
        let err = |v: serde_json::Value| rules(v).unwrap_err().to_string();
        let e = err(
            serde_json::json!({"version": 1, "exits": [{"name": "E2", "classes": [1], "class_thresholds": {"a": 0.2}}]}),
        );
        assert!(
            e.contains("gives class a (0) a threshold but does not allow it") && e.contains("allowed: b (1)"),
            "{e}"
        );
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2", "class_thresholds": {"zebra": 0.2}}]}));
        assert!(e.contains("\"zebra\"") && e.contains("a, b, c"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2", "class_thresholds": {"5": 0.2}}]}));
        assert!(e.contains("class 5") && e.contains("3 classes"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2", "class_thresholds": {"b": -1.0}}]}));
        assert!(e.contains("class b (1)") && e.contains("non-negative"), "{e}");
        let e = err(
            serde_json::json!({"version": 1, "exits": [{"name": "E2", "disabled": true, "class_thresholds": {"b": 1.0}}]}),
        );
        assert!(e.contains("both disabled and given class thresholds"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E3", "class_thresholds": {"b": 1.0}}]}));
        assert!(e.contains("last exit"), "{e}");
        // A bag exit answers only its trained classes, with or without thresholds of their own.
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E1", "class_thresholds": {"a": 1.0}}]}));
        assert!(e.contains("does not allow it") && e.contains("allowed: b (1)"), "{e}");
    }

    #[test]
    fn invalid_policies_say_what_is_wrong() {
        let err = |v: serde_json::Value| rules(v).unwrap_err().to_string();
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E1", "classes": [2]}]}));
        assert!(e.contains("bag-of-classes exit trained for {b (1)}") && e.contains("c (2)"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E9"}]}));
        assert!(e.contains("exit E9 is not in this model (exits E1..E3)"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E3", "disabled": true}]}));
        assert!(e.contains("last exit"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2", "classes": [7]}]}));
        assert!(e.contains("class 7") && e.contains("3 classes"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2", "classes": ["zebra"]}]}));
        assert!(e.contains("\"zebra\""), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2", "threshold": -0.1}]}));
        assert!(e.contains("non-negative"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2", "treshold": 0.1}]}));
        assert!(e.contains("exits[0]") && e.contains("unknown field `treshold`"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2"}, {"name": "E2"}]}));
        assert!(e.contains("twice"), "{e}");
        let e = err(serde_json::json!({"version": 1, "exits": [{"name": "E2", "disabled": true, "threshold": 1.0}]}));
        assert!(e.contains("both disabled"), "{e}");
        let e = err(serde_json::json!({"exits": []}));
        assert!(e.contains("missing field `version`"), "{e}");
    }

    #[test]
    fn one_reader_gives_the_same_policy_from_toml_and_json_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("p.toml");
        let json_path = dir.path().join("p.json");
        std::fs::write(
            &toml_path,
            "version = 3\n[[exits]]\nname = \"E1\"\nthreshold = 0.3\nclasses = [1]\n[[exits]]\nname = \"E2\"\ndisabled = true\n",
        )
        .unwrap();
        std::fs::write(
            &json_path,
            r#"{"version": 3, "exits": [{"name": "E1", "threshold": 0.3, "classes": [1]}, {"name": "E2", "disabled": true}]}"#,
        )
        .unwrap();
        let (t, j) = (PolicyFile::load(&toml_path).unwrap(), PolicyFile::load(&json_path).unwrap());
        assert_eq!(t, j);
        assert_eq!(Policy::resolve(&meta(), &t).unwrap(), Policy::resolve(&meta(), &j).unwrap());
        std::fs::write(&toml_path, "version = 1\nthreshold = 0.2\n").unwrap();
        let e = PolicyFile::load(&toml_path).unwrap_err().to_string();
        assert!(e.contains("p.toml") && e.contains("unknown field `threshold`"), "{e}");
        std::fs::write(&json_path, r#"{"version": 1, "exits": [{"name": "E1", "treshold": 0.2}]}"#).unwrap();
        let e = PolicyFile::load(&json_path).unwrap_err().to_string();
        assert!(e.contains("p.json") && e.contains("unknown field `treshold`"), "{e}");
    }
}
