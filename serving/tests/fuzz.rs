//! Property-based fuzzing of everything that decodes bytes a client or an operator controls: the
//! v2 request validation and decoder (from structured requests and from raw protobuf bytes),
//! the tensor codec for every wire dtype, the model metadata JSON and the exit policy reader
//! (JSON and TOML, then resolved against a model). The property is always the same: no panic,
//! and what is accepted is consistent; the unit tests next to the code check the messages.
//!
//! `CLASSYNET_FUZZ_CASES` sets the inputs per property: 3,000 in the test command,
//! `scripts/fuzz` runs 150,000 each (over a million in all) in release mode and prints the figures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use classynet_proto::inference::infer_parameter::ParameterChoice;
use classynet_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use classynet_proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};
use classynet_runtime::backend::Tensor;
use classynet_runtime::exit::{ClassRef, ExitPolicy, Policy, PolicyFile};
use classynet_runtime::format::ModelMeta;
use classynet_serving::codec::{self, WireDtype};
use classynet_serving::request::{self, InputSpec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;

fn cases() -> u32 {
    std::env::var("CLASSYNET_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000)
}

/// Runs `check` on `cases()` generated inputs and prints how many ran and how many were accepted
/// (`check` returns whether the input was); a panic or a failed property fails the test with the
/// smallest input proptest finds.
fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<bool, TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let n = AtomicU64::new(0);
    let accepted = AtomicU64::new(0);
    let config = Config { cases: cases(), failure_persistence: None, max_shrink_iters: 2_000, ..Config::default() };
    let started = Instant::now();
    let result = TestRunner::new(config).run(&strategy, |v| {
        n.fetch_add(1, Ordering::Relaxed);
        if check(v)? {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    let secs = started.elapsed().as_secs_f64();
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
    let (n, accepted) = (n.load(Ordering::Relaxed), accepted.load(Ordering::Relaxed));
    println!("fuzz {name}: {n} inputs in {secs:.1} s, {accepted} accepted, panics 0");
    assert!(accepted > 0 || n < 100, "fuzz {name}: no input was accepted, so the accepting paths were never reached");
}

const SAMPLE: [usize; 3] = [1, 2, 2];

fn spec() -> InputSpec<'static> {
    InputSpec { name: "input", sample: Some(&SAMPLE), max_samples: 8, pixels: true, what: "an image batch of m" }
}

fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..4,
        1 => Just(-1i64),
        1 => Just(1i64 << 60),
        1 => Just(i64::MAX),
        1 => Just(1_000_000_000i64),
        1 => any::<i64>(),
    ]
}

fn dtype() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["FP32", "FP16", "UINT8", "INT8"]).prop_map(String::from),
        1 => prop::sample::select(vec!["INT32", "INT64", "BF16", "BYTES", "BOOL", "", "fp32"]).prop_map(String::from),
        1 => ".{0,8}",
    ]
}

fn param() -> impl Strategy<Value = InferParameter> {
    prop_oneof![
        any::<bool>().prop_map(ParameterChoice::BoolParam),
        any::<i64>().prop_map(ParameterChoice::Int64Param),
        any::<u64>().prop_map(ParameterChoice::Uint64Param),
        any::<f64>().prop_map(ParameterChoice::DoubleParam),
        ".{0,12}".prop_map(ParameterChoice::StringParam),
    ]
    .prop_map(|c| InferParameter { parameter_choice: Some(c) })
}

fn params(keys: Vec<&'static str>) -> impl Strategy<Value = HashMap<String, InferParameter>> {
    let some = prop::collection::vec((prop::sample::select(keys), param()), 1..3);
    prop_oneof![2 => Just(vec![]), 1 => some].prop_map(|v| v.into_iter().map(|(k, p)| (k.to_string(), p)).collect())
}

fn contents() -> impl Strategy<Value = Option<InferTensorContents>> {
    prop::option::weighted(
        0.2,
        (prop::collection::vec(any::<f32>(), 0..20), prop::collection::vec(any::<u32>(), 0..20)).prop_map(
            |(fp32, uint)| InferTensorContents { fp32_contents: fp32, uint_contents: uint, ..Default::default() },
        ),
    )
}

fn input() -> impl Strategy<Value = InferInputTensor> {
    (
        prop_oneof![4 => Just("input"), 1 => Just("cut"), 1 => Just("x")],
        dtype(),
        prop_oneof![
            3 => (0i64..10).prop_map(|n| vec![n, 1, 2, 2]),
            2 => prop::collection::vec(dim(), 0..6),
        ],
        params(vec![codec::PARAM_SCALE, codec::PARAM_ZERO_POINT, "binary_data_size", "other"]),
        contents(),
    )
        .prop_map(|(name, datatype, shape, parameters, contents)| InferInputTensor {
            name: name.into(),
            datatype,
            shape,
            parameters,
            contents,
        })
}

/// Structured requests: mostly plausible, with every field a client controls varied.
fn infer_request() -> impl Strategy<Value = ModelInferRequest> {
    let outputs =
        prop::collection::vec(prop::sample::select(vec!["label", "exit", "entropy", "probability", "logits"]), 1..3);
    (
        prop_oneof![4 => Just("m"), 1 => Just(""), 1 => Just("other")],
        prop_oneof![4 => Just(""), 1 => Just("1"), 1 => Just("2")],
        prop_oneof![4 => prop::collection::vec(input(), 1..=1), 1 => prop::collection::vec(input(), 0..3)],
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..80), 0..3),
        prop_oneof![3 => Just(vec![]), 1 => outputs],
        params(vec![
            codec::PARAM_CUT,
            codec::PARAM_FINGERPRINT,
            codec::PARAM_POLICY_VERSION,
            request::PARAM_TIMEOUT,
            "priority",
            "binary_data_output",
        ]),
        any::<bool>(),
    )
        .prop_map(|(name, version, inputs, raw, outputs, parameters, fit)| {
            let mut raw: Vec<Bytes> = raw.into_iter().map(Bytes::from).collect();
            // Half the time the first input's bytes fit its shape and dtype, so that requests
            // get past the byte check and the paths after it are reached.
            if let (true, Some(first)) = (fit, inputs.first()) {
                let n = first.shape.iter().try_fold(1u64, |a, &d| u64::try_from(d).ok().and_then(|d| a.checked_mul(d)));
                if let (Some(n), Some(size)) = (n.filter(|&n| n <= 4096), codec::elem_size(&first.datatype)) {
                    let fill = raw.first().and_then(|b| b.first().copied()).unwrap_or(0);
                    let bytes = Bytes::from(vec![fill; n as usize * size]);
                    match raw.first_mut() {
                        Some(b) => *b = bytes,
                        None => raw.push(bytes),
                    }
                }
            }
            ModelInferRequest {
                model_name: name.into(),
                model_version: version.into(),
                id: String::new(),
                parameters,
                inputs,
                outputs: outputs
                    .into_iter()
                    .map(|n| InferRequestedOutputTensor { name: n.into(), ..Default::default() })
                    .collect(),
                raw_input_contents: raw,
            }
        })
}

/// Validates like a server does; whatever is accepted must be a batch of the model's shape.
fn validate(req: &ModelInferRequest) -> Result<bool, TestCaseError> {
    let decoded = request::check_envelope(req, "m").and_then(|_| request::decode(req, &spec()));
    let accepted = decoded.is_ok();
    if let Ok(d) = decoded {
        let t = &d.tensor;
        prop_assert_eq!(&t.shape[1..], &SAMPLE[..]);
        prop_assert!(d.samples >= 1 && d.samples <= 8);
        prop_assert_eq!(t.batch() + d.invalid.len(), d.samples);
        prop_assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
        prop_assert!(t.data.iter().all(|v| v.is_finite()), "non-finite values reached the batch");
    }
    Ok(accepted)
}

#[test]
fn v2_requests_are_validated_without_panics() {
    fuzz("v2 request (structured)", infer_request(), |req| validate(&req));
}

#[test]
fn v2_requests_with_exact_byte_counts() {
    // Byte counts that match the shape, so decoding of every dtype's raw values is reached.
    let strategy = (1usize..10, prop::sample::select(vec!["FP32", "FP16", "UINT8", "INT8"]), any::<u64>())
        .prop_flat_map(|(n, dtype, _)| {
            let size = codec::elem_size(dtype).unwrap();
            (Just(n), Just(dtype), prop::collection::vec(any::<u8>(), n * 4 * size), param(), param())
        });
    fuzz("v2 request (exact bytes)", strategy, |(n, dtype, bytes, scale, zp)| {
        let req = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: dtype.into(),
                shape: vec![n as i64, 1, 2, 2],
                parameters: [(codec::PARAM_SCALE.to_string(), scale), (codec::PARAM_ZERO_POINT.to_string(), zp)].into(),
                contents: None,
            }],
            raw_input_contents: vec![Bytes::from(bytes)],
            ..Default::default()
        };
        validate(&req)
    });
}

#[test]
fn raw_protobuf_bytes_are_decoded_and_validated_without_panics() {
    // Half of the inputs are encodings of plausible requests with bytes flipped, the rest noise.
    let mutated = (infer_request(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6)).prop_map(
        |(req, flips)| {
            let mut b = req.encode_to_vec();
            for (i, v) in flips {
                if !b.is_empty() {
                    let at = i.index(b.len());
                    b[at] = v;
                }
            }
            b
        },
    );
    let strategy = prop_oneof![mutated, prop::collection::vec(any::<u8>(), 0..256)];
    fuzz("v2 request (protobuf bytes)", strategy, |bytes| match ModelInferRequest::decode(bytes.as_slice()) {
        Ok(req) => validate(&req),
        Err(_) => Ok(false),
    });
}

#[test]
fn every_wire_dtype_round_trips_what_it_can_represent() {
    let value = prop_oneof![
        6 => -1e4f32..1e4f32,
        1 => Just(0.0f32),
        1 => prop::sample::select(vec![1e-44f32, -1e-44, f32::MIN_POSITIVE, f32::MAX, -f32::MAX, 65504.0, 70000.0]),
        1 => any::<f32>().prop_filter("finite", |v| v.is_finite()),
    ];
    let strategy = (1usize..5, 1usize..9)
        .prop_flat_map(move |(n, w)| (Just(n), Just(w), prop::collection::vec(value.clone(), n * w)));
    fuzz("wire codec round trip", strategy, |(n, w, data)| {
        let t = Tensor::new(vec![n, w], data).unwrap();
        for dtype in [WireDtype::Fp32, WireDtype::Fp16, WireDtype::Int8] {
            let (input, raw) = codec::encode_tensor("cut", &t, dtype);
            let (back, _) = codec::decode_input(&input, Some(&raw)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back.shape, &t.shape);
            let bound = t.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in t.data.iter().zip(&back.data) {
                match dtype {
                    WireDtype::Fp32 => prop_assert_eq!(a, b),
                    WireDtype::Fp16 if a.abs() < 6e4 => prop_assert!((a - b).abs() <= a.abs() / 1024.0 + 1e-7),
                    WireDtype::Int8 if bound < 1e30 => {
                        prop_assert!(
                            (a - b).abs() <= 2.0 * bound / 255.0 + 1e-6 * bound + f32::MIN_POSITIVE,
                            "{} vs {}",
                            a,
                            b
                        )
                    }
                    _ => {}
                }
            }
        }
        Ok(true)
    });
}

#[test]
fn the_codec_reads_any_bytes_of_any_dtype_without_panics() {
    let strategy = (dtype(), prop::collection::vec(dim(), 0..5), prop::collection::vec(any::<u8>(), 0..64), param());
    fuzz("wire codec decode", strategy, |(dtype, shape, bytes, scale)| {
        let input = InferInputTensor {
            name: "cut".into(),
            datatype: dtype,
            shape,
            parameters: [
                (codec::PARAM_SCALE.to_string(), scale),
                (codec::PARAM_ZERO_POINT.to_string(), codec::int_param(3)),
            ]
            .into(),
            contents: None,
        };
        let decoded = codec::decode_input(&input, Some(&Bytes::from(bytes)));
        if let Ok((t, _)) = &decoded {
            prop_assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
        }
        Ok(decoded.is_ok())
    });
}

const META: &str = r#"{"format_version": 1, "classes": ["a", "b", "c"],
 "input": {"shape": [1, 2, 2], "mean": [0.5], "std": [0.25]},
 "exits": [
  {"name": "E1", "logits": "o1", "cut": "c1", "classes": [2], "bag": true, "threshold": 0.3},
  {"name": "E2", "logits": "o2", "cut": null, "classes": [0, 1, 2], "bag": false, "threshold": null}]}"#;

/// Text that is mostly the valid document with a few characters replaced, inserted or removed.
fn mutated(text: &'static str) -> impl Strategy<Value = String> {
    let edit = (
        any::<prop::sample::Index>(),
        0u8..3,
        prop::sample::select(vec!["", "-", "1e99", "null", "\"", "{", "]", "0", "NaN", "9999999999999999999999"]),
    );
    prop::collection::vec(edit, 1..4).prop_map(move |edits| {
        let mut s = text.to_string();
        for (at, kind, with) in edits {
            let mut i = at.index(s.len() + 1);
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            match kind {
                0 => s.insert_str(i, with),
                1 => {
                    let end = (i + 1..=s.len()).find(|&j| s.is_char_boundary(j)).unwrap_or(s.len());
                    s.replace_range(i..end, with);
                }
                _ => s.truncate(i),
            }
        }
        s
    })
}

#[test]
fn model_metadata_json_is_parsed_without_panics() {
    fuzz("model metadata JSON", prop_oneof![mutated(META), ".{0,200}"], |text| {
        let meta = ModelMeta::from_json(&text);
        if let Ok(meta) = &meta {
            // What validates can be served: its default policy resolves.
            let _ = Policy::defaults(meta);
        }
        Ok(meta.is_ok())
    });
}

fn class_ref() -> impl Strategy<Value = ClassRef> {
    prop_oneof![
        (0usize..5).prop_map(ClassRef::Id),
        any::<usize>().prop_map(ClassRef::Id),
        prop::sample::select(vec!["a", "b", "c", "zebra", ""]).prop_map(|s| ClassRef::Name(s.into())),
    ]
}

fn exit_policy() -> impl Strategy<Value = ExitPolicy> {
    (
        prop::sample::select(vec!["E1", "E2", "E3", "", "e1"]),
        prop::option::of(prop_oneof![0f32..3.0, Just(f32::NAN), Just(f32::INFINITY), Just(-1.0f32), any::<f32>()]),
        any::<bool>(),
        prop::option::of(prop::collection::vec(class_ref(), 0..4)),
        prop::collection::btree_map(
            prop::sample::select(vec!["a", "b", "c", "0", "7", "zebra", ""]).prop_map(String::from),
            prop_oneof![0f32..3.0, Just(f32::NAN), Just(-1.0f32), any::<f32>()],
            0..3,
        ),
    )
        .prop_map(|(name, threshold, disabled, classes, class_thresholds)| ExitPolicy {
            name: name.into(),
            threshold,
            disabled,
            classes,
            class_thresholds,
        })
}

#[test]
fn exit_policies_are_read_and_resolved_without_panics() {
    let meta = ModelMeta::from_json(META).unwrap();
    let policy_json = r#"{"version": 3, "exits": [{"name": "E1", "threshold": 0.3, "classes": [2]}]}"#;
    let policy_toml = "version = 3\n[[exits]]\nname = \"E1\"\nthreshold = 0.3\nclasses = [2]\n";
    let structured = (any::<u64>(), prop::collection::vec(exit_policy(), 0..4))
        .prop_map(|(version, exits)| PolicyFile { version, exits });
    let strategy = (structured, mutated(policy_json), mutated(policy_toml));
    fuzz("exit policy (JSON, TOML, resolve)", strategy, |(file, json, toml_text)| {
        let from_json = PolicyFile::from_json(&json).ok();
        let from_toml = toml::from_str::<PolicyFile>(&toml_text).ok();
        let mut accepted = false;
        for file in [Some(file), from_json, from_toml].into_iter().flatten() {
            if let Ok(p) = Policy::resolve(&meta, &file) {
                prop_assert_eq!(p.rules.len(), 2);
                prop_assert_eq!(p.version, file.version);
                accepted = true;
            }
            // What the cloud sends an edge (JSON) reads back the same.
            let text = serde_json::to_string(&file).unwrap();
            if file
                .exits
                .iter()
                .all(|e| e.threshold.is_none_or(f32::is_finite) && e.class_thresholds.values().all(|t| t.is_finite()))
            {
                prop_assert_eq!(PolicyFile::from_json(&text).ok(), Some(file));
            }
        }
        Ok(accepted)
    });
}
