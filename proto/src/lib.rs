//! Protocol buffer types of the ClassyNet runtime.
//!
//! Owns the generated code only: [`onnx`] is the ONNX IR (models are read, cut into partitions and
//! written back with it). It knows nothing of partitions, exits or serving; those live in
//! `classynet-runtime`. The gRPC wire protocol between edge and cloud is added here by the
//! split-execution work.

/// ONNX IR messages (`onnx.ModelProto` and friends), generated from `onnx/onnx.proto`.
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
