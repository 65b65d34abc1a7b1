//! The exit partitioner: cuts a model's graph into per-exit segments and writes standalone ONNX
//! files for a head (segments 1..=k, run on the edge) and a tail (segments k+1..=M).
//!
//! Segment m holds exactly the nodes and initializers needed to compute exit m's logits and
//! cut m from cut m-1 (or from the model input). A graph whose cut does not separate it (a tensor
//! computed before the cut is still needed after it, like a skip link around the cut) is
//! rejected with the tensor that crosses, because running such a split would need more than
//! the cut on the wire.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use crate::onnx;

use crate::error::{Error, Result};
use crate::format::{PartitionInfo, PartitionRole, METADATA_KEY};
use crate::model::{parse_partition, Model};

/// The nodes and initializers of one exit's segment.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Index of the exit this segment ends in (0-based; exit `E{exit+1}`).
    pub exit: usize,
    /// Tensor the segment starts from: the model input or the previous cut.
    pub input: String,
    /// Graph output holding the exit's logits.
    pub logits: String,
    /// Tensor handed to the next segment; `None` after the last exit.
    pub cut: Option<String>,
    /// Node indices into the graph, in graph (topological) order.
    pub nodes: Vec<usize>,
    /// Initializer indices into the graph.
    pub initializers: Vec<usize>,
}

/// Splits the exits present in `model` into segments.
pub fn segments(model: &Model) -> Result<Vec<Segment>> {
    let g = model.graph();
    let producer: HashMap<&str, usize> =
        g.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
    let init_index: HashMap<&str, usize> = g.initializer.iter().enumerate().map(|(i, t)| (t.name(), i)).collect();
    let mut taken: HashMap<usize, usize> = HashMap::new(); // node -> exit of the segment that owns it
    let mut out = Vec::new();
    for i in model.present.clone() {
        let e = &model.meta.exits[i];
        let input = if i == model.present.start {
            model.input_name.clone()
        } else {
            model.meta.exits[i - 1].cut.clone().expect("metadata validation: every exit but the last has a cut")
        };
        let mut want: Vec<&str> = vec![e.logits.as_str()];
        want.extend(e.cut.as_deref());
        let mut nodes = HashSet::new();
        let mut inits = HashSet::new();
        let mut stack: Vec<&str> = want.clone();
        let mut seen: HashSet<&str> = HashSet::new();
        while let Some(t) = stack.pop() {
            if t.is_empty() || t == input || !seen.insert(t) {
                continue; // "" is ONNX's marker for an omitted optional input
            }
            if let Some(&ix) = init_index.get(t) {
                inits.insert(ix);
            } else if let Some(&n) = producer.get(t) {
                if let Some(&owner) = taken.get(&n) {
                    return Err(Error::Partition(format!(
                        "{}: cut `{input}` does not separate the graph: exit {} needs tensor `{t}`, which is computed \
                         before the cut (in segment {}); choose a cut that every later path goes through",
                        model.origin, e.name, model.meta.exits[owner].name
                    )));
                }
                nodes.insert(n);
                stack.extend(node_inputs(&g.node[n]));
            } else if t == model.input_name {
                return Err(Error::Partition(format!(
                    "{}: exit {} needs the model input `{t}` directly, but its segment starts at cut `{input}`; the cut \
                     does not separate the graph",
                    model.origin, e.name
                )));
            } else {
                return Err(Error::Partition(format!(
                    "{}: tensor `{t}` needed by exit {} is neither produced by a node nor an initializer",
                    model.origin, e.name
                )));
            }
        }
        for &n in &nodes {
            taken.insert(n, i);
        }
        let mut nodes: Vec<usize> = nodes.into_iter().collect();
        nodes.sort_unstable();
        let mut initializers: Vec<usize> = inits.into_iter().collect();
        initializers.sort_unstable();
        out.push(Segment { exit: i, input, logits: e.logits.clone(), cut: e.cut.clone(), nodes, initializers });
    }
    Ok(out)
}

/// Inputs a node reads, including outer-scope names its subgraphs (If, Loop, Scan) refer to.
fn node_inputs(node: &onnx::NodeProto) -> Vec<&str> {
    let mut v: Vec<&str> = node.input.iter().map(String::as_str).collect();
    for a in &node.attribute {
        for sub in a.g.iter().chain(&a.graphs) {
            v.extend(free_names(sub));
        }
    }
    v
}

/// Names a subgraph uses but does not define.
fn free_names(g: &onnx::GraphProto) -> Vec<&str> {
    let mut defined: HashSet<&str> = g.input.iter().map(|i| i.name()).collect();
    defined.extend(g.initializer.iter().map(|t| t.name()));
    let mut free = Vec::new();
    for n in &g.node {
        for i in node_inputs(n) {
            if !defined.contains(i) {
                free.push(i);
            }
        }
        defined.extend(n.output.iter().map(String::as_str));
    }
    free
}

/// Which side of a cut to write.
pub struct Side {
    pub role: PartitionRole,
    /// Number of exits on the edge (the `k` of `Ek`).
    pub k: usize,
}

impl Side {
    /// Parses `E2` for `role` against a model with `num_exits` exits.
    pub fn parse(partition: &str, role: PartitionRole, num_exits: usize) -> Result<Side> {
        let k = parse_partition(partition, num_exits)?;
        if role == PartitionRole::Tail && k == num_exits {
            return Err(Error::Partition(format!(
                "partition E{k} puts every exit on the edge; it has no tail (choose E1..E{})",
                num_exits - 1
            )));
        }
        Ok(Side { role, k })
    }

    /// Exits this side holds.
    pub fn exits(&self, num_exits: usize) -> Range<usize> {
        match self.role {
            PartitionRole::Head => 0..self.k,
            PartitionRole::Tail => self.k..num_exits,
        }
    }
}

/// Builds the standalone model of one side of partition `Ek` from a full model.
pub fn extract_side(model: &Model, segs: &[Segment], side: &Side) -> Result<onnx::ModelProto> {
    if model.present != (0..model.num_exits()) {
        return Err(Error::Partition(format!("{} is already a partition; cut the full model instead", model.origin)));
    }
    let range = side.exits(model.num_exits());
    let mut meta = model.meta.clone();
    meta.partition = Some(PartitionInfo {
        partition: format!("E{}", side.k),
        role: side.role,
        source_fingerprint: model.fingerprint.clone(),
    });
    let role = match side.role {
        PartitionRole::Head => "head",
        PartitionRole::Tail => "tail",
    };
    let graph_name = format!("{}-{role}-E{}", model.name(), side.k);
    Ok(extract(model, &segs[range], Logits::Every, Some(&meta.to_json()), &graph_name))
}

/// Which exits' logits an extracted graph outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every segment's exit (partition files).
    Every,
    /// Only the last segment's exit; the heads of the others are pruned away (a runner group
    /// whose inner exits are disabled).
    Last,
}

/// Builds a standalone model computing the given consecutive segments (they must come from
/// [`segments`] of `model`). Its input is the first segment's input; its outputs are the exit
/// logits `logits` asks for, then the last segment's cut if it has one. Only nodes and
/// initializers those outputs need are kept. `meta_json` replaces the `classynet` metadata
/// (None drops it, for the runner's internal sessions).
pub fn extract(
    model: &Model,
    segs: &[Segment],
    logits: Logits,
    meta_json: Option<&str>,
    graph_name: &str,
) -> onnx::ModelProto {
    let g = model.graph();
    let first = segs.first().expect("extract is called with at least one segment");
    let last = segs.last().expect("extract is called with at least one segment");
    let mut outputs: Vec<&str> = match logits {
        Logits::Every => segs.iter().map(|s| s.logits.as_str()).collect(),
        Logits::Last => vec![last.logits.as_str()],
    };
    outputs.extend(last.cut.as_deref());

    // Keep the segments' nodes that the outputs depend on (all of them for `Every`).
    let in_segs: HashSet<usize> = segs.iter().flat_map(|s| s.nodes.iter().copied()).collect();
    let producer: HashMap<&str, usize> =
        in_segs.iter().flat_map(|&i| g.node[i].output.iter().map(move |o| (o.as_str(), i))).collect();
    let mut keep: HashSet<usize> = HashSet::new();
    let mut stack: Vec<&str> = outputs.clone();
    while let Some(t) = stack.pop() {
        if let Some(&n) = producer.get(t) {
            if keep.insert(n) {
                stack.extend(node_inputs(&g.node[n]));
            }
        }
    }
    let mut node_ix: Vec<usize> = keep.into_iter().collect();
    node_ix.sort_unstable();
    let nodes: Vec<onnx::NodeProto> = node_ix.iter().map(|&i| g.node[i].clone()).collect();
    let mut used: HashSet<&str> = HashSet::new();
    for n in &nodes {
        used.extend(n.output.iter().map(String::as_str));
        used.extend(node_inputs(n));
    }
    let mut init_ix: Vec<usize> = segs
        .iter()
        .flat_map(|s| s.initializers.iter().copied())
        .filter(|&i| used.contains(g.initializer[i].name()))
        .collect();
    init_ix.sort_unstable();
    init_ix.dedup();

    let declared = |name: &str| -> onnx::ValueInfoProto {
        g.input
            .iter()
            .chain(&g.output)
            .chain(&g.value_info)
            .find(|v| v.name() == name)
            .cloned()
            .unwrap_or_else(|| float_tensor(name))
    };
    let graph = onnx::GraphProto {
        node: nodes.clone(),
        name: Some(graph_name.to_string()),
        initializer: init_ix.iter().map(|&i| g.initializer[i].clone()).collect(),
        sparse_initializer: g.sparse_initializer.iter().filter(|t| used.contains(sparse_name(t))).cloned().collect(),
        doc_string: g.doc_string.clone(),
        input: vec![declared(&first.input)],
        output: outputs.iter().map(|o| declared(o)).collect(),
        value_info: g
            .value_info
            .iter()
            .filter(|v| used.contains(v.name()) && v.name() != first.input && !outputs.contains(&v.name()))
            .cloned()
            .collect(),
        quantization_annotation: g
            .quantization_annotation
            .iter()
            .filter(|q| used.contains(q.tensor_name()))
            .cloned()
            .collect(),
        metadata_props: g.metadata_props.clone(),
    };
    let mut props: Vec<onnx::StringStringEntryProto> =
        model.proto.metadata_props.iter().filter(|p| p.key() != METADATA_KEY).cloned().collect();
    if let Some(json) = meta_json {
        props.push(onnx::StringStringEntryProto { key: Some(METADATA_KEY.into()), value: Some(json.into()) });
    }
    onnx::ModelProto { graph: Some(graph), metadata_props: props, ..model.proto.clone() }
}

fn sparse_name(t: &onnx::SparseTensorProto) -> &str {
    t.values.as_ref().map(|v| v.name()).unwrap_or("")
}

pub(crate) fn float_tensor(name: &str) -> onnx::ValueInfoProto {
    onnx::ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(onnx::type_proto::Tensor {
                elem_type: Some(onnx::tensor_proto::DataType::Float as i32),
                shape: None,
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{fixture, tiny3};
    use prost::Message;

    #[test]
    fn tiny3_has_three_disjoint_segments_covering_the_graph() {
        let m = tiny3();
        let segs = segments(&m).unwrap();
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[0].input, "input");
        assert_eq!(segs[1].input, "cut1");
        assert_eq!(segs[2].input, "cut2");
        assert_eq!(segs[2].cut, None);
        let mut all: Vec<usize> = segs.iter().flat_map(|s| s.nodes.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..m.graph().node.len()).collect::<Vec<_>>());
        // Weights: conv1 w,b + exit1 fc w,b | conv2 w,b + exit2 fc w,b | conv3 w,b.
        assert_eq!(segs.iter().map(|s| s.initializers.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
    }

    #[test]
    fn a_cut_that_a_skip_link_crosses_is_rejected() {
        // conv2_out is computed inside segment 2, but cut2 = relu(conv2_out) + cut1 still needs
        // cut1 after it: cutting at conv2_out would leave the residual link dangling.
        let cuts = vec!["cut1".to_string(), "conv2_out".to_string()];
        let exits: Vec<String> = ["exit1", "exit2", "exit3"].map(String::from).to_vec();
        let m = Model::load_plain(&fixture("tiny3-plain.onnx"), &cuts, &exits).unwrap();
        let e = segments(&m).unwrap_err().to_string();
        assert!(e.contains("cut `conv2_out` does not separate the graph") || e.contains("does not separate"), "{e}");
    }

    #[test]
    fn head_and_tail_files_describe_themselves() {
        let m = tiny3();
        let segs = segments(&m).unwrap();
        let head = extract_side(&m, &segs, &Side::parse("E2", PartitionRole::Head, 3).unwrap()).unwrap();
        let head = Model::from_bytes(&head.encode_to_vec(), "head.onnx").unwrap();
        assert_eq!(head.present, 0..2);
        assert_eq!(head.fingerprint, m.fingerprint);
        let outs: Vec<&str> = head.graph().output.iter().map(|o| o.name()).collect();
        assert_eq!(outs, ["exit1", "exit2", "cut2"]);
        assert_eq!(head.graph().initializer.len(), 8);

        let tail = extract_side(&m, &segs, &Side::parse("E2", PartitionRole::Tail, 3).unwrap()).unwrap();
        let tail = Model::from_bytes(&tail.encode_to_vec(), "tail.onnx").unwrap();
        assert_eq!(tail.present, 2..3);
        assert_eq!(tail.input_name, "cut2");
        assert_eq!(segments(&tail).unwrap().len(), 1);

        let e = Side::parse("E3", PartitionRole::Tail, 3).err().unwrap().to_string();
        assert!(e.contains("no tail"), "{e}");
        let e = extract_side(&head, &segments(&head).unwrap(), &Side::parse("E1", PartitionRole::Head, 3).unwrap());
        assert!(e.unwrap_err().to_string().contains("already a partition"));
    }
}
