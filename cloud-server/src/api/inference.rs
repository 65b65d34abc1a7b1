//! `inference.GRPCInferenceService`: health, metadata and ModelInfer on image batches or
//! forwarded cuts.

use classynet_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use classynet_proto::inference::*;
use classynet_serving::codec;
use classynet_serving::request;
use classynet_serving::telemetry;
use tonic::{Request, Response, Status};

use crate::api::{loaded, Slot};

pub(crate) struct InferenceApi(pub(crate) Slot);

#[tonic::async_trait]
impl GrpcInferenceService for InferenceApi {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }
    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.0.get().is_some() }))
    }
    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = r.get_ref();
        Ok(Response::new(ModelReadyResponse {
            ready: self.0.get().is_some_and(|c| request::check_model(&r.name, &r.version, &c.name).is_ok()),
        }))
    }
    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(codec::server_metadata("classynet-cloud-server")))
    }
    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let c = loaded(&self.0)?;
        Ok(Response::new(codec::model_metadata(&c.model, &c.name, &r.get_ref().name, &r.get_ref().version)?))
    }
    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let c = loaded(&self.0)?;
        let deadline = request::deadline(r.metadata(), r.get_ref());
        // The edge's trace context: one forwarded batch is one trace across both sides.
        let trace = r.metadata().get("traceparent").and_then(|v| v.to_str().ok()).and_then(telemetry::trace_id);
        let span = tracing::info_span!("model_infer", trace_id = trace.unwrap_or(""));
        let out = tracing::Instrument::instrument(c.infer(r.into_inner(), deadline), span).await;
        metrics::counter!(telemetry::REQUESTS, "side" => "cloud", "outcome" => if out.is_ok() { "ok" } else { "error" })
            .increment(1);
        out.map(Response::new).map_err(Status::from)
    }
}
