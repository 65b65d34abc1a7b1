//! Protocol buffer types of the ClassyNet runtime.
//!
//! Owns the generated code only: [`onnx`] is the ONNX IR (models are read, cut into partitions and
//! written back with it); [`inference`] is the Open Inference Protocol (KServe v2) gRPC API that
//! edge-agent and cloud-server serve and that the edge uses to forward to the cloud;
//! [`control`] is this project's control service (policy stream, partition download). It knows
//! nothing of partitions, exits or serving logic.

/// ONNX IR messages (`onnx.ModelProto` and friends), generated from `onnx/onnx.proto`.
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// Open Inference Protocol v2 (`inference.GRPCInferenceService`), client and server.
#[allow(clippy::all, missing_docs)]
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

/// `classynet.v1.Control`: exit policies pushed to edges, partitions streamed to them.
#[allow(clippy::all, missing_docs)]
pub mod control {
    include!(concat!(env!("OUT_DIR"), "/classynet.v1.rs"));
}
