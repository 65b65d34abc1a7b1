//! cloud-server over a real socket on 127.0.0.1:0, driven by a v2 gRPC client.

use clap::Parser;
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use classynet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use classynet_proto::inference::*;
use classynet_runtime::backend::Tensor;
use classynet_runtime::exit::Policy;
use classynet_runtime::format::PartitionRole;
use classynet_runtime::model::Model;
use classynet_runtime::ort_backend::{OrtEngine, OrtGraph, SessionOptions};
use classynet_runtime::partition::{extract_side, segments, Side};
use classynet_runtime::runner::{SampleResult, SegmentedRunner};
use classynet_serving::codec::{self, string_param, PARAM_CUT, PARAM_FINGERPRINT};
use tonic::Code;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/tests/data").join(name)
}

/// The flags a user would give (tests run without CLOUD_SERVER_* variables in the environment).
fn config(model: PathBuf) -> cloud_server::Config {
    cloud_server::Config::parse_from([
        "cloud-server",
        "--model",
        model.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--max-batch",
        "32",
        "--max-delay-ms",
        "1",
        "--max-queue",
        "256",
        "--threads",
        "1",
    ])
}

fn inputs(n: usize, seed: u64) -> Tensor {
    let mut s = seed;
    let data = (0..n * 16)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 8.0
        })
        .collect();
    Tensor::new(vec![n, 1, 4, 4], data).unwrap()
}

fn request(name: &str, t: &Tensor, params: &[(&str, &str)]) -> ModelInferRequest {
    // A forwarded cut travels as input `cut`, an image batch as `input` (as ModelMetadata says).
    let input_name = if params.iter().any(|(k, _)| *k == PARAM_CUT) { "cut" } else { "input" };
    let (input, raw) = codec::encode_tensor(input_name, t, codec::WireDtype::Fp32);
    ModelInferRequest {
        model_name: name.into(),
        id: "req-1".into(),
        parameters: params.iter().map(|(k, v)| (k.to_string(), string_param(*v))).collect(),
        inputs: vec![input],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

fn local_answers(model: &Model, x: &Tensor) -> Vec<(i64, i32)> {
    let mut r = SegmentedRunner::new(
        OrtEngine::backend(model, SessionOptions::default()).unwrap(),
        0,
        &Policy::defaults(&model.meta),
        None,
    )
    .unwrap();
    r.run(x.clone())
        .unwrap()
        .results
        .iter()
        .map(|s| match s {
            SampleResult::Answered(a) => (a.class as i64, a.exit as i32),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_clients_get_the_same_answers_as_the_local_runner() {
    let handle = cloud_server::start(config(fixture("tiny3.onnx"))).await.unwrap();
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", handle.addr)).await.unwrap();
    assert!(client.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let meta =
        client.model_metadata(ModelMetadataRequest { name: "tiny3".into(), version: String::new() }).await.unwrap();
    assert_eq!(meta.get_ref().inputs[0].shape, vec![-1, 1, 4, 4]);
    assert_eq!(
        meta.get_ref().outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
        ["label", "exit", "entropy", "probability"]
    );

    let model = Model::load(&fixture("tiny3.onnx")).unwrap();
    let x = inputs(24, 9);
    let want = local_answers(&model, &x);

    // Whole model on an image batch.
    let resp = client.model_infer(request("tiny3", &x, &[])).await.unwrap().into_inner();
    assert_eq!(resp.id, "req-1");
    let got: Vec<(i64, i32)> = codec::read_answers(&resp).unwrap().iter().map(|a| (a.0, a.1)).collect();
    assert_eq!(got, want);

    // Forwarded cut E1: the head's cut tensor for the same samples, run by the tail.
    let segs = segments(&model).unwrap();
    let head = extract_side(&model, &segs, &Side::parse("E1", PartitionRole::Head, 3).unwrap()).unwrap();
    let cut = OrtGraph::new(&head, SessionOptions::default()).unwrap().run(&x).unwrap().pop().unwrap();
    let resp = client
        .model_infer(request("tiny3", &cut, &[(PARAM_CUT, "E1"), (PARAM_FINGERPRINT, &model.fingerprint)]))
        .await
        .unwrap()
        .into_inner();
    let tail: Vec<(i64, i32)> = codec::read_answers(&resp).unwrap().iter().map(|a| (a.0, a.1)).collect();
    for (i, (w, g)) in want.iter().zip(&tail).enumerate() {
        if w.1 >= 1 {
            assert_eq!(w, g, "sample {i}: the tail answers what the whole model answers past E1");
        } else {
            assert!(g.1 >= 1, "the tail never answers at E1");
        }
    }
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_status_and_the_server_keeps_serving() {
    let handle = cloud_server::start(config(fixture("tiny3.onnx"))).await.unwrap();
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", handle.addr)).await.unwrap();
    let x = inputs(2, 1);
    let status = |r: Result<tonic::Response<ModelInferResponse>, tonic::Status>| r.unwrap_err();

    let s = status(client.model_infer(request("resnet", &x, &[])).await);
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("\"resnet\" is not served here"), "{}", s.message());

    let s = status(client.model_infer(request("tiny3", &x, &[(PARAM_CUT, "E9")])).await);
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("cut \"E9\" is not in model tiny3 (cuts E1..E2)"), "{}", s.message());

    let s = status(client.model_infer(request("tiny3", &x, &[(PARAM_FINGERPRINT, "0000")])).await);
    assert_eq!(s.code(), Code::FailedPrecondition);

    // Byte length that does not match the shape.
    let mut r = request("tiny3", &x, &[]);
    r.raw_input_contents[0] = r.raw_input_contents[0].slice(0..60);
    let s = status(client.model_infer(r).await);
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("needs 128 bytes, found 60"), "{}", s.message());

    // A shape that is not the model's, and a cut tensor of the wrong shape.
    let s = status(
        client.model_infer(request("tiny3", &Tensor::new(vec![2, 1, 2, 8], x.data.clone()).unwrap(), &[])).await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        s.message(),
        "input `input` has shape [2, 1, 2, 8]; an image batch of model tiny3 takes [N, 1, 4, 4] with 1 ≤ N ≤ 32"
    );
    let s = status(client.model_infer(request("tiny3", &x, &[(PARAM_CUT, "E1")])).await);
    assert!(s.message().contains("cut E1 of model tiny3 takes [N, 2, 4, 4]"), "{}", s.message());

    // A NaN in one sample fails that sample only; a one-sample request with a NaN is refused.
    let mut bad = x.clone();
    bad.data[3] = f32::NAN;
    let resp = client.model_infer(request("tiny3", &bad, &[])).await.unwrap().into_inner();
    let answers = codec::read_answers(&resp).unwrap();
    assert_eq!((answers[0].0, answers[0].1), (-1, -1), "sample 0 holds the NaN");
    assert!(answers[1].0 >= 0, "sample 1 is answered");
    let failed = codec::param_str(&resp.parameters, "classynet_failed").unwrap();
    assert!(failed.contains("sample 0: input `input` sample 0: element 3 is NaN"), "{failed}");
    let one = Tensor::new(vec![1, 1, 4, 4], bad.data[..16].to_vec()).unwrap();
    let s = status(client.model_infer(request("tiny3", &one, &[])).await);
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("element 3 is NaN"), "{}", s.message());

    // Over the batch limit.
    let s = status(client.model_infer(request("tiny3", &inputs(33, 2), &[])).await);
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("at most 32 on this server"), "{}", s.message());

    // Garbage instead of a protobuf message, on the raw HTTP/2 channel.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", handle.addr)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelInfer");
    let garbage = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    let r: Result<tonic::Response<Bytes>, _> = grpc.unary(tonic::Request::new(garbage), path, RawCodec).await;
    assert_eq!(r.unwrap_err().code(), Code::Internal, "a protobuf that does not decode is refused");

    // Still serving.
    let resp = client.model_infer(request("tiny3", &x, &[])).await.unwrap().into_inner();
    assert_eq!(codec::read_answers(&resp).unwrap().len(), 2);
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_downloads_nobody_reads_are_bounded_and_share_one_copy() {
    use classynet_proto::control::control_client::ControlClient;
    use classynet_proto::control::GetPartitionRequest;
    // The zoo's ResNet-110: its E6 head (several MiB) outgrows HTTP/2's flow-control windows, so
    // an unread stream really stalls on the server.
    let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo/resnet110-7exit-cnc.onnx");
    let mut cfg = config(zoo);
    cfg.max_downloads = 4;
    let handle = cloud_server::start(cfg).await.unwrap();
    let mut client = ControlClient::connect(format!("http://{}", handle.addr)).await.unwrap();
    let get = |c: &mut ControlClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move { c.get_partition(GetPartitionRequest { partition: "E6".into() }).await }
    };
    // Four streams opened and never read: the fifth is refused, not buffered.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(get(&mut client).await.unwrap().into_inner());
    }
    let s = get(&mut client).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("4 head downloads are already in progress"), "{}", s.message());
    // Every download gives the same bytes; once the unread ones are dropped, downloads work again.
    drop(held);
    let mut sizes = Vec::new();
    for _ in 0..6 {
        // The server learns of the dropped streams (RST_STREAM) a moment later.
        let t = std::time::Instant::now();
        let mut stream = loop {
            match get(&mut client).await {
                Ok(s) => break s.into_inner(),
                Err(s) if s.code() == Code::ResourceExhausted && t.elapsed().as_secs() < 5 => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(s) => panic!("the permits of dropped downloads came back: {s}"),
            }
        };
        let mut n = 0;
        while let Some(chunk) = stream.message().await.unwrap() {
            n += chunk.data.len();
        }
        sizes.push(n);
    }
    assert!(sizes[0] > 0 && sizes.iter().all(|&n| n == sizes[0]), "{sizes:?}");
    handle.stop().await;
}

/// Sends bytes as they are, to test what the server does with a message that is not protobuf.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        use bytes::Buf;
        let mut b = BytesMut::with_capacity(src.remaining());
        b.put(src);
        Ok(Some(b.freeze()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calibrated_policy_serves_the_exit_counts_calibration_predicted() {
    use classynet_runtime::calibrate::{calibrate, Options, Scores, Target};

    // Calibrate tiny3 on 400 samples: labels are E2's answers, every 7th changed, so that the
    // early exits are right on most samples and wrong on some.
    classynet_runtime::ort_backend::init_ort(None, 1).unwrap();
    let model = Model::load(&fixture("tiny3.onnx")).unwrap();
    let x = inputs(400, 21);
    let outs = OrtGraph::new(&model.proto, SessionOptions::default()).unwrap().run(&x).unwrap();
    let e2: Vec<u32> = outs[1]
        .data
        .chunks(4)
        .map(|r| (0..4u32).max_by(|&a, &b| r[a as usize].total_cmp(&r[b as usize])).unwrap())
        .collect();
    let labels: Vec<u32> = e2.iter().enumerate().map(|(i, &c)| if i % 7 == 0 { (c + 1) % 4 } else { c }).collect();
    let base = Policy::defaults(&model.meta);
    let mut scores = Scores::default();
    let blocks: Vec<&[f32]> = outs.iter().map(|t| t.data.as_slice()).collect();
    scores.push(&base, &blocks, &labels).unwrap();
    let opts = Options { target: Target::Precision(0.8), min_support: 5, ..Options::default() };
    let cal = calibrate(&model.meta, &base, &[], &scores, None, &opts).unwrap();
    let predicted: Vec<usize> = cal.exits.iter().map(|e| e.exited).collect();
    assert!(predicted[0] + predicted[1] > 0, "the calibration lets some samples leave early: {predicted:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calibrated.toml");
    std::fs::write(&path, cal.policy_file(&model.meta, 2).to_toml().unwrap()).unwrap();

    let mut args: Vec<String> =
        ["cloud-server", "--model", fixture("tiny3.onnx").to_str().unwrap(), "--listen", "127.0.0.1:0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(["--threads".into(), "1".into(), "--policy".into(), path.display().to_string()]);
    let handle = cloud_server::start(cloud_server::Config::parse_from(args)).await.unwrap();
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", handle.addr)).await.unwrap();
    let mut served = vec![0usize; 3];
    for first in (0..400).step_by(50) {
        let batch = Tensor::new(vec![50, 1, 4, 4], x.data[first * 16..(first + 50) * 16].to_vec()).unwrap();
        let resp = client.model_infer(request("tiny3", &batch, &[])).await.unwrap().into_inner();
        for a in codec::read_answers(&resp).unwrap() {
            served[a.1 as usize] += 1;
        }
    }
    assert_eq!(served, predicted, "the cloud serving the calibrated policy leaves where calibration said");
    handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_of_a_model_gives_the_same_head_and_describes_the_same_model() {
    use classynet_proto::control::control_client::ControlClient;
    use classynet_proto::control::{DescribeRequest, GetPartitionRequest};
    // Two replicas of one model file, as a Deployment runs them: an edge may download its head
    // from either and must then be able to forward to both.
    let model = fixture("tiny3.onnx");
    let replicas =
        [cloud_server::start(config(model.clone())).await.unwrap(), cloud_server::start(config(model)).await.unwrap()];
    let mut heads = Vec::new();
    let mut described = Vec::new();
    for r in &replicas {
        let mut c = ControlClient::connect(format!("http://{}", r.addr)).await.unwrap();
        for partition in ["E1", "E2"] {
            let mut stream =
                c.get_partition(GetPartitionRequest { partition: partition.into() }).await.unwrap().into_inner();
            let (mut bytes, mut fingerprint) = (Vec::new(), String::new());
            while let Some(chunk) = stream.message().await.unwrap() {
                bytes.extend_from_slice(&chunk.data);
                if !chunk.fingerprint.is_empty() {
                    fingerprint = chunk.fingerprint;
                }
            }
            heads.push((partition, bytes, fingerprint));
        }
        described.push(c.describe(DescribeRequest {}).await.unwrap().into_inner());
    }
    for (a, b) in heads.iter().zip(&heads[2..]) {
        assert_eq!(a.0, b.0);
        assert!(!a.1.is_empty() && a.1 == b.1, "head {} differs between replicas", a.0);
        assert_eq!(a.2, b.2, "fingerprint of head {}", a.0);
        // The head carries its source model's fingerprint: the one each replica describes.
        assert_eq!(a.2, described[0].fingerprint);
        assert_eq!(Model::from_bytes(&a.1, "head").unwrap().fingerprint, described[0].fingerprint);
    }
    assert_eq!(described[0], described[1]);
    assert_eq!(described[0].exits, 3);
    for r in replicas {
        r.stop().await;
    }
}
