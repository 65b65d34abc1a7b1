//! Protocol buffer types of the ClassyNet runtime.
//!
//! Owns the generated gRPC code only: [`inference`] is the Open Inference Protocol (KServe v2) API
//! that edge-agent and cloud-server serve and that the edge uses to forward to the cloud;
//! [`control`] is this project's control service (policy stream, partition download). It knows
//! nothing of partitions, exits or serving logic. (The ONNX IR lives in the core,
//! `classynet_runtime::onnx`, which links no gRPC.)

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
