//! The ClassyNet model format: the `classynet` JSON stored in an ONNX model's `metadata_props`
//! (see `docs/model-format.md`).
//!
//! Reading is tolerant: keys a newer exporter adds are kept in `extra` and written back
//! unchanged when a partition is saved. Required keys that are missing are reported by their
//! path (`exits[2].logits`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The `metadata_props` key that holds the JSON document.
pub const METADATA_KEY: &str = "classynet";
/// The format version this runtime reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// The whole `classynet` metadata document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelMeta {
    pub format_version: u32,
    /// Human-readable model name; defaults to the file stem when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Class names, indexed by class id.
    pub classes: Vec<String>,
    pub input: InputSpec,
    /// Exits in order, E1 first. The last one is the network's final classifier.
    pub exits: Vec<ExitMeta>,
    /// What the trainer recorded (mode, scheme, backbone, dataset, metrics...). Opaque here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Value>,
    /// Present only in a partition file: which part of the source model it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionInfo>,
    /// Keys this runtime does not know, kept for forward compatibility.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Shape and normalisation of one input sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputSpec {
    /// `[C, H, W]` of one sample; the graph input is `[N, C, H, W]`.
    pub shape: Vec<usize>,
    /// Multiplier applied to raw 8-bit pixels before mean/std (usually 1/255).
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Per-channel mean (one value applies to every channel).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation (one value applies to every channel).
    pub std: Vec<f32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_scale() -> f32 {
    1.0 / 255.0
}

/// The entry of a per-channel list (mean or std) for channel `c`: one entry applies to every
/// channel. The one broadcasting rule of normalisation, for datasets and served pixels alike.
pub fn per_channel(values: &[f32], c: usize) -> f32 {
    if values.len() == 1 {
        values[0]
    } else {
        values[c]
    }
}

impl InputSpec {
    /// Normalises raw 8-bit pixel values of `[n, C, H, W]` samples in place:
    /// `(pixel * scale - mean[c]) / std[c]`, with [`per_channel`]'s broadcasting (the metadata is
    /// validated to hold 1 or C entries).
    pub fn normalise_pixels(&self, data: &mut [f32]) {
        let channels = self.shape[0];
        let plane: usize = self.shape[1..].iter().product();
        if plane == 0 {
            return;
        }
        for (i, chunk) in data.chunks_mut(plane).enumerate() {
            let c = i % channels;
            let (m, sd) = (per_channel(&self.mean, c), per_channel(&self.std, c));
            for v in chunk {
                *v = (*v * self.scale - m) / sd;
            }
        }
    }
}

/// One exit as the trainer exported it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitMeta {
    /// `E1` .. `EM`, in order.
    pub name: String,
    /// Graph output holding this exit's logits.
    pub logits: String,
    /// Backbone tensor after this exit's block, where the graph can be cut; `null` for the last
    /// exit. The key must be present.
    #[serde(deserialize_with = "required_nullable")]
    pub cut: Option<String>,
    /// Class ids this exit was trained to answer (S_m). For a bag exit logit `i` is class
    /// `classes[i]` and the extra last logit is the bag; for a plain exit logit `i` is class `i`.
    pub classes: Vec<usize>,
    /// Bag-of-classes exit: one extra logit standing for "not one of mine, go deeper".
    pub bag: bool,
    /// Default entropy threshold in nats; `null` disables the exit (the last exit ignores it).
    #[serde(deserialize_with = "required_nullable")]
    pub threshold: Option<f32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Written into partition files so a loader knows what it holds and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PartitionInfo {
    /// `E2` for the cut after exit 2.
    pub partition: String,
    /// `head` (model input .. exits 1..=k and cut k) or `tail` (cut k .. exits k+1..=M).
    pub role: PartitionRole,
    /// Fingerprint of the full model the partition was cut from.
    pub source_fingerprint: String,
}

/// Which side of a cut a partition file holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PartitionRole {
    Head,
    Tail,
}

/// `Option` fields that must be present as a key even when their value is `null`.
fn required_nullable<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

impl ModelMeta {
    /// Parses and validates the JSON document (not yet against a graph).
    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let meta: ModelMeta = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                Error::Metadata(format!("`{METADATA_KEY}` JSON: {inner}"))
            } else {
                Error::Metadata(format!("`{METADATA_KEY}` JSON at `{path}`: {inner}"))
            }
        })?;
        meta.validate()?;
        Ok(meta)
    }

    /// Serialises back to JSON, unknown keys included.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("metadata holds only JSON-representable values")
    }

    /// Number of classes K.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Index of the exit named `name`, or an error listing the exits there are.
    pub fn exit_index(&self, name: &str) -> Result<usize> {
        self.exits
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| Error::Policy(format!("exit {name} is not in this model (exits {})", self.exit_range())))
    }

    /// `E1..E7`, for messages.
    pub fn exit_range(&self) -> String {
        format!("E1..E{}", self.exits.len())
    }

    /// Class name with its id, for messages: `Bag (8)`.
    pub fn class_label(&self, id: usize) -> String {
        match self.classes.get(id) {
            Some(n) => format!("{n} ({id})"),
            None => format!("#{id}"),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Metadata(m));
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "format_version {} is not supported (this runtime reads version {FORMAT_VERSION})",
                self.format_version
            ));
        }
        let k = self.classes.len();
        if k < 2 {
            return bad(format!("`classes` must name at least 2 classes, found {k}"));
        }
        let InputSpec { shape, mean, std, scale, .. } = &self.input;
        if shape.len() != 3 || shape.contains(&0) {
            return bad(format!("`input.shape` must be [C, H, W] with positive sizes, found {shape:?}"));
        }
        let c = shape[0];
        for (key, v) in [("mean", mean), ("std", std)] {
            if v.len() != 1 && v.len() != c {
                return bad(format!("`input.{key}` needs 1 or {c} values (one per channel), found {}", v.len()));
            }
        }
        if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || !scale.is_finite() {
            return bad(format!(
                "`input.std` must be positive and `input.scale` finite, found std {std:?}, scale {scale}"
            ));
        }
        let m = self.exits.len();
        if m == 0 {
            return bad("`exits` is empty; a model needs at least its final exit".into());
        }
        for (i, e) in self.exits.iter().enumerate() {
            let want = format!("E{}", i + 1);
            if e.name != want {
                return bad(format!(
                    "exits[{i}].name must be {want} (exits are named E1..EM in order), found {:?}",
                    e.name
                ));
            }
            let last = i + 1 == m;
            match (&e.cut, last) {
                (None, false) => return bad(format!("exit {want} has `cut` null; every exit but the last needs the tensor where the graph is cut after it")),
                (Some(c), true) => return bad(format!("the last exit {want} has `cut` {c:?}; it must be null (nothing follows the last exit)")),
                _ => {}
            }
            if e.classes.is_empty() {
                return bad(format!("exit {want} has an empty `classes` list"));
            }
            let mut seen = vec![false; k];
            for &cl in &e.classes {
                if cl >= k {
                    return bad(format!("exit {want} lists class {cl}, but the model has {k} classes (0..{})", k - 1));
                }
                if std::mem::replace(&mut seen[cl], true) {
                    return bad(format!("exit {want} lists class {cl} twice"));
                }
            }
            if !e.bag && e.classes.len() != k && last {
                return bad(format!(
                    "the last exit {want} is a plain exit and must cover all {k} classes, found {}",
                    e.classes.len()
                ));
            }
            if let Some(t) = e.threshold {
                if !(t.is_finite() && t >= 0.0) {
                    return bad(format!(
                        "exit {want} has threshold {t}; expected a non-negative number of nats or null"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ExitMeta {
    /// Width of the logits output: |S_m| + 1 for a bag exit, K for a plain exit.
    pub fn width(&self, num_classes: usize) -> usize {
        if self.bag {
            self.classes.len() + 1
        } else {
            num_classes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Value {
        serde_json::json!({
            "format_version": 1,
            "classes": ["a", "b", "c"],
            "input": {"shape": [1, 2, 2], "mean": [0.5], "std": [0.5], "future_input_key": 1},
            "exits": [
                {"name": "E1", "logits": "o1", "cut": "c1", "classes": [1], "bag": true, "threshold": 0.3},
                {"name": "E2", "logits": "o2", "cut": null, "classes": [0, 1, 2], "bag": false, "threshold": null}
            ],
            "something_new": {"x": [1, 2]}
        })
    }

    #[test]
    fn unknown_keys_survive_a_round_trip() {
        let meta = ModelMeta::from_json(&sample().to_string()).unwrap();
        assert_eq!(meta.input.scale, 1.0 / 255.0);
        let back: Value = serde_json::from_str(&meta.to_json()).unwrap();
        assert_eq!(back["something_new"], serde_json::json!({"x": [1, 2]}));
        assert_eq!(back["input"]["future_input_key"], 1);
        assert_eq!(ModelMeta::from_json(&meta.to_json()).unwrap(), meta);
    }

    fn error_for(edit: impl FnOnce(&mut Value)) -> String {
        let mut v = sample();
        edit(&mut v);
        ModelMeta::from_json(&v.to_string()).unwrap_err().to_string()
    }

    #[test]
    fn missing_keys_are_named_with_their_path() {
        let e = error_for(|v| {
            v["exits"][1].as_object_mut().unwrap().remove("logits");
        });
        assert!(e.contains("exits[1]") && e.contains("missing field `logits`"), "{e}");
        let e = error_for(|v| {
            v.as_object_mut().unwrap().remove("classes");
        });
        assert!(e.contains("missing field `classes`"), "{e}");
        // `cut` must be present even on the last exit, where it is null.
        let e = error_for(|v| {
            v["exits"][1].as_object_mut().unwrap().remove("cut");
        });
        assert!(e.contains("exits[1]") && e.contains("`cut`"), "{e}");
    }

    #[test]
    fn inconsistent_metadata_is_rejected_with_a_reason() {
        let e = error_for(|v| v["exits"][0]["cut"] = Value::Null);
        assert!(e.contains("exit E1 has `cut` null"), "{e}");
        let e = error_for(|v| v["exits"][0]["classes"] = serde_json::json!([5]));
        assert!(e.contains("class 5") && e.contains("3 classes"), "{e}");
        let e = error_for(|v| v["exits"][0]["name"] = "first".into());
        assert!(e.contains("must be E1"), "{e}");
        let e = error_for(|v| v["format_version"] = 9.into());
        assert!(e.contains("format_version 9"), "{e}");
        let e = error_for(|v| v["input"]["mean"] = serde_json::json!([0.1, 0.2]));
        assert!(e.contains("input.mean") && e.contains("found 2"), "{e}");
        let e = error_for(|v| v["exits"][0]["threshold"] = (-1.0).into());
        assert!(e.contains("threshold -1"), "{e}");
        let e = ModelMeta::from_json("{not json").unwrap_err().to_string();
        assert!(e.starts_with("model metadata"), "{e}");
    }

    #[test]
    fn pixels_are_normalised_per_channel_with_one_entry_broadcast() {
        let spec = |mean: Vec<f32>, std: Vec<f32>| InputSpec {
            shape: vec![3, 1, 2],
            scale: 0.5,
            mean,
            std,
            extra: Default::default(),
        };
        // Two samples of 3 channels × 1×2 pixels.
        let raw: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut data = raw.clone();
        spec(vec![1.0, 2.0, 3.0], vec![1.0, 2.0, 4.0]).normalise_pixels(&mut data);
        for (i, (&v, &p)) in data.iter().zip(&raw).enumerate() {
            let c = (i / 2) % 3;
            let (m, s) = ([1.0, 2.0, 3.0][c], [1.0, 2.0, 4.0][c]);
            assert_eq!(v, (p * 0.5 - m) / s, "element {i}");
        }
        let mut one = raw.clone();
        spec(vec![1.0], vec![2.0]).normalise_pixels(&mut one);
        assert!(one.iter().zip(&raw).all(|(&v, &p)| v == (p * 0.5 - 1.0) / 2.0));
    }
}
