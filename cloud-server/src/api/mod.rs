//! The gRPC services: the Open Inference Protocol (`inference`) and the control service for
//! edges (`control`).

pub(crate) mod control;
pub(crate) mod inference;

use std::sync::Arc;

use tonic::Status;

use crate::cloud::Cloud;

/// Filled once the model is loaded and warm; until then every call but health is UNAVAILABLE.
pub(crate) type Slot = Arc<std::sync::OnceLock<Arc<Cloud>>>;

pub(crate) fn loaded(slot: &Slot) -> Result<&Arc<Cloud>, Status> {
    slot.get().ok_or_else(|| Status::unavailable("cloud-server is warming up: the model is still loading"))
}
