//! The inference backend seam: run one segment on a batch, report its tensors.
//!
//! Batching, compaction and exit decisions are written against [`Backend`] only, so they are
//! tested with a fake. Engines plug in one level lower: an [`Engine`] compiles ONNX graphs into
//! [`Graph`]s, and [`EngineBackend`] turns any engine into a [`Backend`] (one graph per group of
//! segments). ONNX Runtime ([`crate::ort_backend`]) and tract ([`crate::tract_backend`]) are
//! the two engines; [`crate::engine`] picks one. Backends are driven from one dedicated thread
//! each ([`crate::worker`]), never from async tasks.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::onnx;
use crate::partition::{extract, segments, Logits, Segment};

/// A dense float32 tensor, row-major.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Builds a tensor, checking that `data` fills `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor> {
        let want: usize = shape.iter().product();
        if want != data.len() {
            return Err(Error::Input(format!("tensor of shape {shape:?} needs {want} values, found {}", data.len())));
        }
        Ok(Tensor { shape, data })
    }

    /// Number of samples (the leading dimension).
    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Values per sample.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The samples at `rows`, in that order: the batch compaction between segments.
    pub fn gather(&self, rows: &[usize]) -> Tensor {
        let w = self.row_len();
        let mut data = Vec::with_capacity(rows.len() * w);
        for &r in rows {
            data.extend_from_slice(&self.data[r * w..(r + 1) * w]);
        }
        let mut shape = self.shape.clone();
        shape[0] = rows.len();
        Tensor { shape, data }
    }
}

/// What one segment produced for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentOutput {
    /// `[n, width]` logits of the segment's exit.
    pub logits: Tensor,
    /// The cut tensor for the next segment; `None` after the last exit.
    pub cut: Option<Tensor>,
}

/// Runs the segments of one model (or partition) on batches.
///
/// Segments count from 0 within what the backend holds (the first segment of a tail is 0).
/// The runner hands over *groups*: consecutive segments with no enabled exit between them run
/// as one unit, because nothing can leave at a disabled exit and a boundary costs time (layout
/// conversions, unfused operators at the seam). Implementations own their sessions and are
/// used from a single thread; they need not be `Sync`.
pub trait Backend: Send {
    /// Number of segments this backend can run.
    fn num_segments(&self) -> usize;

    /// Called before the first batch and whenever the exit policy changes, with the groups
    /// that [`Backend::run_group`] will be asked for. A backend may build what they need here
    /// and drop what they no longer need.
    fn prepare(&mut self, groups: &[Range<usize>]) -> Result<()>;

    /// Runs the segments of `group` (one of the prepared groups) on `input` (`[n, ...]`,
    /// n ≥ 1): the logits of the group's last exit and the cut after its last segment.
    fn run_group(&mut self, group: Range<usize>, input: &Tensor) -> Result<SegmentOutput>;
}

/// One compiled graph of an engine: a whole model, a partition, or a group of segments. Used
/// from one thread at a time.
pub trait Graph: Send {
    /// Output names, in the order [`Graph::run`] returns them.
    fn output_names(&self) -> &[String];

    /// Runs the graph on one float32 tensor (`[n, ...]`, any n ≥ 1).
    fn run(&mut self, input: &Tensor) -> Result<Vec<Tensor>>;
}

/// An inference engine: compiles ONNX graphs into runnable [`Graph`]s.
pub trait Engine: Send + Sync {
    /// The engine's name, as `--backend` spells it.
    fn name(&self) -> &'static str;

    /// Compiles a graph with one float32 input whose first dimension is the batch.
    fn compile(&self, proto: &onnx::ModelProto) -> Result<Box<dyn Graph>> {
        self.compile_for(proto, &[])
    }

    /// [`Engine::compile`], told the batch sizes the caller will run most (the batcher's full
    /// batch, and 1 for a lone sample): an engine that plans for fixed shapes (tract) builds a
    /// plan for each of them as well as one for any size. Every batch size still runs.
    fn compile_for(&self, proto: &onnx::ModelProto, batches: &[usize]) -> Result<Box<dyn Graph>>;
}

/// A [`Backend`] over any [`Engine`]: one compiled graph per group of segments the runner asks
/// for, built from the partitioner's graphs. Graphs follow the policy: [`Backend::prepare`]
/// builds the groups a new policy needs and drops the others, so the weights are held once.
pub struct EngineBackend {
    engine: Arc<dyn Engine>,
    model: Model,
    segments: Vec<Segment>,
    graphs: HashMap<Range<usize>, Box<dyn Graph>>,
    batches: Vec<usize>,
}

impl EngineBackend {
    /// Cuts `model` into its segments; graphs are compiled by [`Backend::prepare`].
    pub fn new(engine: Arc<dyn Engine>, model: &Model) -> Result<EngineBackend> {
        let segments = segments(model)?;
        Ok(EngineBackend { engine, model: model.clone(), segments, graphs: HashMap::new(), batches: Vec::new() })
    }

    /// The batch sizes to plan every group for (see [`Engine::compile_for`]).
    pub fn with_batches(mut self, batches: &[usize]) -> EngineBackend {
        self.batches = batches.to_vec();
        self
    }

    /// The engine's name.
    pub fn engine(&self) -> &'static str {
        self.engine.name()
    }
}

impl Backend for EngineBackend {
    fn num_segments(&self) -> usize {
        self.segments.len()
    }

    fn prepare(&mut self, groups: &[Range<usize>]) -> Result<()> {
        let mut next = HashMap::new();
        for g in groups {
            let graph = match self.graphs.remove(g) {
                Some(graph) => graph,
                None => {
                    let segs = &self.segments[g.clone()];
                    let name =
                        format!("{}-E{}..E{}", self.model.name(), segs[0].exit + 1, segs[segs.len() - 1].exit + 1);
                    self.engine.compile_for(&extract(&self.model, segs, Logits::Last, None, &name), &self.batches)?
                }
            };
            next.insert(g.clone(), graph);
        }
        self.graphs = next;
        Ok(())
    }

    fn run_group(&mut self, group: Range<usize>, input: &Tensor) -> Result<SegmentOutput> {
        let graph = self
            .graphs
            .get_mut(&group)
            .ok_or_else(|| Error::Backend(format!("segments {group:?} were not prepared")))?;
        let mut outs = graph.run(input)?.into_iter();
        let logits = outs.next().ok_or_else(|| Error::Backend("segment produced no logits".into()))?;
        Ok(SegmentOutput { logits, cut: outs.next() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_keeps_the_chosen_rows_in_order() {
        let t = Tensor::new(vec![3, 2], vec![0., 1., 10., 11., 20., 21.]).unwrap();
        let g = t.gather(&[2, 0]);
        assert_eq!(g.shape, vec![2, 2]);
        assert_eq!(g.data, vec![20., 21., 0., 1.]);
        assert!(Tensor::new(vec![2, 2], vec![1.0]).unwrap_err().to_string().contains("needs 4 values, found 1"));
    }
}
