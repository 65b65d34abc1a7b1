//! Tensors on the Open Inference Protocol wire: decoding inputs (raw little-endian bytes or typed
//! contents) with their checks, encoding cut tensors in the chosen wire type, and the answer
//! outputs `label`, `exit`, `entropy`, `probability`.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use classynet_proto::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor, model_infer_response::InferOutputTensor,
    InferParameter, ModelInferResponse,
};
use classynet_runtime::backend::Tensor;
use classynet_runtime::runner::SampleResult;

use crate::error::{ServeError, ServeResult};

/// Request parameter naming the cut a forwarded tensor comes from (`E2`).
pub const PARAM_CUT: &str = "classynet_cut";
/// Request/response parameter: the policy version the edge (or cloud) decided under.
pub const PARAM_POLICY_VERSION: &str = "classynet_policy_version";
/// Request parameter: fingerprint of the model the edge runs.
pub const PARAM_FINGERPRINT: &str = "classynet_fingerprint";
/// Input tensor parameters of an INT8 tensor: x = (q - zero_point) * scale.
pub const PARAM_SCALE: &str = "classynet_scale";
pub const PARAM_ZERO_POINT: &str = "classynet_zero_point";
/// Input tensor parameters of a per-channel INT8 tensor (channel axis 1): comma-separated lists
/// of one scale and one zero point per sample and channel, in (sample, channel) order:
/// x = (q - zero_point[n·C + c]) * scale[n·C + c]. Per sample, so that what a sample is
/// answered does not depend on the samples that share its batch.
pub const PARAM_SCALES: &str = "classynet_scales";
pub const PARAM_ZERO_POINTS: &str = "classynet_zero_points";
/// Most channels quantised one by one; a tensor with more (none of a CNN's cuts) is quantised
/// per tensor, which keeps the parameter lists small against the data.
const MAX_QUANT_CHANNELS: usize = 4096;
/// Response parameter: microseconds the server spent on the request (queue + compute), so the
/// caller can tell network time from server time.
pub const PARAM_SERVER_MICROS: &str = "classynet_server_us";

/// How intermediate tensors travel from edge to cloud: the one place a wire dtype is defined,
/// with its v2 name, its flag value, its size and (in [`encode_tensor`] / [`decode_input`]) its
/// encoding. A new dtype is a new variant here, and the compiler points at every match to extend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireDtype {
    /// Exact.
    Fp32,
    /// Half the bytes.
    Fp16,
    /// A quarter of the bytes: affine quantisation with a scale and a zero point per sample and
    /// channel (axis 1), so that a channel of small activations keeps its resolution next to a
    /// large one, and a sample's values do not depend on its batch neighbours.
    Int8,
}

impl WireDtype {
    /// Every wire dtype, in flag order.
    pub const ALL: [WireDtype; 3] = [WireDtype::Fp32, WireDtype::Fp16, WireDtype::Int8];

    /// The v2 datatype string.
    pub fn v2_name(self) -> &'static str {
        match self {
            WireDtype::Fp32 => "FP32",
            WireDtype::Fp16 => "FP16",
            WireDtype::Int8 => "INT8",
        }
    }

    /// The flag value and metric label: fp32, fp16, int8.
    pub fn label(self) -> &'static str {
        match self {
            WireDtype::Fp32 => "fp32",
            WireDtype::Fp16 => "fp16",
            WireDtype::Int8 => "int8",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDtype::Fp32 => 4,
            WireDtype::Fp16 => 2,
            WireDtype::Int8 => 1,
        }
    }

    /// The wire dtype of a v2 datatype string, if it is one.
    pub fn from_v2_name(name: &str) -> Option<WireDtype> {
        WireDtype::ALL.into_iter().find(|d| d.v2_name() == name)
    }
}

/// The v2 datatype of raw 8-bit pixels (an image batch the server normalises).
pub const PIXELS: &str = "UINT8";

/// Bytes per element of the v2 datatypes this server reads (the wire dtypes and pixels).
pub fn elem_size(datatype: &str) -> Option<usize> {
    match WireDtype::from_v2_name(datatype) {
        Some(d) => Some(d.size()),
        None => (datatype == PIXELS).then_some(1),
    }
}

/// The datatypes [`elem_size`] knows, for messages.
pub const READABLE_DTYPES: &str = "FP32, FP16, INT8 or UINT8";

/// Reads a float parameter (double, int64 or string choices are all accepted).
pub fn param_f64(params: &HashMap<String, InferParameter>, key: &str) -> Option<f64> {
    match params.get(key)?.parameter_choice.as_ref()? {
        ParameterChoice::DoubleParam(v) => Some(*v),
        ParameterChoice::Int64Param(v) => Some(*v as f64),
        ParameterChoice::Uint64Param(v) => Some(*v as f64),
        ParameterChoice::StringParam(s) => s.parse().ok(),
        ParameterChoice::BoolParam(_) => None,
    }
}

/// Reads a string parameter.
pub fn param_str<'a>(params: &'a HashMap<String, InferParameter>, key: &str) -> Option<&'a str> {
    match params.get(key)?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(s) => Some(s),
        _ => None,
    }
}

/// Reads an integer parameter (int64, or a uint64 that fits).
pub fn param_int(params: &HashMap<String, InferParameter>, key: &str) -> Option<i64> {
    match params.get(key)?.parameter_choice.as_ref()? {
        ParameterChoice::Int64Param(v) => Some(*v),
        ParameterChoice::Uint64Param(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

pub fn string_param(v: impl Into<String>) -> InferParameter {
    InferParameter { parameter_choice: Some(ParameterChoice::StringParam(v.into())) }
}

pub fn int_param(v: i64) -> InferParameter {
    InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(v)) }
}

pub fn double_param(v: f64) -> InferParameter {
    InferParameter { parameter_choice: Some(ParameterChoice::DoubleParam(v)) }
}

/// What a decoded input carries besides the floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Floats as given (FP32/FP16/INT8): model input or cut values.
    Values,
    /// Raw 8-bit pixels (UINT8) that still need the model's normalisation.
    Pixels,
}

/// Decodes one input tensor to float32, checking its byte length against shape × datatype with
/// overflow-safe arithmetic before anything is allocated. `raw` is its entry of
/// `raw_input_contents`, if the request used raw contents. Values are not checked for
/// finiteness here: a caller decides per sample (see `request`).
pub fn decode_input(input: &InferInputTensor, raw: Option<&Bytes>) -> ServeResult<(Tensor, Payload)> {
    let bad = |m: String| ServeError::InvalidArgument(format!("input `{}`: {m}", input.name));
    if input.shape.iter().any(|&d| d < 0) {
        return Err(bad(format!("shape {:?} has a negative dimension", input.shape)));
    }
    let shape: Vec<usize> = input.shape.iter().map(|&d| d as usize).collect();
    let size = elem_size(&input.datatype)
        .ok_or_else(|| bad(format!("datatype {:?} is not supported (expected {READABLE_DTYPES})", input.datatype)))?;
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|n| n.checked_mul(size).is_some())
        .ok_or_else(|| bad(format!("shape {:?} holds more elements than any request can carry", input.shape)))?;
    let data: Vec<f32> = match raw {
        Some(bytes) => {
            if bytes.len() != n * size {
                return Err(bad(format!(
                    "shape {:?} of {} needs {} bytes, found {}",
                    input.shape,
                    input.datatype,
                    n * size,
                    bytes.len()
                )));
            }
            match WireDtype::from_v2_name(&input.datatype) {
                Some(WireDtype::Fp32) => {
                    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                }
                Some(WireDtype::Fp16) => {
                    bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                Some(WireDtype::Int8) => match channel_quant_params(input, &shape)? {
                    Some((scales, zps)) => {
                        // Channel c of sample n is the run of `inner` values at (n·C + c)·inner.
                        let inner: usize = shape[2..].iter().product::<usize>().max(1);
                        bytes
                            .iter()
                            .enumerate()
                            .map(|(i, &b)| {
                                let g = i / inner;
                                ((b as i8) as f32 - zps[g]) * scales[g]
                            })
                            .collect()
                    }
                    None => {
                        let (scale, zp) = quant_params(input)?;
                        bytes.iter().map(|&b| ((b as i8) as f32 - zp) * scale).collect()
                    }
                },
                // elem_size accepted it: pixels.
                None => bytes.iter().map(|&b| b as f32).collect(),
            }
        }
        None => {
            let c = input.contents.as_ref().ok_or_else(|| bad("has neither raw_input_contents nor contents".into()))?;
            let found = match input.datatype.as_str() {
                "FP32" => c.fp32_contents.len(),
                "UINT8" => c.uint_contents.len(),
                other => {
                    return Err(bad(format!(
                        "typed contents of {other} are not supported (FP32 and UINT8 are); send raw_input_contents"
                    )))
                }
            };
            if found != n {
                return Err(bad(format!("shape {:?} needs {n} values, found {found}", input.shape)));
            }
            match input.datatype.as_str() {
                "FP32" => c.fp32_contents.clone(),
                _ => {
                    if let Some(i) = c.uint_contents.iter().position(|&v| v > 255) {
                        return Err(bad(format!("UINT8 pixel {i} is {}; pixels lie in 0..=255", c.uint_contents[i])));
                    }
                    c.uint_contents.iter().map(|&v| v as f32).collect()
                }
            }
        }
    };
    let payload = if input.datatype == PIXELS { Payload::Pixels } else { Payload::Values };
    Ok((Tensor { shape, data }, payload))
}

/// The per-channel scales and zero points of an INT8 tensor, if it carries them (see
/// [`PARAM_SCALES`]); otherwise `None` and the per-tensor parameters apply.
fn channel_quant_params(input: &InferInputTensor, shape: &[usize]) -> ServeResult<Option<(Vec<f32>, Vec<f32>)>> {
    let bad = |m: String| ServeError::InvalidArgument(format!("input `{}`: {m}", input.name));
    let (scales, zps) =
        match (param_str(&input.parameters, PARAM_SCALES), param_str(&input.parameters, PARAM_ZERO_POINTS)) {
            (None, None) => return Ok(None),
            (Some(s), Some(z)) => (s, z),
            _ => {
                return Err(bad(format!(
                "per-channel INT8 needs both {PARAM_SCALES} and {PARAM_ZERO_POINTS} (comma-separated, one per sample and channel)"
            )))
            }
        };
    let channels = *shape
        .get(1)
        .ok_or_else(|| bad(format!("per-channel INT8 needs a channel axis (rank ≥ 2), found shape {shape:?}")))?;
    // decode_input checked that the shape's element count fits.
    let groups = shape[0] * channels;
    let list = |text: &str, key: &str| -> ServeResult<Vec<f64>> {
        let values: Vec<f64> = text
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("{key} must be comma-separated numbers, found {:?}", truncate(text))))?;
        if values.len() != groups {
            return Err(bad(format!(
                "{key} holds {} values, but the tensor has {groups} (samples × channels: {} × {channels})",
                values.len(),
                shape[0]
            )));
        }
        Ok(values)
    };
    let scales = list(scales, PARAM_SCALES)?
        .into_iter()
        .enumerate()
        .map(|(c, s)| {
            let f = s as f32;
            if f.is_normal() && f > 0.0 {
                Ok(f)
            } else {
                Err(bad(format!("{PARAM_SCALES}[{c}] must be a positive, finite float32, found {s}")))
            }
        })
        .collect::<ServeResult<Vec<f32>>>()?;
    let zps = list(zps, PARAM_ZERO_POINTS)?
        .into_iter()
        .enumerate()
        .map(|(c, z)| {
            if (-128.0..=127.0).contains(&z) && z.fract() == 0.0 {
                Ok(z as f32)
            } else {
                Err(bad(format!("{PARAM_ZERO_POINTS}[{c}] must be an integer in -128..=127, found {z}")))
            }
        })
        .collect::<ServeResult<Vec<f32>>>()?;
    Ok(Some((scales, zps)))
}

/// The start of a long parameter, for messages.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Affine INT8 parameters covering [lo, hi] (widened to include 0, so that ReLU zeros stay
/// exact) with `levels` codes: the scale and the zero point.
fn affine(lo: f32, hi: f32, levels: u16) -> (f32, f32) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    // In f64: the range of two large f32 values of opposite sign overflows f32, and a range of
    // subnormals underflows to a zero scale; both would be refused by the reader.
    let range = hi as f64 - lo as f64;
    let steps = (levels.clamp(2, INT8_LEVELS) - 1) as f64;
    let scale = if range > 0.0 { ((range / steps) as f32).max(f32::MIN_POSITIVE) } else { 1.0 };
    let zp = (-128.0 - lo / scale).round().clamp(-128.0, 127.0);
    (scale, zp)
}

/// Codes of an INT8 tensor: all 256, unless [`encode_tensor_with`] is asked for fewer.
pub const INT8_LEVELS: u16 = 256;

fn quantise(v: f32, scale: f32, zp: f32) -> u8 {
    ((v / scale).round() + zp).clamp(-128.0, 127.0) as i8 as u8
}

fn quant_params(input: &InferInputTensor) -> ServeResult<(f32, f32)> {
    let scale = param_f64(&input.parameters, PARAM_SCALE);
    let zp = param_f64(&input.parameters, PARAM_ZERO_POINT);
    let (Some(s), Some(z)) = (scale, zp) else {
        return Err(ServeError::InvalidArgument(format!(
            "input `{}`: INT8 tensors need the parameters {PARAM_SCALE} (> 0) and {PARAM_ZERO_POINT}",
            input.name
        )));
    };
    // Checked as the f32 values they are used as: 1e-50 is > 0 as a double but 0 as a float.
    let scale = s as f32;
    if !(scale.is_normal() && scale > 0.0) {
        return Err(ServeError::InvalidArgument(format!(
            "input `{}`: {PARAM_SCALE} must be a positive, finite float32, found {s}",
            input.name
        )));
    }
    if !(-128.0..=127.0).contains(&z) {
        return Err(ServeError::InvalidArgument(format!(
            "input `{}`: {PARAM_ZERO_POINT} must lie in -128..=127, found {z}",
            input.name
        )));
    }
    Ok((scale, z as f32))
}

/// Encodes a float tensor for the wire.
pub fn encode_tensor(name: &str, t: &Tensor, dtype: WireDtype) -> (InferInputTensor, Bytes) {
    encode_tensor_with(name, t, dtype, INT8_LEVELS)
}

/// Like [`encode_tensor`]; an INT8 tensor uses `levels` codes (2..=256) per range instead of all
/// 256: coarser steps, and a narrower alphabet that message compression turns into fewer bytes
/// (the reader needs nothing new: the scale says the step).
pub fn encode_tensor_with(name: &str, t: &Tensor, dtype: WireDtype, levels: u16) -> (InferInputTensor, Bytes) {
    let mut params = HashMap::new();
    let bytes = match dtype {
        WireDtype::Fp32 => {
            let mut b = BytesMut::with_capacity(t.data.len() * 4);
            for v in &t.data {
                b.put_f32_le(*v);
            }
            b.freeze()
        }
        WireDtype::Fp16 => {
            let mut b = BytesMut::with_capacity(t.data.len() * 2);
            for v in &t.data {
                b.put_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
            b.freeze()
        }
        WireDtype::Int8 => {
            let channels = t.shape.get(1).copied().unwrap_or(0);
            if t.shape.len() >= 2 && (1..=MAX_QUANT_CHANNELS).contains(&channels) && !t.data.is_empty() {
                // Per sample and channel (axis 1): each one's own [min, max].
                let inner: usize = t.shape[2..].iter().product::<usize>().max(1);
                let mut range = vec![(0f32, 0f32); t.data.len() / inner];
                for (i, &v) in t.data.iter().enumerate() {
                    let r = &mut range[i / inner];
                    *r = (r.0.min(v), r.1.max(v));
                }
                let quant: Vec<(f32, f32)> = range.iter().map(|&(lo, hi)| affine(lo, hi, levels)).collect();
                let join = |f: &dyn Fn(&(f32, f32)) -> String| quant.iter().map(f).collect::<Vec<_>>().join(",");
                // `{}` of an f32 is the shortest text that reads back as the same f32.
                params.insert(PARAM_SCALES.to_string(), string_param(join(&|p| format!("{}", p.0))));
                params.insert(PARAM_ZERO_POINTS.to_string(), string_param(join(&|p| format!("{}", p.1 as i32))));
                t.data
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let (scale, zp) = quant[i / inner];
                        quantise(v, scale, zp)
                    })
                    .collect::<Vec<u8>>()
                    .into()
            } else {
                let (lo, hi) = t.data.iter().fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
                let (scale, zp) = affine(lo, hi, levels);
                params.insert(PARAM_SCALE.to_string(), double_param(scale as f64));
                params.insert(PARAM_ZERO_POINT.to_string(), int_param(zp as i64));
                t.data.iter().map(|&v| quantise(v, scale, zp)).collect::<Vec<u8>>().into()
            }
        }
    };
    let input = InferInputTensor {
        name: name.to_string(),
        datatype: dtype.v2_name().to_string(),
        shape: t.shape.iter().map(|&d| d as i64).collect(),
        parameters: params,
        contents: None,
    };
    (input, bytes)
}

/// The v2 ModelMetadata of a served ClassyNet model: an FP32 image batch in, the four answer
/// outputs out. `requested` and `version` are what the client asked for.
pub fn model_metadata(
    model: &classynet_runtime::model::Model,
    served_as: &str,
    requested: &str,
    version: &str,
) -> ServeResult<classynet_proto::inference::ModelMetadataResponse> {
    use classynet_proto::inference::model_metadata_response::TensorMetadata;
    crate::request::check_model(requested, version, served_as)?;
    let mut shape = vec![-1i64];
    shape.extend(model.meta.input.shape.iter().map(|&d| d as i64));
    let t = |name: &str, dt: &str, shape: Vec<i64>| TensorMetadata { name: name.into(), datatype: dt.into(), shape };
    Ok(classynet_proto::inference::ModelMetadataResponse {
        name: served_as.into(),
        versions: vec![crate::request::MODEL_VERSION.into()],
        platform: "onnxruntime_onnx".into(),
        inputs: vec![t("input", "FP32", shape)],
        outputs: vec![
            t("label", "INT64", vec![-1]),
            t("exit", "INT32", vec![-1]),
            t("entropy", "FP32", vec![-1]),
            t("probability", "FP32", vec![-1]),
        ],
    })
}

/// The v2 ServerMetadata of this project's servers.
pub fn server_metadata(name: &str) -> classynet_proto::inference::ServerMetadataResponse {
    classynet_proto::inference::ServerMetadataResponse {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: vec!["classynet_split".into()],
    }
}

/// Applies the model's normalisation to raw 8-bit pixels (UINT8 requests), in place: the same
/// rule as the datasets of `classynet run` ([`classynet_runtime::format::InputSpec::normalise_pixels`]).
pub fn normalise(t: &mut Tensor, model: &classynet_runtime::model::Model) {
    model.meta.input.normalise_pixels(&mut t.data);
}

/// The four answer outputs, one row per sample in request order. A sample that failed (non-finite
/// logits at the last exit) gets label -1 and exit -1; `failed` lists the messages.
pub fn answers_response(
    model_name: &str,
    id: &str,
    results: &[SampleResult],
    policy_version: u64,
) -> ModelInferResponse {
    let n = results.len();
    let (mut label, mut exit, mut entropy, mut prob) = (
        BytesMut::with_capacity(n * 8),
        BytesMut::with_capacity(n * 4),
        BytesMut::with_capacity(n * 4),
        BytesMut::with_capacity(n * 4),
    );
    let mut failed = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match r {
            SampleResult::Answered(a) => {
                label.put_i64_le(a.class as i64);
                exit.put_i32_le(a.exit as i32);
                entropy.put_f32_le(a.entropy);
                prob.put_f32_le(a.probability);
            }
            other => {
                label.put_i64_le(-1);
                exit.put_i32_le(-1);
                entropy.put_f32_le(f32::NAN);
                prob.put_f32_le(0.0);
                failed.push(format!(
                    "sample {i}: {}",
                    match other {
                        SampleResult::Failed(m) => m.as_str(),
                        _ => "not answered",
                    }
                ));
            }
        }
    }
    let out = |name: &str, dt: &str| InferOutputTensor {
        name: name.into(),
        datatype: dt.into(),
        shape: vec![n as i64],
        parameters: HashMap::new(),
        contents: None,
    };
    let mut parameters = HashMap::from([(PARAM_POLICY_VERSION.to_string(), int_param(policy_version as i64))]);
    if !failed.is_empty() {
        parameters.insert("classynet_failed".into(), string_param(failed.join("; ")));
    }
    ModelInferResponse {
        model_name: model_name.into(),
        model_version: crate::request::MODEL_VERSION.into(),
        id: id.into(),
        parameters,
        outputs: vec![out("label", "INT64"), out("exit", "INT32"), out("entropy", "FP32"), out("probability", "FP32")],
        raw_output_contents: vec![label.freeze(), exit.freeze(), entropy.freeze(), prob.freeze()],
    }
}

/// Reads the answers back from a response (the edge reading the cloud's reply).
pub fn read_answers(resp: &ModelInferResponse) -> ServeResult<Vec<(i64, i32, f32, f32)>> {
    let find = |name: &str| -> ServeResult<&Bytes> {
        let i = resp
            .outputs
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| ServeError::Unavailable(format!("the cloud's reply has no `{name}` output")))?;
        resp.raw_output_contents
            .get(i)
            .ok_or_else(|| ServeError::Unavailable(format!("the cloud's reply has no data for `{name}`")))
    };
    let (l, e, h, p) = (find("label")?, find("exit")?, find("entropy")?, find("probability")?);
    let n = l.len() / 8;
    if e.len() != n * 4 || h.len() != n * 4 || p.len() != n * 4 {
        return Err(ServeError::Unavailable("the cloud's reply outputs have inconsistent lengths".into()));
    }
    Ok((0..n)
        .map(|i| {
            let g4 = |b: &Bytes| [b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]];
            (
                i64::from_le_bytes(l[i * 8..i * 8 + 8].try_into().expect("8 bytes")),
                i32::from_le_bytes(g4(e)),
                f32::from_le_bytes(g4(h)),
                f32::from_le_bytes(g4(p)),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(dtype: WireDtype) -> (Tensor, usize) {
        let t = Tensor::new(vec![2, 3], vec![0.0, 1.5, -0.25, 3.0, 0.0, 2.0]).unwrap();
        let (input, bytes) = encode_tensor("cut", &t, dtype);
        let len = bytes.len();
        (decode_input(&input, Some(&bytes)).unwrap().0, len)
    }

    #[test]
    fn wire_types_round_trip_within_their_precision() {
        let (t, n) = roundtrip(WireDtype::Fp32);
        assert_eq!(t.data, vec![0.0, 1.5, -0.25, 3.0, 0.0, 2.0]);
        assert_eq!(n, 24);
        let (t, n) = roundtrip(WireDtype::Fp16);
        assert_eq!(t.data, vec![0.0, 1.5, -0.25, 3.0, 0.0, 2.0]); // all exactly representable
        assert_eq!(n, 12);
        let (t, n) = roundtrip(WireDtype::Int8);
        assert_eq!(n, 6);
        // One value per sample and channel: each is an end of its own range, so exact to
        // float rounding.
        for (a, b) in t.data.iter().zip([0.0f32, 1.5, -0.25, 3.0, 0.0, 2.0]) {
            assert!((a - b).abs() <= b.abs() * 1e-6, "{a} vs {b}");
        }
        assert_eq!((t.data[0], t.data[4]), (0.0, 0.0), "zeros stay exact");
    }

    /// Channels whose ranges differ by orders of magnitude: each keeps half a step of its own
    /// (its range in that sample / 255).
    #[test]
    fn per_channel_int8_error_is_at_most_half_a_step_of_each_channel() {
        let (n, c, hw) = (3, 4, 5);
        let magnitude = [0.01f32, 1.0, 100.0, 3.0];
        let data: Vec<f32> = (0..n * c * hw)
            .map(|i| {
                let ch = (i / hw) % c;
                // ReLU-like: zeros and positive values, plus one negative channel.
                let v = ((i * 37 % 11) as f32 / 10.0) * magnitude[ch];
                if ch == 3 {
                    v - 1.5
                } else if i % 3 == 0 {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        let t = Tensor::new(vec![n, c, hw], data).unwrap();
        let (input, bytes) = encode_tensor("cut", &t, WireDtype::Int8);
        assert!(input.parameters.contains_key(PARAM_SCALES) && !input.parameters.contains_key(PARAM_SCALE));
        let back = decode_input(&input, Some(&bytes)).unwrap().0;
        for (sample, ch) in (0..n).flat_map(|s| (0..c).map(move |ch| (s, ch))) {
            let vals: Vec<(f32, f32)> =
                (0..hw).map(|k| (sample * c + ch) * hw + k).map(|i| (t.data[i], back.data[i])).collect();
            let (lo, hi) = vals.iter().fold((0f32, 0f32), |(l, h), &(v, _)| (l.min(v), h.max(v)));
            let step = (hi - lo) / 255.0;
            for (orig, got) in vals {
                assert!((orig - got).abs() <= step / 2.0 * 1.0001 + f32::EPSILON, "channel {ch}: {orig} → {got}");
                if orig == 0.0 {
                    assert_eq!(got, 0.0, "channel {ch}: zero stays exact");
                }
            }
        }
        // A rank-1 tensor has no channel axis: one scale for all.
        let flat = Tensor::new(vec![4], vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let (input, bytes) = encode_tensor("cut", &flat, WireDtype::Int8);
        assert!(input.parameters.contains_key(PARAM_SCALE));
        let back = decode_input(&input, Some(&bytes)).unwrap().0;
        assert!(back.data.iter().zip(&flat.data).all(|(a, b)| (a - b).abs() <= 3.0 / 255.0 / 2.0 + 1e-6));
    }

    #[test]
    fn fewer_int8_levels_mean_coarser_steps_that_still_decode_within_half_a_step() {
        let t = Tensor::new(vec![1, 1, 5], vec![0.0, 0.7, 1.3, 2.2, 3.0]).unwrap();
        let (input, bytes) = encode_tensor_with("cut", &t, WireDtype::Int8, 16);
        let codes: std::collections::BTreeSet<u8> = bytes.iter().copied().collect();
        assert!(codes.iter().all(|&c| (c as i8) < -128 + 16), "16 codes from -128: {codes:?}");
        let back = decode_input(&input, Some(&bytes)).unwrap().0;
        for (a, b) in back.data.iter().zip(&t.data) {
            assert!((a - b).abs() <= 3.0 / 15.0 / 2.0 + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_per_channel_parameters_are_explained() {
        let t = Tensor::new(vec![1, 2, 2], vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let (input, bytes) = encode_tensor("cut", &t, WireDtype::Int8);
        let with = |key: &str, v: &str| {
            let mut i = input.clone();
            i.parameters.insert(key.to_string(), string_param(v));
            decode_input(&i, Some(&bytes)).unwrap_err().to_string()
        };
        assert_eq!(
            with(PARAM_SCALES, "0.1"),
            "input `cut`: classynet_scales holds 1 values, but the tensor has 2 (samples × channels: 1 × 2)"
        );
        assert!(with(PARAM_SCALES, "0.1,x").contains("comma-separated numbers"));
        assert!(with(PARAM_SCALES, "0.1,-1").contains("classynet_scales[1] must be a positive"));
        assert!(with(PARAM_ZERO_POINTS, "0,300").contains("classynet_zero_points[1] must be an integer in -128..=127"));
        let mut i = input.clone();
        i.parameters.remove(PARAM_ZERO_POINTS);
        assert!(decode_input(&i, Some(&bytes)).unwrap_err().to_string().contains("needs both"));
    }

    #[test]
    fn bad_tensors_are_explained() {
        let input =
            InferInputTensor { name: "input".into(), datatype: "FP32".into(), shape: vec![2, 2], ..Default::default() };
        let e = decode_input(&input, Some(&Bytes::from(vec![0u8; 12]))).unwrap_err().to_string();
        assert_eq!(e, "input `input`: shape [2, 2] of FP32 needs 16 bytes, found 12");
        let huge = InferInputTensor { shape: vec![1 << 40, 1 << 40], ..input.clone() };
        let e = decode_input(&huge, Some(&Bytes::new())).unwrap_err().to_string();
        assert!(e.contains("more elements than any request can carry"), "{e}");
        let bf = InferInputTensor { datatype: "BF16".into(), ..input.clone() };
        assert!(decode_input(&bf, Some(&Bytes::new())).unwrap_err().to_string().contains("BF16"));
        let q = InferInputTensor { datatype: "INT8".into(), ..input };
        assert!(decode_input(&q, Some(&Bytes::from(vec![0u8; 4]))).unwrap_err().to_string().contains(PARAM_SCALE));
    }

    #[test]
    fn each_wire_dtype_has_one_name_one_label_and_one_size() {
        for d in WireDtype::ALL {
            assert_eq!(WireDtype::from_v2_name(d.v2_name()), Some(d));
            assert_eq!(
                <WireDtype as clap::ValueEnum>::from_str(d.label(), false),
                Ok(d),
                "the flag value is the label"
            );
            assert_eq!(elem_size(d.v2_name()), Some(d.size()));
            let t = Tensor::new(vec![1, 3], vec![0.5, -1.0, 2.0]).unwrap();
            assert_eq!(encode_tensor("cut", &t, d).1.len(), 3 * d.size());
        }
        assert_eq!(elem_size(PIXELS), Some(1));
        for refused in ["INT32", "INT64", "BF16", "fp32", ""] {
            assert_eq!(elem_size(refused), None, "{refused}");
            assert_eq!(WireDtype::from_v2_name(refused), None);
        }
    }
}
