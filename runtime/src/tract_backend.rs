//! tract, the pure-Rust engine, as an [`Engine`]: nothing to install or ship, and it runs where
//! ONNX Runtime cannot load (glibc 2.27 on JetPack 4.6).
//!
//! Each graph is parsed, its input given a symbolic batch dimension `N` with the sample shape
//! the graph declares, optimised once (operator fusion, packed weights, kernels chosen for the
//! CPU) and kept with one run state, so that its scratch memory is reused from batch to batch
//! whatever the batch size.

use std::sync::OnceLock;

use prost::Message;
use tract_onnx::prelude::*;

use crate::backend::{Engine, Graph, Tensor};
use crate::error::{Error, Result};
use crate::onnx;

/// tract as an [`Engine`].
#[derive(Debug, Clone, Copy)]
pub struct TractEngine;

impl TractEngine {
    /// Sets the process's thread pool for tract's kernels, once: `threads` workers (0: one per
    /// core; 1: the calling thread only).
    pub fn new(threads: usize) -> TractEngine {
        static POOL: OnceLock<usize> = OnceLock::new();
        POOL.get_or_init(|| {
            let n = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
            if n > 1 {
                multithread::set_default_executor(multithread::Executor::multithread_with_name(n, "classynet-tract"));
            }
            n
        });
        TractEngine
    }
}

impl Engine for TractEngine {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn compile(&self, proto: &onnx::ModelProto) -> Result<Box<dyn Graph>> {
        Ok(Box::new(TractGraph::new(proto)?))
    }
}

/// One optimised tract plan and its reusable run state.
pub struct TractGraph {
    state: TypedSimpleState,
    outputs: Vec<String>,
}

fn be(context: &str) -> impl Fn(TractError) -> Error + '_ {
    // `{:#}` keeps anyhow's chain of causes: the operator and node that failed are in it.
    move |e| Error::Backend(format!("tract: {context}: {e:#}"))
}

impl TractGraph {
    /// Parses, types and optimises `proto` for any batch size.
    pub fn new(proto: &onnx::ModelProto) -> Result<TractGraph> {
        let graph = proto.graph.as_ref().ok_or_else(|| Error::Backend("tract: the model has no graph".into()))?;
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
        let input = graph
            .input
            .iter()
            .find(|i| !initializers.contains(i.name()))
            .ok_or_else(|| Error::Backend("tract: the graph has no input".into()))?;
        let sample = sample_dims(input)?;
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name().to_string()).collect();

        let bytes = proto.encode_to_vec();
        let mut model = tract_onnx::onnx().model_for_read(&mut bytes.as_slice()).map_err(be("reading the model"))?;
        refuse_unimplemented(&model)?;
        let batch = model.symbols.sym("N");
        let shape: TVec<TDim> = std::iter::once(TDim::from(batch)).chain(sample.iter().map(|&d| d.into())).collect();
        model = model
            .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .map_err(be("setting the input shape"))?;
        let plan = model
            .into_optimized()
            .map_err(be("optimising the model"))?
            .into_runnable()
            .map_err(be("planning the model"))?;
        let state = plan.spawn().map_err(be("preparing a run"))?;
        Ok(TractGraph { state, outputs })
    }
}

/// The per-sample dimensions of a graph input (everything after the batch), which must be fixed.
fn sample_dims(input: &onnx::ValueInfoProto) -> Result<Vec<usize>> {
    use onnx::tensor_shape_proto::dimension::Value;
    let dims = input
        .r#type
        .as_ref()
        .and_then(|t| match &t.value {
            Some(onnx::type_proto::Value::TensorType(tt)) => tt.shape.as_ref(),
            _ => None,
        })
        .map(|s| &s.dim[..])
        .ok_or_else(|| Error::Backend(format!("tract: input `{}` declares no shape", input.name())))?;
    dims.iter()
        .skip(1)
        .map(|d| match d.value {
            Some(Value::DimValue(v)) if v > 0 => Ok(v as usize),
            _ => Err(Error::Backend(format!(
                "tract: input `{}` needs fixed dimensions after the batch, found {:?}",
                input.name(),
                d.value
            ))),
        })
        .collect()
}

/// tract reads operators it lacks as placeholders and fails much later with a generic message;
/// name them up front instead, with the way out.
fn refuse_unimplemented(model: &InferenceModel) -> Result<()> {
    let missing: Vec<String> = model
        .nodes()
        .iter()
        .filter_map(|n| {
            let op = n.op.name();
            op.strip_prefix("Unimplemented(")
                .and_then(|s| s.strip_suffix(')'))
                .map(|op_type| format!("{op_type} (node `{}`)", n.name))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Backend(format!(
        "tract does not implement the operator(s) {}; run this model with --backend ort",
        missing.join(", ")
    )))
}

impl Graph for TractGraph {
    fn output_names(&self) -> &[String] {
        &self.outputs
    }

    fn run(&mut self, input: &Tensor) -> Result<Vec<Tensor>> {
        let x = tract_onnx::prelude::Tensor::from_shape(&input.shape, &input.data).map_err(be("building the input"))?;
        let outs = self.state.run(tvec!(x.into_tvalue())).map_err(be("running the model"))?;
        outs.iter()
            .map(|v| {
                let view = v.to_plain_array_view::<f32>().map_err(be("reading an output"))?;
                Ok(Tensor { shape: view.shape().to_vec(), data: view.iter().copied().collect() })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto, ValueInfoProto};

    fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
        let dim = |&v: &i64| tensor_shape_proto::Dimension {
            value: Some(if v < 0 {
                tensor_shape_proto::dimension::Value::DimParam("N".into())
            } else {
                tensor_shape_proto::dimension::Value::DimValue(v)
            }),
            ..Default::default()
        };
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1), // FLOAT
                    shape: Some(TensorShapeProto { dim: dims.iter().map(dim).collect() }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// x [N, 3] → `op` → y [N, 3], opset 17.
    fn one_node(op: &str) -> onnx::ModelProto {
        onnx::ModelProto {
            ir_version: Some(8),
            opset_import: vec![onnx::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(onnx::GraphProto {
                name: Some("one".into()),
                node: vec![onnx::NodeProto {
                    input: vec!["x".into()],
                    output: vec!["y".into()],
                    name: Some("the_node".into()),
                    op_type: Some(op.into()),
                    ..Default::default()
                }],
                input: vec![value("x", &[-1, 3])],
                output: vec![value("y", &[-1, 3])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn runs_any_batch_size_on_one_plan() {
        let mut g = TractEngine::new(1).compile(&one_node("Relu")).unwrap();
        assert_eq!(g.output_names(), ["y"]);
        for n in [1, 4, 2] {
            let x = Tensor::new(vec![n, 3], (0..3 * n).map(|i| i as f32 - 3.0).collect()).unwrap();
            let y = g.run(&x).unwrap().remove(0);
            assert_eq!(y.shape, vec![n, 3]);
            assert_eq!(y.data, x.data.iter().map(|v| v.max(0.0)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_missing_operator_is_named_with_the_way_out() {
        let e =
            TractEngine::new(1).compile(&one_node("ClassyNetNoSuchOp")).err().expect("unknown operator").to_string();
        assert!(e.contains("ClassyNetNoSuchOp (node `the_node`)") && e.contains("--backend ort"), "{e}");
    }

    #[test]
    fn a_sample_shape_that_is_not_fixed_is_refused() {
        let mut m = one_node("Relu");
        m.graph.as_mut().unwrap().input = vec![value("x", &[-1, -1])];
        let e = TractEngine::new(1).compile(&m).err().expect("symbolic sample shape").to_string();
        assert!(e.contains("needs fixed dimensions after the batch"), "{e}");
    }
}
