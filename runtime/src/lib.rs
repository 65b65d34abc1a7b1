//! Core of the ClassyNet split-inference runtime.
//!
//! Owns everything that does not depend on how samples arrive: the model format ([`format`],
//! [`model`]), cutting a graph into per-exit segments and partitions ([`partition`]), what a
//! partition costs in memory ([`planner`]), the class-aware exit rule and policy ([`exit`]) and
//! its thresholds chosen on data ([`calibrate`]), the
//! backend seam with its ONNX Runtime implementation ([`backend`], `ort_backend` behind the
//! default `ort` feature), the
//! segmented runner and its dedicated thread ([`runner`], [`worker`]), the per-batch choice of
//! the cut (`--partition auto`: [`split`]) and dataset readers ([`dataset`]).
//!
//! It knows nothing of gRPC, edges, servers or command lines: the `classynet` tool (crate
//! `classynet-cli`), `edge-agent` and `cloud-server` build on it. The optional `clap` feature
//! only lets their flags parse the core's option enums.

pub mod backend;
pub mod calibrate;
pub mod dataset;
pub mod engine;
pub mod error;
pub mod exit;
pub mod format;
pub mod model;
/// ONNX IR messages (`onnx.ModelProto` and friends), generated from `proto/onnx/onnx.proto`.
#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
#[cfg(feature = "ort")]
pub mod ort_backend;
pub mod partition;
pub mod planner;
pub mod report;
pub mod runner;
pub mod split;
#[cfg(feature = "tract")]
pub mod tract_backend;
pub mod worker;

pub use error::{Error, Result};
