//! tract, the pure-Rust engine, as an [`Engine`]: nothing to install or ship, and it runs where
//! ONNX Runtime cannot load (glibc 2.27 on JetPack 4.6).
//!
//! Each graph is parsed, its input given a symbolic batch dimension `N` with the sample shape
//! the graph declares, and optimised (operator fusion, packed weights, kernels chosen for the
//! CPU) into a plan for any batch size. The batch sizes the caller runs most (see
//! [`Engine::compile_for`]) get a plan of their own with `N` fixed: tract then knows every
//! shape and picks its kernels for them, which measured 1.8× faster at batch 1 and 1.1× at
//! batch 16 on the ResNet-110 zoo model (same outputs to 1e-6). Each plan keeps one run state,
//! so that its scratch memory is reused from batch to batch.

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

    fn compile_for(&self, proto: &onnx::ModelProto, batches: &[usize]) -> Result<Box<dyn Graph>> {
        Ok(Box::new(TractGraph::new(proto, batches)?))
    }
}

/// Optimised tract plans, each with its reusable run state: one for any batch size and one per
/// batch size asked for.
pub struct TractGraph {
    any: TypedSimpleState,
    fixed: Vec<(usize, TypedSimpleState)>,
    outputs: Vec<String>,
}

fn be(context: &str) -> impl Fn(TractError) -> Error + '_ {
    // `{:#}` keeps anyhow's chain of causes: the operator and node that failed are in it.
    move |e| Error::Backend(format!("tract: {context}: {e:#}"))
}

impl TractGraph {
    /// Parses, types and optimises `proto` for any batch size, and once more for each of
    /// `batches` with the batch fixed.
    pub fn new(proto: &onnx::ModelProto, batches: &[usize]) -> Result<TractGraph> {
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
        let shape: TVec<TDim> =
            std::iter::once(TDim::from(batch.clone())).chain(sample.iter().map(|&d| d.into())).collect();
        model = model
            .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .map_err(be("setting the input shape"))?;
        // Typed and decluttered once; each plan is optimised from it (optimisation is what
        // depends on the shapes).
        let typed = model
            .into_typed()
            .map_err(be("typing the model"))?
            .into_decluttered()
            .map_err(be("simplifying the model"))?;
        let mut fixed: Vec<(usize, TypedSimpleState)> = Vec::new();
        for &b in batches {
            if b == 0 || fixed.iter().any(|(have, _)| *have == b) {
                continue;
            }
            let subs = std::collections::HashMap::from([(batch.clone(), TDim::from(b as i64))]);
            let concrete = typed.set_symbols(&subs).map_err(be("fixing the batch size"))?;
            fixed.push((b, spawn(concrete)?));
        }
        Ok(TractGraph { any: spawn(typed)?, fixed, outputs })
    }
}

/// Optimises a typed model into a plan and prepares its run state.
fn spawn(typed: TypedModel) -> Result<TypedSimpleState> {
    typed
        .into_optimized()
        .map_err(be("optimising the model"))?
        .into_runnable()
        .map_err(be("planning the model"))?
        .spawn()
        .map_err(be("preparing a run"))
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
        let n = input.shape.first().copied().unwrap_or(0);
        let state = match self.fixed.iter_mut().find(|(b, _)| *b == n) {
            Some((_, state)) => state,
            None => &mut self.any,
        };
        let outs = state.run(tvec!(x.into_tvalue())).map_err(be("running the model"))?;
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
    fn plans_for_fixed_batches_answer_like_the_plan_for_any_batch() {
        let m = one_node("Softmax");
        let mut any = TractEngine::new(1).compile(&m).unwrap();
        let mut fixed = TractGraph::new(&m, &[1, 4, 4, 0]).unwrap();
        // One plan per distinct size asked for; 0 is no batch size.
        assert_eq!(fixed.fixed.iter().map(|(b, _)| *b).collect::<Vec<_>>(), [1, 4]);
        // Sizes with a plan of their own and sizes without both run, with the same answers.
        for n in [1, 4, 2, 7] {
            let x = Tensor::new(vec![n, 3], (0..3 * n).map(|i| (i % 5) as f32 * 0.7 - 1.0).collect()).unwrap();
            let (a, f) = (any.run(&x).unwrap().remove(0), fixed.run(&x).unwrap().remove(0));
            assert_eq!(f.shape, vec![n, 3]);
            assert_eq!(a.shape, f.shape);
            for (u, v) in a.data.iter().zip(&f.data) {
                assert!((u - v).abs() <= 1e-6, "batch {n}: {u} against {v}");
            }
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
