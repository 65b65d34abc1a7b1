//! Loading an ONNX early-exit model: decoding the protobuf, reading the `classynet` metadata (or
//! building it for a plain ONNX model from user-given cut and exit names) and checking that the
//! metadata and the graph agree.
//!
//! A [`Model`] is either a full model or a partition file written by the partitioner; `present`
//! says which exits its graph computes.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

use crate::onnx::{self, tensor_shape_proto::dimension, type_proto};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::{ExitMeta, InputSpec, ModelMeta, PartitionRole, FORMAT_VERSION, METADATA_KEY};

/// One loaded model or partition.
#[derive(Debug, Clone)]
pub struct Model {
    /// Where it came from, for messages (a path or `<bytes>`).
    pub origin: String,
    pub proto: onnx::ModelProto,
    pub meta: ModelMeta,
    /// First 16 hex digits of the SHA-256 of the full model's bytes. A partition file carries
    /// its source's fingerprint, so head and tail of one model share it.
    pub fingerprint: String,
    /// Exits whose logits this file computes: `0..M` for a full model, `0..k` for the head of
    /// `Ek`, `k..M` for its tail.
    pub present: Range<usize>,
    /// Name of the graph input: the model input, or for a tail the cut tensor it starts from.
    pub input_name: String,
}

/// A dimension of a tensor shape as the graph declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// A named or unnamed symbolic dimension (the batch axis `N`, usually).
    Symbolic,
}

impl Model {
    /// Reads a model file that carries `classynet` metadata.
    pub fn load(path: &Path) -> Result<Model> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Model::from_bytes(&bytes, &path.display().to_string())
    }

    /// Decodes a model from memory (for example bytes streamed from a server).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Model> {
        let proto = decode(bytes, origin)?;
        let text =
            proto.metadata_props.iter().find(|p| p.key() == METADATA_KEY).map(|p| p.value().to_string()).ok_or_else(
                || {
                    Error::Metadata(format!(
                        "{origin} has no `{METADATA_KEY}` entry in metadata_props; export it with the trainer, or \
                     give --cuts and --exits to split a plain ONNX model"
                    ))
                },
            )?;
        let mut meta = ModelMeta::from_json(&text).map_err(|e| match e {
            Error::Metadata(m) => Error::Metadata(format!("{origin}: {m}")),
            other => other,
        })?;
        if meta.name.is_none() {
            meta.name = Some(stem(origin));
        }
        let fingerprint = match &meta.partition {
            Some(p) => p.source_fingerprint.clone(),
            None => fingerprint(bytes),
        };
        Model::assemble(proto, meta, fingerprint, origin)
    }

    /// Reads a plain ONNX early-exit model without `classynet` metadata. `exit_outputs` are the
    /// graph outputs holding each exit's logits, in exit order; `cuts` the tensor after each
    /// exit's block (one fewer than exits). Every exit is treated as a plain exit over all K
    /// classes (K read from the last exit's output shape) with no default threshold, so nothing
    /// exits early until a policy sets thresholds.
    pub fn load_plain(path: &Path, cuts: &[String], exit_outputs: &[String]) -> Result<Model> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let origin = path.display().to_string();
        let proto = decode(&bytes, &origin)?;
        if exit_outputs.is_empty() {
            return Err(Error::Partition("--exits needs at least one graph output name".into()));
        }
        if cuts.len() + 1 != exit_outputs.len() {
            return Err(Error::Partition(format!(
                "{} exits need {} cut tensors (one after every exit but the last), found {}",
                exit_outputs.len(),
                exit_outputs.len() - 1,
                cuts.len()
            )));
        }
        let graph = graph_of(&proto, &origin)?;
        let input = single_input(graph, &origin)?;
        let in_shape = value_shape(input).unwrap_or_default();
        let sample: Vec<usize> = in_shape
            .iter()
            .skip(1)
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                Dim::Symbolic => None,
            })
            .collect::<Option<Vec<_>>>()
            .filter(|s| s.len() == 3)
            .ok_or_else(|| {
                Error::Input(format!(
                    "{origin}: input `{}` must be [N, C, H, W] with fixed C, H, W, found {}",
                    input.name(),
                    fmt_dims(&in_shape)
                ))
            })?;
        let last = exit_outputs.last().expect("checked non-empty above");
        let k = output_width(graph, last).ok_or_else(|| {
            Error::Partition(format!(
                "cannot tell the number of classes: graph output `{last}` is not an output with a fixed [N, K] shape \
                 (outputs: {})",
                graph.output.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let c = sample[0];
        let exits = exit_outputs
            .iter()
            .enumerate()
            .map(|(i, o)| ExitMeta {
                name: format!("E{}", i + 1),
                logits: o.clone(),
                cut: cuts.get(i).cloned(),
                classes: (0..k).collect(),
                bag: false,
                threshold: None,
                extra: Default::default(),
            })
            .collect();
        let meta = ModelMeta {
            format_version: FORMAT_VERSION,
            name: Some(stem(&origin)),
            classes: (0..k).map(|i| i.to_string()).collect(),
            input: InputSpec {
                shape: sample,
                scale: 1.0,
                mean: vec![0.0; c],
                std: vec![1.0; c],
                extra: Default::default(),
            },
            exits,
            training: None,
            partition: None,
            extra: Default::default(),
        };
        Model::assemble(proto, meta, fingerprint(&bytes), &origin)
    }

    fn assemble(proto: onnx::ModelProto, meta: ModelMeta, fingerprint: String, origin: &str) -> Result<Model> {
        let m = meta.exits.len();
        let present = match &meta.partition {
            None => 0..m,
            Some(p) => {
                let k = parse_partition(&p.partition, m)?;
                match p.role {
                    PartitionRole::Head => 0..k,
                    PartitionRole::Tail => k..m,
                }
            }
        };
        let graph = graph_of(&proto, origin)?;
        let input_name = single_input(graph, origin)?.name().to_string();
        let model = Model { origin: origin.to_string(), proto, meta, fingerprint, present, input_name };
        model.check_graph()?;
        Ok(model)
    }

    /// The graph (present by construction: [`Model`] is only built when it is).
    pub fn graph(&self) -> &onnx::GraphProto {
        self.proto.graph.as_ref().expect("Model is only constructed with a graph")
    }

    /// The model's display name.
    pub fn name(&self) -> &str {
        self.meta.name.as_deref().unwrap_or("model")
    }

    /// Number of exits M of the full model.
    pub fn num_exits(&self) -> usize {
        self.meta.exits.len()
    }

    /// Whether this file is the first part of the network (its input is an image batch).
    pub fn starts_at_input(&self) -> bool {
        self.present.start == 0
    }

    /// The graph's declared shape for tensor `name` (inputs, outputs and value_info).
    pub fn tensor_shape(&self, name: &str) -> Option<Vec<Dim>> {
        let g = self.graph();
        g.input.iter().chain(&g.output).chain(&g.value_info).find(|v| v.name() == name).and_then(value_shape)
    }

    /// Checks that the exits, cuts and input the metadata names are really in the graph.
    fn check_graph(&self) -> Result<()> {
        let g = self.graph();
        let produced: HashSet<&str> = g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
        let outputs: HashSet<&str> = g.output.iter().map(|o| o.name()).collect();
        let k = self.meta.num_classes();
        let o = &self.origin;
        for i in self.present.clone() {
            let e = &self.meta.exits[i];
            if !outputs.contains(e.logits.as_str()) {
                return Err(Error::Partition(format!(
                    "{o}: exit {} logits `{}` is not a graph output (outputs: {})",
                    e.name,
                    e.logits,
                    g.output.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ")
                )));
            }
            let want = e.width(k);
            if let Some(found) = output_width(g, &e.logits) {
                if found != want {
                    let what = if e.bag {
                        format!("{} trained classes + 1 bag logit", e.classes.len())
                    } else {
                        format!("one logit per class, K = {k}")
                    };
                    return Err(Error::Metadata(format!(
                        "{o}: exit {} output `{}` has {found} logits, expected {want} ({what})",
                        e.name, e.logits
                    )));
                }
            }
            if let Some(cut) = &e.cut {
                if !produced.contains(cut.as_str()) && *cut != self.input_name {
                    return Err(Error::Partition(format!(
                        "{o}: cut `{cut}` of exit {} is not a tensor of the graph (no node produces it)",
                        e.name
                    )));
                }
            }
        }
        if self.starts_at_input() {
            let shape = self.tensor_shape(&self.input_name).unwrap_or_default();
            let want = &self.meta.input.shape;
            let ok = shape.len() == 4
                && shape[1..]
                    .iter()
                    .zip(want)
                    .all(|(d, w)| matches!(d, Dim::Fixed(n) if n == w) || *d == Dim::Symbolic);
            if !ok {
                return Err(Error::Metadata(format!(
                    "{o}: graph input `{}` has shape {}, but the metadata says samples are {:?} (expected [N, {}])",
                    self.input_name,
                    fmt_dims(&shape),
                    want,
                    want.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// Parses `E2` (or `e2`) into the number of exits on the edge, 1..=M.
pub fn parse_partition(name: &str, num_exits: usize) -> Result<usize> {
    let k = name.strip_prefix(['E', 'e']).and_then(|d| d.parse::<usize>().ok()).filter(|k| (1..=num_exits).contains(k));
    k.ok_or_else(|| Error::Parse(format!("partition `{name}` is not one of E1..E{num_exits}")))
}

fn decode(bytes: &[u8], origin: &str) -> Result<onnx::ModelProto> {
    if bytes.is_empty() {
        return Err(Error::Onnx { origin: origin.into(), detail: "the file is empty".into() });
    }
    let proto = onnx::ModelProto::decode(bytes).map_err(|e| Error::Onnx {
        origin: origin.into(),
        detail: format!("{e} (the file may be truncated or not an ONNX model; {} bytes read)", bytes.len()),
    })?;
    let graph = graph_of(&proto, origin)?;
    if graph.node.is_empty() {
        return Err(Error::Onnx { origin: origin.into(), detail: "the graph has no nodes".into() });
    }
    for t in &graph.initializer {
        if t.data_location == Some(onnx::tensor_proto::DataLocation::External as i32) {
            return Err(Error::Onnx {
                origin: origin.into(),
                detail: format!(
                    "initializer `{}` keeps its data in an external file; save the model with its weights inside \
                     (onnx.save(..., save_as_external_data=False))",
                    t.name()
                ),
            });
        }
    }
    Ok(proto)
}

fn graph_of<'a>(proto: &'a onnx::ModelProto, origin: &str) -> Result<&'a onnx::GraphProto> {
    proto.graph.as_ref().ok_or_else(|| Error::Onnx { origin: origin.into(), detail: "the model has no graph".into() })
}

/// The one graph input that is not an initializer (old IR versions list weights as inputs too).
fn single_input<'a>(graph: &'a onnx::GraphProto, origin: &str) -> Result<&'a onnx::ValueInfoProto> {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let real: Vec<_> = graph.input.iter().filter(|i| !inits.contains(i.name())).collect();
    match real.as_slice() {
        [one] => Ok(one),
        other => Err(Error::Onnx {
            origin: origin.into(),
            detail: format!(
                "expected exactly one graph input (the image batch), found {}: [{}]",
                other.len(),
                other.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// The declared dims of a value, if it is a tensor with a shape.
pub fn value_shape(v: &onnx::ValueInfoProto) -> Option<Vec<Dim>> {
    let t = match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t,
        _ => return None,
    };
    let shape = t.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(dimension::Value::DimValue(n)) if n >= 0 => Dim::Fixed(n as usize),
                _ => Dim::Symbolic,
            })
            .collect(),
    )
}

/// Width K of a `[N, K]` graph output when K is fixed.
fn output_width(graph: &onnx::GraphProto, name: &str) -> Option<usize> {
    let shape = graph.output.iter().find(|o| o.name() == name).and_then(value_shape)?;
    match shape.as_slice() {
        [_, Dim::Fixed(k)] => Some(*k),
        _ => None,
    }
}

/// `[N, 1, 28, 28]`, for messages.
pub fn fmt_dims(dims: &[Dim]) -> String {
    if dims.is_empty() {
        return "unknown".into();
    }
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => n.to_string(),
            Dim::Symbolic => "N".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// First 16 hex digits of SHA-256: enough to tell models apart in logs and on the wire.
pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn stem(origin: &str) -> String {
    Path::new(origin).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| origin.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
    }

    pub(crate) fn tiny3() -> Model {
        Model::load(&fixture("tiny3.onnx")).unwrap()
    }

    #[test]
    fn tiny3_loads_with_its_exits() {
        let m = tiny3();
        assert_eq!(m.num_exits(), 3);
        assert_eq!(m.present, 0..3);
        assert_eq!(m.input_name, "input");
        assert!(m.meta.exits[0].bag);
        assert_eq!(m.meta.extra["fixture_note"], "unknown keys like this one are kept by readers");
        assert_eq!(m.fingerprint.len(), 16);
    }

    #[test]
    fn corrupt_and_truncated_files_are_reported_as_such() {
        let bytes = std::fs::read(fixture("tiny3.onnx")).unwrap();
        let e = Model::from_bytes(&bytes[..bytes.len() / 2], "half.onnx").unwrap_err().to_string();
        assert!(e.contains("half.onnx is not a readable ONNX model") && e.contains("truncated"), "{e}");
        let e = Model::from_bytes(b"\xff\xff\xff garbage", "junk.onnx").unwrap_err().to_string();
        assert!(e.contains("junk.onnx is not a readable ONNX model"), "{e}");
        let e = Model::from_bytes(&[], "empty.onnx").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn missing_metadata_points_to_the_plain_model_flags() {
        let e = Model::load(&fixture("tiny3-plain.onnx")).unwrap_err().to_string();
        assert!(e.contains("no `classynet` entry") && e.contains("--cuts"), "{e}");
    }

    fn with_meta(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Model> {
        let mut m = tiny3();
        let mut v: serde_json::Value = serde_json::from_str(&m.meta.to_json()).unwrap();
        edit(&mut v);
        let p = m.proto.metadata_props.iter_mut().find(|p| p.key() == METADATA_KEY).unwrap();
        p.value = Some(v.to_string());
        Model::from_bytes(&m.proto.encode_to_vec(), "edited.onnx")
    }

    #[test]
    fn metadata_that_disagrees_with_the_graph_is_rejected() {
        let e = with_meta(|v| v["exits"][1]["cut"] = "no_such_tensor".into()).unwrap_err().to_string();
        assert!(e.contains("cut `no_such_tensor` of exit E2 is not a tensor of the graph"), "{e}");
        let e = with_meta(|v| v["exits"][0]["logits"] = "cut1".into()).unwrap_err().to_string();
        assert!(e.contains("logits `cut1` is not a graph output"), "{e}");
        // A bag exit trained for two classes needs three logits; the graph has two.
        let e = with_meta(|v| v["exits"][0]["classes"] = serde_json::json!([1, 2])).unwrap_err().to_string();
        assert!(e.contains("has 2 logits, expected 3"), "{e}");
        let e = with_meta(|v| v["input"]["shape"] = serde_json::json!([3, 4, 4])).unwrap_err().to_string();
        assert!(e.contains("[N, 1, 4, 4]") && e.contains("[3, 4, 4]"), "{e}");
        let e = with_meta(|v| v["exits"] = serde_json::json!("nope")).unwrap_err().to_string();
        assert!(e.contains("edited.onnx") && e.contains("`exits`"), "{e}");
    }

    #[test]
    fn plain_models_take_cuts_and_exits_from_the_user() {
        let p = fixture("tiny3-plain.onnx");
        let cuts = vec!["cut1".to_string(), "cut2".to_string()];
        let exits: Vec<String> = ["exit1", "exit2", "exit3"].map(String::from).to_vec();
        let m = Model::load_plain(&p, &cuts, &exits).unwrap();
        assert_eq!(m.meta.classes.len(), 4);
        assert!(m.meta.exits.iter().all(|e| !e.bag && e.threshold.is_none()));
        let e = Model::load_plain(&p, &["bogus".into(), "cut2".into()], &exits).unwrap_err().to_string();
        assert!(e.contains("cut `bogus` of exit E1 is not a tensor of the graph"), "{e}");
        let e = Model::load_plain(&p, &cuts[..1], &exits).unwrap_err().to_string();
        assert!(e.contains("3 exits need 2 cut tensors"), "{e}");
        let not_out = vec!["cut1".to_string(), "exit2".to_string(), "exit3".to_string()];
        let e = Model::load_plain(&p, &cuts, &not_out).unwrap_err().to_string();
        assert!(e.contains("exit E1 logits `cut1` is not a graph output"), "{e}");
        // The metadata-carrying tiny3 has a 2-logit bag exit: as a plain model it is refused.
        let e = Model::load_plain(&fixture("tiny3.onnx"), &cuts, &exits).unwrap_err().to_string();
        assert!(e.contains("has 2 logits, expected 4"), "{e}");
    }

    #[test]
    fn partition_names_are_checked() {
        assert_eq!(parse_partition("E2", 3).unwrap(), 2);
        assert_eq!(parse_partition("e3", 3).unwrap(), 3);
        let e = parse_partition("E9", 7).unwrap_err().to_string();
        assert_eq!(e, "partition `E9` is not one of E1..E7");
        assert!(parse_partition("E0", 3).is_err());
        assert!(parse_partition("head", 3).is_err());
    }
}
