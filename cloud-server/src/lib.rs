//! The cloud side of the split: loads a ClassyNet model once, prepares the tail after every cut
//! and serves
//! * the Open Inference Protocol (`inference.GRPCInferenceService`): ModelInfer on image batches
//!   (the whole model with its exits) or on forwarded cut tensors (`classynet_cut` = `E2`);
//! * `classynet.v1.Control`: the exit policy stream and partition downloads for edges;
//! * `grpc.health.v1`, SERVING once every tail is loaded and warmed up.
//!
//! Inference runs on one dedicated thread per cut, behind a dynamic batcher per cut.
//!
//! One file per concern: `config` (flags), `cloud` (the model, its tails, their threads and
//! batchers), `api/inference.rs` and `api/control.rs` (the gRPC services), `policy_file` (the
//! live policy file) and `server` (listen, warm up, serve, drain).

mod api;
mod cloud;
mod config;
mod policy_file;
mod server;

pub use cloud::Cloud;
pub use config::{init_logging, Config};
pub use policy_file::read_policy;
pub use server::{run, start, Handle};
