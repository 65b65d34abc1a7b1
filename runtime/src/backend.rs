//! The inference backend seam: run one segment on a batch, report its tensors.
//!
//! Batching, compaction and exit decisions are written against [`Backend`] only, so they are
//! tested with a fake and another engine can be added beside ONNX Runtime
//! ([`crate::ort_backend`]). Backends are driven from one dedicated thread each
//! ([`crate::worker`]), never from async tasks.

use std::ops::Range;

use crate::error::{Error, Result};

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
