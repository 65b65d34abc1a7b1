//! Validation of a whole Open Inference Protocol request before it joins a batch.
//!
//! Everything a client controls is checked here, against what the server serves, before any
//! allocation sized by the client and before batching: the model name and version, the input's
//! name, datatype, rank and every dimension, the element count against the bytes (overflow-safe),
//! the number of samples, requested outputs and the types of known parameters. A request that
//! passes can only change its own answers: samples whose values are not finite are answered
//! with a per-sample failure, and the rest of the request (and of the batch) runs as usual.
//!
//! Statuses follow the Open Inference Protocol as Triton implements it: malformed requests are
//! `INVALID_ARGUMENT`, an unknown model or version `NOT_FOUND`, a request beyond the server's
//! limits `RESOURCE_EXHAUSTED`.

use std::collections::HashMap;
use std::time::Duration;

use classynet_proto::inference::infer_parameter::ParameterChoice;
use classynet_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
use classynet_runtime::backend::Tensor;
use classynet_runtime::runner::SampleResult;

use crate::batcher::{Origin, Served};
use crate::codec::{self, Payload, PARAM_CUT, PARAM_FINGERPRINT, PARAM_POLICY_VERSION, PARAM_SCALE, PARAM_ZERO_POINT};
use crate::error::{ServeError, ServeResult};

/// The one version of a model these servers serve (reported by ModelMetadata).
pub const MODEL_VERSION: &str = "1";
/// The outputs of every ModelInfer answer, in their default order.
pub const OUTPUTS: [&str; 4] = ["label", "exit", "entropy", "probability"];
/// Request parameter (Triton's): the client's timeout for this request, in microseconds.
pub const PARAM_TIMEOUT: &str = "timeout";

/// What one server accepts as the input of a ModelInfer.
#[derive(Debug, Clone)]
pub struct InputSpec<'a> {
    /// Name the input must carry.
    pub name: &'a str,
    /// Shape of one sample, when the model declares it (checked dimension by dimension).
    pub sample: Option<&'a [usize]>,
    /// Most samples one request may hold.
    pub max_samples: usize,
    /// Whether 8-bit pixels (UINT8, normalised here) are accepted.
    pub pixels: bool,
    /// What the input is, for messages: "an image batch of model m".
    pub what: &'a str,
}

/// A request's input, decoded and checked.
#[derive(Debug)]
pub struct Decoded {
    /// The samples that can run (all of them, less those in `invalid`).
    pub tensor: Tensor,
    pub payload: Payload,
    /// Samples refused on their own (position in the request, why), in request order.
    pub invalid: Vec<(usize, String)>,
    /// Samples in the request.
    pub samples: usize,
}

impl Decoded {
    /// Puts the refused samples back in their places, as failures answered here.
    pub fn merge(&self, served: Served) -> Served {
        if self.invalid.is_empty() {
            return served;
        }
        let mut results = Vec::with_capacity(self.samples);
        let mut origin = Vec::with_capacity(self.samples);
        let mut ran = served.results.into_iter().zip(served.origin);
        let mut invalid = self.invalid.iter().peekable();
        for i in 0..self.samples {
            match invalid.next_if(|(at, _)| *at == i) {
                Some((_, why)) => {
                    results.push(SampleResult::Failed(why.clone()));
                    origin.push(Origin::Local);
                }
                None => {
                    let (r, o) = ran.next().expect("every valid sample ran");
                    results.push(r);
                    origin.push(o);
                }
            }
        }
        Served { results, origin }
    }
}

/// Checks the model a request names. Each server serves exactly one model, so an empty name
/// means that model (a documented convenience; Triton, which serves many, refuses it), and an
/// empty version means the served one.
pub fn check_model(name: &str, version: &str, served: &str) -> ServeResult<()> {
    if !name.is_empty() && name != served {
        return Err(ServeError::NotFound(format!("model {name:?} is not served here (this server serves {served:?})")));
    }
    if !version.is_empty() && version != MODEL_VERSION {
        return Err(ServeError::NotFound(format!(
            "model {served:?} has no version {version:?} (served versions: {MODEL_VERSION:?})"
        )));
    }
    Ok(())
}

fn choice_name(p: &InferParameter) -> &'static str {
    match p.parameter_choice {
        Some(ParameterChoice::BoolParam(_)) => "bool_param",
        Some(ParameterChoice::Int64Param(_)) => "int64_param",
        Some(ParameterChoice::StringParam(_)) => "string_param",
        Some(ParameterChoice::DoubleParam(_)) => "double_param",
        Some(ParameterChoice::Uint64Param(_)) => "uint64_param",
        None => "no value",
    }
}

/// The kinds of value a known parameter may take.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Number,
    Bool,
}

impl Kind {
    fn accepts(self, p: &InferParameter) -> bool {
        matches!(
            (self, &p.parameter_choice),
            (Kind::Str, Some(ParameterChoice::StringParam(_)))
                | (Kind::Int, Some(ParameterChoice::Int64Param(_) | ParameterChoice::Uint64Param(_)))
                | (
                    Kind::Number,
                    Some(
                        ParameterChoice::Int64Param(_)
                            | ParameterChoice::Uint64Param(_)
                            | ParameterChoice::DoubleParam(_)
                    )
                )
                | (Kind::Bool, Some(ParameterChoice::BoolParam(_)))
        )
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Str => "a string_param",
            Kind::Int => "an int64_param or uint64_param",
            Kind::Number => "an int64_param, uint64_param or double_param",
            Kind::Bool => "a bool_param",
        }
    }
}

fn check_params(params: &HashMap<String, InferParameter>, known: &[(&str, Kind)], whose: &str) -> ServeResult<()> {
    for (key, kind) in known {
        if let Some(p) = params.get(*key) {
            if !kind.accepts(p) {
                return Err(ServeError::InvalidArgument(format!(
                    "{whose} parameter `{key}` must be {}, found {}",
                    kind.expected(),
                    choice_name(p)
                )));
            }
        }
    }
    Ok(())
}

/// Checks what does not depend on the input tensor: model name and version, parameter types,
/// requested outputs, and how contents are given.
pub fn check_envelope(req: &ModelInferRequest, served: &str) -> ServeResult<()> {
    check_model(&req.model_name, &req.model_version, served)?;
    check_params(
        &req.parameters,
        &[
            (PARAM_CUT, Kind::Str),
            (PARAM_FINGERPRINT, Kind::Str),
            (PARAM_POLICY_VERSION, Kind::Int),
            (PARAM_TIMEOUT, Kind::Int),
            ("priority", Kind::Int),
            ("binary_data_output", Kind::Bool),
        ],
        "request",
    )?;
    if let Some(ParameterChoice::Int64Param(t)) =
        req.parameters.get(PARAM_TIMEOUT).and_then(|p| p.parameter_choice.as_ref())
    {
        if *t < 0 {
            return Err(ServeError::InvalidArgument(format!(
                "request parameter `{PARAM_TIMEOUT}` must be ≥ 0 µs, found {t}"
            )));
        }
    }
    for input in &req.inputs {
        check_params(
            &input.parameters,
            &[(PARAM_SCALE, Kind::Number), (PARAM_ZERO_POINT, Kind::Number), ("binary_data_size", Kind::Int)],
            &format!("input `{}`", input.name),
        )?;
    }
    let mut seen = Vec::new();
    for out in &req.outputs {
        if !OUTPUTS.contains(&out.name.as_str()) {
            return Err(ServeError::InvalidArgument(format!(
                "unexpected requested output `{}` for model {served:?} (outputs: {})",
                out.name,
                OUTPUTS.join(", ")
            )));
        }
        if seen.contains(&out.name.as_str()) {
            return Err(ServeError::InvalidArgument(format!("output `{}` is requested twice", out.name)));
        }
        seen.push(out.name.as_str());
        if out.parameters.contains_key("classification") {
            return Err(ServeError::InvalidArgument(format!(
                "requested output `{}`: the classification extension is not supported; `label` already is the class",
                out.name
            )));
        }
        check_params(&out.parameters, &[("binary_data", Kind::Bool)], &format!("requested output `{}`", out.name))?;
    }
    if !req.raw_input_contents.is_empty() {
        if req.raw_input_contents.len() != req.inputs.len() {
            return Err(ServeError::InvalidArgument(format!(
                "expected one raw_input_contents entry per input ({}), found {}",
                req.inputs.len(),
                req.raw_input_contents.len()
            )));
        }
        if let Some(i) = req.inputs.iter().find(|i| i.contents.is_some()) {
            return Err(ServeError::InvalidArgument(format!(
                "input `{}` has typed contents while the request uses raw_input_contents; send one or the other",
                i.name
            )));
        }
    }
    Ok(())
}

/// Checks the input against `spec` and decodes it. Order matters: the rank, each dimension and
/// the sample count are checked from the shape alone, before the byte count and before anything
/// sized by the client is allocated.
pub fn decode(req: &ModelInferRequest, spec: &InputSpec) -> ServeResult<Decoded> {
    let [input] = req.inputs.as_slice() else {
        return Err(ServeError::InvalidArgument(format!(
            "expected 1 input (`{}`), found {}",
            spec.name,
            req.inputs.len()
        )));
    };
    if input.name != spec.name {
        return Err(ServeError::InvalidArgument(format!(
            "unexpected input `{}` for {} (expected `{}`)",
            input.name, spec.what, spec.name
        )));
    }
    let expected_shape = || match spec.sample {
        Some(s) => format!("[N, {}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        None => "[N, ...]".into(),
    };
    let wrong_shape = || {
        ServeError::InvalidArgument(format!(
            "input `{}` has shape {:?}; {} takes {} with 1 ≤ N ≤ {}",
            input.name,
            input.shape,
            spec.what,
            expected_shape(),
            spec.max_samples
        ))
    };
    let Some((&n, rest)) = input.shape.split_first() else { return Err(wrong_shape()) };
    if input.shape.iter().any(|&d| d < 0) {
        return Err(wrong_shape());
    }
    match spec.sample {
        Some(s) => {
            if rest.len() != s.len() || rest.iter().zip(s).any(|(&a, &b)| a as u64 != b as u64) {
                return Err(wrong_shape());
            }
        }
        None => {
            if rest.is_empty() || rest.contains(&0) {
                return Err(wrong_shape());
            }
        }
    }
    if n == 0 {
        return Err(ServeError::InvalidArgument(format!(
            "input `{}` has shape {:?}: a request needs at least one sample",
            input.name, input.shape
        )));
    }
    if n as u64 > spec.max_samples as u64 {
        return Err(ServeError::ResourceExhausted(format!(
            "input `{}` has {n} samples; a request may hold at most {} on this server",
            input.name, spec.max_samples
        )));
    }
    if codec::elem_size(&input.datatype).is_none() {
        return Err(ServeError::InvalidArgument(format!(
            "input `{}`: datatype {:?} is not supported (expected {})",
            input.name,
            input.datatype,
            codec::READABLE_DTYPES
        )));
    }
    if input.datatype == "UINT8" && !spec.pixels {
        return Err(ServeError::InvalidArgument(format!(
            "input `{}`: UINT8 pixels are only accepted for image batches, not for {}",
            input.name, spec.what
        )));
    }
    let (tensor, payload) = codec::decode_input(input, req.raw_input_contents.first())?;
    let n = n as usize;
    let row = tensor.row_len();
    let invalid: Vec<(usize, String)> = (0..n)
        .filter_map(|i| {
            let values = &tensor.data[i * row..(i + 1) * row];
            values.iter().position(|v| !v.is_finite()).map(|j| {
                (i, format!("input `{}` sample {i}: element {j} is {}; values must be finite", input.name, values[j]))
            })
        })
        .collect();
    if invalid.len() == n {
        return Err(ServeError::InvalidArgument(if n == 1 {
            invalid[0].1.clone()
        } else {
            format!("every sample has non-finite values ({})", invalid[0].1)
        }));
    }
    let tensor = if invalid.is_empty() {
        tensor
    } else {
        let keep: Vec<usize> = (0..n).filter(|i| !invalid.iter().any(|(at, _)| at == i)).collect();
        tensor.gather(&keep)
    };
    Ok(Decoded { tensor, payload, invalid, samples: n })
}

/// The outputs the client asked for, in the order it asked (all four when it named none).
pub fn select_outputs(req: &ModelInferRequest, mut resp: ModelInferResponse) -> ModelInferResponse {
    if req.outputs.is_empty() {
        return resp;
    }
    let mut outputs = Vec::with_capacity(req.outputs.len());
    let mut raw = Vec::with_capacity(req.outputs.len());
    for want in &req.outputs {
        if let Some(i) = resp.outputs.iter().position(|o| o.name == want.name) {
            outputs.push(resp.outputs[i].clone());
            raw.push(resp.raw_output_contents[i].clone());
        }
    }
    resp.outputs = outputs;
    resp.raw_output_contents = raw;
    resp
}

/// When the client stops waiting: the `grpc-timeout` header or Triton's `timeout` parameter
/// (microseconds), whichever is sooner.
pub fn deadline(metadata: &tonic::metadata::MetadataMap, req: &ModelInferRequest) -> Option<tokio::time::Instant> {
    let header = metadata.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
    let param = codec::param_int(&req.parameters, PARAM_TIMEOUT)
        .filter(|&us| us > 0)
        .map(|us| Duration::from_micros(us as u64));
    let timeout = match (header, param) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }?;
    tokio::time::Instant::now().checked_add(timeout)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use classynet_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

    const SAMPLE: [usize; 3] = [1, 2, 2];

    fn spec() -> InputSpec<'static> {
        InputSpec { name: "input", sample: Some(&SAMPLE), max_samples: 4, pixels: true, what: "an image batch of m" }
    }

    fn request(shape: Vec<i64>, values: &[f32]) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape,
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())],
            ..Default::default()
        }
    }

    fn err(req: &ModelInferRequest) -> (tonic::Code, String) {
        let e = check_envelope(req, "m").and_then(|_| decode(req, &spec())).unwrap_err();
        (e.code(), e.to_string())
    }

    #[test]
    fn shapes_are_checked_before_bytes() {
        // [1e9, 0] with no bytes: 0 elements = 0 bytes, but the shape is wrong for the model.
        let (code, msg) = err(&request(vec![1_000_000_000, 0], &[]));
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert_eq!(
            msg,
            "input `input` has shape [1000000000, 0]; an image batch of m takes [N, 1, 2, 2] with 1 ≤ N ≤ 4"
        );
        let (code, msg) = err(&request(vec![1 << 60, 1, 2, 2], &[]));
        assert_eq!(code, tonic::Code::ResourceExhausted, "{msg}");
        assert!(msg.contains("at most 4"), "{msg}");
        assert_eq!(err(&request(vec![1, 4], &[0.0; 4])).0, tonic::Code::InvalidArgument);
        assert!(err(&request(vec![0, 1, 2, 2], &[])).1.contains("at least one sample"));
        assert!(err(&request(vec![1, 1, 2, 2], &[0.0; 3])).1.contains("needs 16 bytes, found 12"));
    }

    #[test]
    fn non_finite_samples_fail_alone() {
        let mut v = vec![1.0f32; 12];
        v[5] = f32::INFINITY;
        let req = request(vec![3, 1, 2, 2], &v);
        let d = decode(&req, &spec()).unwrap();
        assert_eq!(d.tensor.shape, vec![2, 1, 2, 2]);
        assert_eq!(d.invalid.len(), 1);
        assert_eq!(d.invalid[0].0, 1);
        assert!(d.invalid[0].1.contains("element 1 is inf"), "{}", d.invalid[0].1);
        let ran = Served { results: vec![SampleResult::Forwarded; 2], origin: vec![Origin::Remote; 2] };
        let merged = d.merge(ran);
        assert!(matches!(&merged.results[1], SampleResult::Failed(m) if m.contains("finite")));
        assert_eq!(merged.origin, vec![Origin::Remote, Origin::Local, Origin::Remote]);
        // A one-sample request with a NaN is refused as a whole.
        let (code, msg) = err(&request(vec![1, 1, 2, 2], &[0.0, f32::NAN, 0.0, 0.0]));
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(msg.contains("element 1 is NaN"), "{msg}");
    }

    #[test]
    fn the_envelope_follows_the_protocol() {
        let good = request(vec![1, 1, 2, 2], &[0.0; 4]);
        check_envelope(&good, "m").unwrap();
        let mut r = good.clone();
        r.model_version = "2".into();
        assert_eq!(err(&r).0, tonic::Code::NotFound);
        let mut r = good.clone();
        r.model_name = "other".into();
        assert_eq!(
            err(&r),
            (tonic::Code::NotFound, "model \"other\" is not served here (this server serves \"m\")".into())
        );
        r.model_name = String::new();
        check_envelope(&r, "m").expect("an empty name means the one served model");
        let mut r = good.clone();
        r.inputs[0].name = "x".into();
        assert_eq!(err(&r).1, "unexpected input `x` for an image batch of m (expected `input`)");
        let mut r = good.clone();
        r.outputs.push(InferRequestedOutputTensor { name: "logits".into(), ..Default::default() });
        assert!(err(&r).1.starts_with("unexpected requested output `logits`"));
        let mut r = good.clone();
        r.inputs[0].contents = Some(Default::default());
        assert!(err(&r).1.contains("send one or the other"));
        let mut r = good.clone();
        r.raw_input_contents.push(Bytes::new());
        assert!(err(&r).1.contains("one raw_input_contents entry per input (1), found 2"));
        let mut r = good.clone();
        r.parameters.insert(PARAM_CUT.into(), codec::int_param(2));
        assert_eq!(err(&r).1, "request parameter `classynet_cut` must be a string_param, found int64_param");
        let mut r = good;
        r.parameters.insert(PARAM_TIMEOUT.into(), codec::string_param("soon"));
        assert_eq!(err(&r).0, tonic::Code::InvalidArgument);
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }
}
