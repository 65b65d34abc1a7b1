//! The local Open Inference Protocol API that cameras and other clients call.

use std::sync::Arc;
use std::time::Duration;

use classynet_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use classynet_proto::inference::*;
use classynet_runtime::backend::Tensor;
use classynet_runtime::runner::SampleResult;
use classynet_serving::batcher::{Origin, Served};
use classynet_serving::codec::{self, string_param, Payload};
use classynet_serving::request::{self, InputSpec};
use classynet_serving::telemetry;
use tonic::{Request, Response, Status};

use crate::Edge;

/// Exit and class names, for metric labels.
pub(crate) struct Names {
    pub(crate) exits: Vec<String>,
    pub(crate) classes: Vec<String>,
}

impl Names {
    /// Counts each answer, and its time to answer, by where it was answered.
    pub(crate) fn count(&self, served: &Served, took: Duration) {
        for (r, o) in served.results.iter().zip(&served.origin) {
            let place = o.label("edge");
            metrics::histogram!(telemetry::ANSWER_SECONDS, "side" => "edge", "where" => place)
                .record(took.as_secs_f64());
            if let SampleResult::Answered(a) = r {
                let exit = self.exits.get(a.exit).cloned().unwrap_or_else(|| format!("E{}", a.exit + 1));
                let class = self.classes.get(a.class as usize).cloned().unwrap_or_else(|| a.class.to_string());
                metrics::counter!(telemetry::ANSWERED, "side" => "edge", "where" => place, "exit" => exit, "class" => class)
                    .increment(1);
            }
        }
    }
}

/// Filled once the head is loaded and warm; until then calls are UNAVAILABLE.
pub(crate) type EdgeSlot = Arc<std::sync::OnceLock<Arc<Edge>>>;

pub(crate) struct LocalApi(pub(crate) EdgeSlot);

impl LocalApi {
    fn edge(&self) -> Result<&Arc<Edge>, Status> {
        self.0.get().ok_or_else(|| Status::unavailable("edge-agent is warming up: the head is still loading"))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for LocalApi {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }
    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        // Ready means what grpc.health.v1 says: the head is loaded and warm.
        Ok(Response::new(ServerReadyResponse { ready: self.0.get().is_some() }))
    }
    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = r.get_ref();
        Ok(Response::new(ModelReadyResponse {
            ready: self.0.get().is_some_and(|e| request::check_model(&r.name, &r.version, e.head.name()).is_ok()),
        }))
    }
    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(codec::server_metadata("classynet-edge-agent")))
    }
    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let head = &self.edge()?.head;
        Ok(Response::new(codec::model_metadata(head, head.name(), &r.get_ref().name, &r.get_ref().version)?))
    }
    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let e = self.edge()?;
        let deadline = request::deadline(r.metadata(), r.get_ref());
        let req = r.into_inner();
        let run = async {
            request::check_envelope(&req, e.head.name())?;
            let what = format!("an image batch of model {}", e.head.name());
            let spec = InputSpec {
                name: "input",
                sample: Some(&e.head.meta.input.shape),
                max_samples: e.batcher.max_queue(),
                pixels: true,
                what: &what,
            };
            let mut decoded = request::decode(&req, &spec)?;
            if decoded.payload == Payload::Pixels {
                codec::normalise(&mut decoded.tensor, &e.head);
            }
            let input = std::mem::replace(&mut decoded.tensor, Tensor { shape: vec![0], data: vec![] });
            let served = decoded.merge(e.infer(input, deadline).await?);
            let resp = codec::answers_response(e.head.name(), &req.id, &served.results, e.policy_version());
            let mut resp = request::select_outputs(&req, resp);
            let degraded: Vec<String> = served
                .origin
                .iter()
                .enumerate()
                .filter(|(_, o)| **o == Origin::Degraded)
                .map(|(i, _)| i.to_string())
                .collect();
            if !degraded.is_empty() {
                resp.parameters.insert("classynet_degraded".into(), string_param(degraded.join(",")));
            }
            Ok::<_, classynet_serving::ServeError>(resp)
        };
        let out = run.await;
        metrics::counter!(telemetry::REQUESTS, "side" => "edge", "outcome" => if out.is_ok() { "ok" } else { "error" })
            .increment(1);
        out.map(Response::new).map_err(Status::from)
    }
}
