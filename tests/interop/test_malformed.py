"""A corpus of malformed Open Inference Protocol requests against the real cloud-server and
edge-agent binaries (the zoo's resnet110-7exit-cnc, edge partition E2), built by hand as raw
protobuf messages with the KServe v2 stubs that ship with tritonclient.

Every case checks the gRPC status code and that the message says what was expected and what was
found. After the corpus each server must still be alive, still answer a good request, and hold
about the memory it held after its warm-up (VmRSS within 20 %)."""
from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))
MODEL = ROOT / "models" / "zoo" / "resnet110-7exit-cnc.onnx"
SAMPLE = [1, 28, 28]
CUT_SAMPLE = [16, 28, 28]  # the tensor after exit E2 (see docs/split-protocol.md)
CLOUD_MAX = 64  # cloud-server --max-batch default
EDGE_MAX = 1024  # edge-agent --max-queue default
EXITS = 7
DTYPES = "FP32, FP16, INT8 or UINT8"
T = 20.0  # deadline of every gRPC call, seconds
RSS_TOLERANCE = 0.20

Code = grpc.StatusCode
Input = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor


# ---------------------------------------------------------------------------------------------
# Servers


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Starts a binary that prints "... listening on ADDR" once it serves (as test_tritonclient)."""
    err = open(log, "w")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    line = p.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}\n{log.read_text()[-2000:]}")
    return p, m.group(1)


def wait_ready(stub, what: str, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while True:
        try:
            if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"{what} not ready within {limit} s")
        time.sleep(0.05)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Server:
    side: str
    proc: subprocess.Popen
    addr: str
    channel: grpc.Channel
    stub: pbg.GRPCInferenceServiceStub
    name: str
    max_samples: int
    log: Path
    rss_before: int = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""


# ---------------------------------------------------------------------------------------------
# Requests built by hand

RNG = np.random.default_rng(20261202)


def images(n: int) -> np.ndarray:
    """n normalised image-like samples, [n, 1, 28, 28] FP32."""
    return RNG.normal(0.0, 1.0, size=(n, *SAMPLE)).astype(np.float32)


def cuts(n: int) -> np.ndarray:
    """n cut-like tensors (post-ReLU activations), [n, 16, 28, 28] FP32."""
    return np.abs(RNG.normal(0.0, 1.0, size=(n, *CUT_SAMPLE))).astype(np.float32)


def set_param(params, key: str, value) -> None:
    """Sets an InferParameter from a Python value: ("kind", v) picks the choice explicitly."""
    p = params[key]
    kind, v = value if isinstance(value, tuple) else (None, value)
    if kind is None:
        kind = {bool: "bool", int: "int64", float: "double", str: "string"}[type(v)]
    if kind == "none":
        p.SetInParent()
        return
    setattr(p, f"{kind}_param", v)


def request(
    model: str,
    shape: list[int],
    dtype: str = "FP32",
    raw: bytes | None = b"",
    *,
    name: str = "input",
    version: str = "",
    params: dict | None = None,
    input_params: dict | None = None,
    outputs: list[str] | None = None,
    output_params: dict | None = None,
) -> pb.ModelInferRequest:
    """One input, one raw content (raw=None: no raw_input_contents at all)."""
    inp = Input(name=name, datatype=dtype, shape=shape)
    for k, v in (input_params or {}).items():
        set_param(inp.parameters, k, v)
    req = pb.ModelInferRequest(model_name=model, model_version=version, inputs=[inp])
    if raw is not None:
        req.raw_input_contents.append(raw)
    for k, v in (params or {}).items():
        set_param(req.parameters, k, v)
    for o in outputs or []:
        out = req.outputs.add(name=o)
        for k, v in (output_params or {}).get(o, {}).items():
            set_param(out.parameters, k, v)
    return req


def image_request(model: str, x: np.ndarray, **kw) -> pb.ModelInferRequest:
    return request(model, list(x.shape), "FP32", x.tobytes(), **kw)


def good(model: str, n: int = 1) -> pb.ModelInferRequest:
    return image_request(model, images(n))


def cut_request(model: str, x: np.ndarray, cut: str = "E2", dtype: str = "FP32", raw: bytes | None = None,
                name: str = "cut", params: dict | None = None, **kw) -> pb.ModelInferRequest:
    p = {"classynet_cut": cut, **(params or {})}
    return request(model, list(x.shape), dtype, x.tobytes() if raw is None else raw, name=name, params=p, **kw)


def answers(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dt = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}
    return {o.name: np.frombuffer(raw, dt[o.datatype]) for o, raw in zip(resp.outputs, resp.raw_output_contents)}


def failed_param(resp: pb.ModelInferResponse) -> str:
    p = resp.parameters.get("classynet_failed")
    return p.string_param if p is not None else ""


def call(stub, req, timeout: float = T):
    """(response, None) or (None, (code, details))."""
    try:
        return stub.ModelInfer(req, timeout=timeout), None
    except grpc.RpcError as e:
        return None, (e.code(), e.details())


# ---------------------------------------------------------------------------------------------
# The corpus


@dataclass
class Ctx:
    side: str
    model: str
    max_samples: int


class Err:
    """The call must fail with `code`, and its message contain every one of `substrings`."""

    def __init__(self, code: grpc.StatusCode, *substrings: str):
        self.code, self.substrings = code, substrings


@dataclass
class Ok:
    """The call must be answered; `check` looks at the answer."""
    check: Callable[[pb.ModelInferResponse, Ctx], None] | None = None


@dataclass
class Case:
    id: str
    sides: tuple[str, ...]
    build: Callable[[Ctx], tuple[pb.ModelInferRequest, Err | Ok]]
    malformed: bool = True


CASES: list[Case] = []
BOTH = ("cloud", "edge")


def case(id: str, sides=BOTH, malformed: bool = True):
    def register(fn):
        CASES.append(Case(id, tuple(sides), fn, malformed))
        return fn

    return register


def add(id: str, build, sides=BOTH, malformed: bool = True):
    CASES.append(Case(id, tuple(sides), build, malformed))


IA = Code.INVALID_ARGUMENT


def wrong_shape(ctx: Ctx, shape, sample=SAMPLE, what: str | None = None) -> Err:
    what = what or f"an image batch of model {ctx.model}"
    return Err(IA, f"has shape {shape};", what, f"takes [N, {', '.join(map(str, sample))}]",
               f"with 1 ≤ N ≤ {ctx.max_samples}")


# --- shapes: checked from the shape alone, before the bytes and before any allocation ---------

SHAPE_CASES = {
    "shape_1e9x0_empty": [1_000_000_000, 0],
    "shape_1x784": [1, 784],
    "shape_1x1x28x27": [1, 1, 28, 27],
    "shape_1x3x28x28": [1, 3, 28, 28],
    "shape_1x1x56x14_same_count": [1, 1, 56, 14],
    "shape_1x1x28x28x1_rank5": [1, 1, 28, 28, 1],
    "shape_rank5_leading": [1, 1, 1, 28, 28],
    "shape_rank3_no_batch": [1, 28, 28],
    "shape_rank1": [784],
    "shape_rank0": [],
    "shape_neg_batch": [-1, 1, 28, 28],
    "shape_neg_channel": [1, -1, 28, 28],
    "shape_neg_width": [1, 1, 28, -28],
    "shape_i64_min_batch": [-(2**63), 1, 28, 28],
    "shape_huge_inner_dims": [1, 2**40, 2**40, 28],
    "shape_zero_inner_dim": [1, 0, 28, 28],
}


def _shape_case(shape):
    def build(ctx):
        # The bytes the shape calls for where that is small, none otherwise.
        n = math.prod(shape) if all(0 <= d < 2**20 for d in shape) else 0
        return request(ctx.model, shape, "FP32", b"\0" * (4 * n)), wrong_shape(ctx, shape)

    return build


for _id, _shape in SHAPE_CASES.items():
    add(_id, _shape_case(_shape))


@case("shape_2pow60_samples_empty")
def _(ctx):
    return request(ctx.model, [2**60, 1, 28, 28], "FP32", b""), Err(
        Code.RESOURCE_EXHAUSTED, f"has {2**60} samples", f"at most {ctx.max_samples}")


@case("shape_i64_max_samples_empty")
def _(ctx):
    n = 2**63 - 1
    return request(ctx.model, [n, 1, 28, 28], "FP32", b""), Err(
        Code.RESOURCE_EXHAUSTED, f"has {n} samples", f"at most {ctx.max_samples}")


@case("shape_zero_samples")
def _(ctx):
    return request(ctx.model, [0, 1, 28, 28], "FP32", b""), Err(
        IA, "[0, 1, 28, 28]", "at least one sample")


@case("samples_over_limit_empty")
def _(ctx):
    n = ctx.max_samples + 1
    return request(ctx.model, [n, 1, 28, 28], "FP32", b""), Err(
        Code.RESOURCE_EXHAUSTED, f"has {n} samples", f"at most {ctx.max_samples}")


@case("samples_over_limit_full_bytes")
def _(ctx):
    n = ctx.max_samples + 1
    return request(ctx.model, [n, 1, 28, 28], "UINT8", b"\x80" * (n * 784)), Err(
        Code.RESOURCE_EXHAUSTED, f"has {n} samples", f"at most {ctx.max_samples}")


# --- byte counts, for every datatype read ----------------------------------------------------

INT8_OK = {"classynet_scale": 0.02, "classynet_zero_point": 0}
SIZES = {"FP32": 4, "FP16": 2, "UINT8": 1, "INT8": 1}


def _bytes_case(dtype: str, n_bytes: Callable[[int], int], shape=(1, 1, 28, 28)):
    def build(ctx):
        need = math.prod(shape) * SIZES[dtype]
        found = n_bytes(need)
        params = INT8_OK if dtype == "INT8" else None
        return request(ctx.model, list(shape), dtype, b"\x01" * found, input_params=params), Err(
            IA, f"shape {list(shape)} of {dtype} needs {need} bytes, found {found}")

    return build


for _dt in SIZES:
    add(f"bytes_{_dt}_short_by_one", _bytes_case(_dt, lambda need: need - 1))
    add(f"bytes_{_dt}_long_by_one", _bytes_case(_dt, lambda need: need + 1))
    add(f"bytes_{_dt}_empty", _bytes_case(_dt, lambda need: 0))
add("bytes_FP32_3_samples_given_for_2", _bytes_case("FP32", lambda need: need // 2 * 3, (2, 1, 28, 28)))
add("bytes_FP32_1_sample_given_for_4", _bytes_case("FP32", lambda need: need // 4, (4, 1, 28, 28)))
add("bytes_FP16_sent_as_FP32_size", _bytes_case("FP16", lambda need: need * 2))


# --- datatypes this server does not read -----------------------------------------------------

for _dt, _size in {"BF16": 2, "INT32": 4, "INT64": 8, "BYTES": 4, "BOOL": 1, "": 4, "fp32": 4, "FP64": 8,
                   "UINT16": 2, "uint8": 1, "FP32 ": 4}.items():
    def _dtype_build(ctx, _dt=_dt, _size=_size):
        return request(ctx.model, [1, 1, 28, 28], _dt, b"\0" * (784 * _size)), Err(
            IA, f'datatype "{_dt}" is not supported', f"(expected {DTYPES})")

    add(f"dtype_{_dt.strip() or 'empty'}{'_trailing_space' if _dt.endswith(' ') else ''}", _dtype_build)


# --- INT8 quantisation parameters -------------------------------------------------------------

INT8_NEEDS = "INT8 tensors need the parameters classynet_scale (> 0) and classynet_zero_point"
BAD_SCALE = "classynet_scale must be a positive, finite float32, found"


def _int8_case(params: dict, *expect):
    def build(ctx):
        return request(ctx.model, [1, 1, 28, 28], "INT8", b"\x05" * 784, input_params=params), (
            Err(*expect) if expect else Err(IA, INT8_NEEDS))

    return build


add("int8_no_params", _int8_case({}))
add("int8_scale_only", _int8_case({"classynet_scale": 0.1}))
add("int8_zero_point_only", _int8_case({"classynet_zero_point": 0}))
add("int8_scale_zero", _int8_case({"classynet_scale": 0.0, "classynet_zero_point": 0}, IA, BAD_SCALE))
add("int8_scale_negative", _int8_case({"classynet_scale": -0.5, "classynet_zero_point": 0}, IA, BAD_SCALE))
add("int8_scale_nan", _int8_case({"classynet_scale": float("nan"), "classynet_zero_point": 0}, IA, BAD_SCALE))
add("int8_scale_inf", _int8_case({"classynet_scale": float("inf"), "classynet_zero_point": 0}, IA, BAD_SCALE))
add("int8_scale_int_zero", _int8_case({"classynet_scale": 0, "classynet_zero_point": 0}, IA, BAD_SCALE))
add("int8_scale_string", _int8_case(
    {"classynet_scale": "0.1", "classynet_zero_point": 0},
    IA, "input `input` parameter `classynet_scale` must be an int64_param, uint64_param or double_param",
    "found string_param"))
add("int8_scale_bool", _int8_case(
    {"classynet_scale": True, "classynet_zero_point": 0},
    IA, "parameter `classynet_scale` must be an int64_param, uint64_param or double_param", "found bool_param"))
add("int8_zero_point_string", _int8_case(
    {"classynet_scale": 0.1, "classynet_zero_point": "0"},
    IA, "parameter `classynet_zero_point` must be an int64_param, uint64_param or double_param",
    "found string_param"))
add("int8_scale_no_value", _int8_case(
    {"classynet_scale": ("none", None), "classynet_zero_point": 0},
    IA, "parameter `classynet_scale` must be", "found no value"))
# The parameters are doubles on the wire but x = (q - zero_point) * scale is computed in FP32: a
# zero point that is not finite, or a scale that is 0 or infinite once in FP32, is a bad parameter
# (the message must name it), not bad pixel values (INT8 bytes are always finite).
add("int8_zero_point_nan", _int8_case(
    {"classynet_scale": 0.1, "classynet_zero_point": float("nan")}, IA, "classynet_zero_point"))
add("int8_zero_point_inf", _int8_case(
    {"classynet_scale": 0.1, "classynet_zero_point": float("inf")}, IA, "classynet_zero_point"))
add("int8_scale_overflows_fp32", _int8_case({"classynet_scale": 1e300, "classynet_zero_point": 0}, IA,
                                            "classynet_scale"))
add("int8_scale_underflows_fp32_to_zero", _int8_case({"classynet_scale": 1e-50, "classynet_zero_point": 0}, IA,
                                                     "classynet_scale"))


@case("int8_on_uint8_params_ignored_bad_binary_data_size")
def _(ctx):
    return request(ctx.model, [1, 1, 28, 28], "UINT8", b"\0" * 784, input_params={"binary_data_size": "784"}), Err(
        IA, "input `input` parameter `binary_data_size` must be an int64_param or uint64_param", "found string_param")


# --- typed contents ---------------------------------------------------------------------------


def _typed(ctx, dtype: str, field: str, values, shape=(1, 1, 28, 28), raw: bytes | None = None):
    req = request(ctx.model, list(shape), dtype, raw)
    getattr(req.inputs[0].contents, field).extend(values)
    req.inputs[0].contents.SetInParent()
    return req


add("typed_fp32_short", lambda ctx: (_typed(ctx, "FP32", "fp32_contents", [0.0] * 783),
                                      Err(IA, "shape [1, 1, 28, 28] needs 784 values, found 783")))
add("typed_fp32_long", lambda ctx: (_typed(ctx, "FP32", "fp32_contents", [0.0] * 785),
                                     Err(IA, "shape [1, 1, 28, 28] needs 784 values, found 785")))
add("typed_fp32_empty", lambda ctx: (_typed(ctx, "FP32", "fp32_contents", []),
                                      Err(IA, "shape [1, 1, 28, 28] needs 784 values, found 0")))
add("typed_fp32_two_samples_for_three", lambda ctx: (
    _typed(ctx, "FP32", "fp32_contents", [0.0] * 1568, shape=(3, 1, 28, 28)),
    Err(IA, "shape [3, 1, 28, 28] needs 2352 values, found 1568")))
add("typed_fp32_in_int_contents", lambda ctx: (_typed(ctx, "FP32", "int_contents", [0] * 784),
                                                Err(IA, "needs 784 values, found 0")))
add("typed_uint8_short", lambda ctx: (_typed(ctx, "UINT8", "uint_contents", [0] * 100),
                                       Err(IA, "shape [1, 1, 28, 28] needs 784 values, found 100")))
# uint_contents is uint32 on the wire; a UINT8 tensor's values must still fit in 8 bits.
add("typed_uint8_over_255", lambda ctx: (_typed(ctx, "UINT8", "uint_contents", [1000] * 784),
                                          Err(IA, "1000", "UINT8")))
add("typed_fp16", lambda ctx: (_typed(ctx, "FP16", "fp32_contents", [0.0] * 784),
                                Err(IA, "typed contents of FP16 are not supported (FP32 and UINT8 are)",
                                    "send raw_input_contents")))
add("typed_int8", lambda ctx: (_typed(ctx, "INT8", "int_contents", [0] * 784),
                                Err(IA, "typed contents of INT8 are not supported (FP32 and UINT8 are)")))
add("typed_bf16", lambda ctx: (_typed(ctx, "BF16", "fp32_contents", [0.0] * 784),
                                Err(IA, 'datatype "BF16" is not supported', DTYPES)))
add("no_contents_at_all", lambda ctx: (request(ctx.model, [1, 1, 28, 28], "FP32", None),
                                        Err(IA, "has neither raw_input_contents nor contents")))
add("typed_and_raw_contents", lambda ctx: (
    _typed(ctx, "FP32", "fp32_contents", [0.0] * 784, raw=b"\0" * 3136),
    Err(IA, "input `input` has typed contents while the request uses raw_input_contents", "send one or the other")))


# --- inputs and raw contents ------------------------------------------------------------------


@case("two_raw_contents_one_input")
def _(ctx):
    req = good(ctx.model)
    req.raw_input_contents.append(req.raw_input_contents[0])
    return req, Err(IA, "expected one raw_input_contents entry per input (1), found 2")


@case("zero_inputs_no_contents")
def _(ctx):
    return pb.ModelInferRequest(model_name=ctx.model), Err(IA, "expected 1 input (`input`), found 0")


@case("zero_inputs_one_raw_content")
def _(ctx):
    req = pb.ModelInferRequest(model_name=ctx.model, raw_input_contents=[b"\0" * 3136])
    return req, Err(IA, "expected one raw_input_contents entry per input (0), found 1")


@case("two_inputs_two_raw")
def _(ctx):
    req = good(ctx.model)
    req.inputs.append(req.inputs[0])
    req.raw_input_contents.append(req.raw_input_contents[0])
    return req, Err(IA, "expected 1 input (`input`), found 2")


@case("two_inputs_one_raw")
def _(ctx):
    req = good(ctx.model)
    req.inputs.append(req.inputs[0])
    return req, Err(IA, "expected one raw_input_contents entry per input (2), found 1")


for _name in ["x", "INPUT", "", "cut", "input "]:
    def _name_build(ctx, _name=_name):
        req = good(ctx.model)
        req.inputs[0].name = _name
        return req, Err(IA, f"unexpected input `{_name}` for an image batch of model {ctx.model} (expected `input`)")

    add(f"input_name_{_name.strip() or 'empty'}{'_trailing_space' if _name.endswith(' ') else ''}", _name_build)


# --- model name and version -------------------------------------------------------------------

for _i, _model in enumerate(["resnet50", "RESNET110-7EXIT-CNC", "resnet110-7exit-cnc ", "resnet110-7exit-cnc/1"]):
    def _model_build(ctx, _model=_model):
        req = good(ctx.model)
        req.model_name = _model
        return req, Err(Code.NOT_FOUND, f"model {_model!r}".replace("'", '"'), "is not served here",
                        f'(this server serves "{ctx.model}")')

    add(f"model_name_{_i}_{_model.strip().replace('/', '_')}", _model_build)

for _v in ["2", "latest", "0", "1.0", " 1"]:
    def _version_build(ctx, _v=_v):
        req = good(ctx.model, 1)
        req.model_version = _v
        return req, Err(Code.NOT_FOUND, f'has no version "{_v}"', '(served versions: "1")')

    add(f"model_version_{_v.strip().replace('.', '_')}{'_leading_space' if _v.startswith(' ') else ''}",
        _version_build)


# --- requested outputs -----------------------------------------------------------------------

OUTS = "label, exit, entropy, probability"
add("output_unknown_logits", lambda ctx: (
    image_request(ctx.model, images(1), outputs=["logits"]),
    Err(IA, "unexpected requested output `logits`", f"(outputs: {OUTS})")))
add("output_empty_name", lambda ctx: (
    image_request(ctx.model, images(1), outputs=["label", ""]),
    Err(IA, "unexpected requested output ``", f"(outputs: {OUTS})")))
add("output_duplicate", lambda ctx: (
    image_request(ctx.model, images(1), outputs=["label", "exit", "label"]),
    Err(IA, "output `label` is requested twice")))
add("output_classification", lambda ctx: (
    image_request(ctx.model, images(1), outputs=["label"], output_params={"label": {"classification": 3}}),
    Err(IA, "requested output `label`: the classification extension is not supported")))
add("output_binary_data_string", lambda ctx: (
    image_request(ctx.model, images(1), outputs=["entropy"], output_params={"entropy": {"binary_data": "true"}}),
    Err(IA, "requested output `entropy` parameter `binary_data` must be a bool_param, found string_param")))


# --- request parameters of the wrong type -----------------------------------------------------

PARAM_CASES = {
    "classynet_cut_int": ("classynet_cut", 2, "a string_param", "int64_param"),
    "classynet_cut_bool": ("classynet_cut", True, "a string_param", "bool_param"),
    "classynet_fingerprint_int": ("classynet_fingerprint", 7, "a string_param", "int64_param"),
    "policy_version_string": ("classynet_policy_version", "3", "an int64_param or uint64_param", "string_param"),
    "policy_version_double": ("classynet_policy_version", 3.0, "an int64_param or uint64_param", "double_param"),
    "timeout_string": ("timeout", "1000", "an int64_param or uint64_param", "string_param"),
    "timeout_double": ("timeout", 1e6, "an int64_param or uint64_param", "double_param"),
    "timeout_no_value": ("timeout", ("none", None), "an int64_param or uint64_param", "no value"),
    "priority_string": ("priority", "high", "an int64_param or uint64_param", "string_param"),
    "priority_bool": ("priority", True, "an int64_param or uint64_param", "bool_param"),
    "binary_data_output_string": ("binary_data_output", "true", "a bool_param", "string_param"),
    "binary_data_output_int": ("binary_data_output", 1, "a bool_param", "int64_param"),
}

for _id, (_key, _val, _want, _found) in PARAM_CASES.items():
    def _param_build(ctx, _key=_key, _val=_val, _want=_want, _found=_found):
        return image_request(ctx.model, images(1), params={_key: _val}), Err(
            IA, f"request parameter `{_key}` must be {_want}, found {_found}")

    add(f"param_{_id}", _param_build)


@case("param_timeout_negative")
def _(ctx):
    return image_request(ctx.model, images(1), params={"timeout": -5}), Err(
        IA, "request parameter `timeout` must be ≥ 0 µs, found -5")


@case("param_timeout_i64_min")
def _(ctx):
    return image_request(ctx.model, images(1), params={"timeout": -(2**63)}), Err(
        IA, f"must be ≥ 0 µs, found {-(2**63)}")


# --- values that are not finite ---------------------------------------------------------------


def _nonfinite(value: float, at: int, dtype: str = "FP32"):
    def build(ctx):
        x = images(1)
        x.reshape(-1)[at] = value
        if dtype == "FP16":
            req = request(ctx.model, [1, 1, 28, 28], "FP16", x.astype(np.float16).tobytes())
        else:
            req = image_request(ctx.model, x)
        shown = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return req, Err(IA, f"input `input` sample 0: element {at} is {shown}; values must be finite")

    return build


add("nan_one_sample", _nonfinite(float("nan"), 100))
add("inf_one_sample", _nonfinite(float("inf"), 0))
add("neg_inf_one_sample_last_element", _nonfinite(float("-inf"), 783))
add("fp16_inf_one_sample", _nonfinite(float("inf"), 5, "FP16"))
add("fp16_nan_one_sample", _nonfinite(float("nan"), 6, "FP16"))


@case("fp16_overflow_to_inf")
def _(ctx):
    # 65520 and above round to +inf in FP16: a client that casts 70000.0 sends an FP16 infinity.
    x = np.full((1, 1, 28, 28), 0x7C00, np.uint16)  # what float16(70000.0) is on the wire
    return request(ctx.model, [1, 1, 28, 28], "FP16", x.tobytes()), Err(IA, "element 0 is inf", "finite")


@case("nan_every_sample_of_two")
def _(ctx):
    x = images(2)
    x[:, 0, 3, 4] = np.nan
    return image_request(ctx.model, x), Err(IA, "every sample has non-finite values", "sample 0: element 88 is NaN")


def _check_one_failed(bad: int, n: int, why: str):
    def check(resp, ctx):
        a = answers(resp)
        assert list(resp.outputs[i].name for i in range(4)) == ["label", "exit", "entropy", "probability"]
        assert len(a["label"]) == n and len(a["exit"]) == n
        assert a["label"][bad] == -1 and a["exit"][bad] == -1, a
        fails = failed_param(resp)
        assert f"sample {bad}:" in fails and why in fails, fails
        for i in range(n):
            if i != bad:
                assert 0 <= a["label"][i] < 10 and 0 <= a["exit"][i] < EXITS, (i, a)
                assert f"sample {i}:" not in fails, fails

    return check


@case("nan_in_one_of_three_samples")
def _(ctx):
    x = images(3)
    x[1, 0, 0, 5] = np.nan
    return image_request(ctx.model, x), Ok(_check_one_failed(1, 3, "element 5 is NaN; values must be finite"))


@case("nan_in_one_of_three_fp16")
def _(ctx):
    x = images(3).astype(np.float16)
    x[0, 0, 27, 27] = np.nan
    return request(ctx.model, [3, 1, 28, 28], "FP16", x.tobytes()), Ok(
        _check_one_failed(0, 3, "element 783 is NaN; values must be finite"))


# --- control cases: unusual but valid -------------------------------------------------------


def _all_answered(n: int):
    def check(resp, ctx):
        a = answers(resp)
        assert len(a["label"]) == n and (a["label"] >= 0).all() and (a["exit"] >= 0).all(), a
        assert failed_param(resp) == ""

    return check


add("ok_empty_model_name_means_served", lambda ctx: (good("", 2), Ok(_all_answered(2))), malformed=False)
add("ok_version_1", lambda ctx: (
    request(ctx.model, [1, 1, 28, 28], "FP32", images(1).tobytes(), version="1"), Ok(_all_answered(1))),
    malformed=False)
add("ok_int8_int_scale", lambda ctx: (
    request(ctx.model, [2, 1, 28, 28], "INT8", b"\x05" * 1568,
            input_params={"classynet_scale": 1, "classynet_zero_point": ("uint64", 3)}), Ok(_all_answered(2))),
    malformed=False)
add("ok_fp16_raw", lambda ctx: (
    request(ctx.model, [1, 1, 28, 28], "FP16", images(1).astype(np.float16).tobytes()), Ok(_all_answered(1))),
    malformed=False)
add("ok_uint8_typed", lambda ctx: (_typed(ctx, "UINT8", "uint_contents", [17] * 784), Ok(_all_answered(1))),
    malformed=False)


def _outputs_are(names: list[str]):
    def check(resp, ctx):
        assert [o.name for o in resp.outputs] == names and len(resp.raw_output_contents) == len(names), resp

    return check


add("ok_outputs_subset_in_order", lambda ctx: (
    image_request(ctx.model, images(1), outputs=["probability", "label"]), Ok(_outputs_are(["probability", "label"]))),
    malformed=False)
add("ok_uint8_three_samples", lambda ctx: (
    request(ctx.model, [3, 1, 28, 28], "UINT8", RNG.integers(0, 256, size=3 * 784, dtype=np.uint8).tobytes()),
    Ok(_all_answered(3))), malformed=False)


# --- forwarded cut tensors (cloud only) -------------------------------------------------------

CLOUD = ("cloud",)
FINGERPRINT = hashlib.sha256(MODEL.read_bytes()).hexdigest()[:16]


def _cut_what(ctx, k: int = 2) -> str:
    return f"cut E{k} of model {ctx.model}"


add("cut_shape_1x16x28x27", lambda ctx: (
    cut_request(ctx.model, np.zeros((1, 16, 28, 27), np.float32)),
    wrong_shape(ctx, [1, 16, 28, 27], CUT_SAMPLE, _cut_what(ctx))), CLOUD)
add("cut_shape_image", lambda ctx: (
    cut_request(ctx.model, images(1)), wrong_shape(ctx, [1, 1, 28, 28], CUT_SAMPLE, _cut_what(ctx))), CLOUD)
add("cut_shape_flat", lambda ctx: (
    cut_request(ctx.model, np.zeros((2, 16 * 784), np.float32)),
    wrong_shape(ctx, [2, 16 * 784], CUT_SAMPLE, _cut_what(ctx))), CLOUD)
add("cut_shape_rank0", lambda ctx: (
    cut_request(ctx.model, np.zeros((), np.float32)), wrong_shape(ctx, [], CUT_SAMPLE, _cut_what(ctx))), CLOUD)
add("cut_shape_negative", lambda ctx: (
    request(ctx.model, [1, 16, -28, 28], "FP32", b"", name="cut", params={"classynet_cut": "E2"}),
    wrong_shape(ctx, [1, 16, -28, 28], CUT_SAMPLE, _cut_what(ctx))), CLOUD)
add("cut_zero_samples", lambda ctx: (
    request(ctx.model, [0, 16, 28, 28], "FP32", b"", name="cut", params={"classynet_cut": "E2"}),
    Err(IA, "[0, 16, 28, 28]", "at least one sample")), CLOUD)
add("cut_samples_over_max_batch", lambda ctx: (
    request(ctx.model, [CLOUD_MAX + 1, 16, 28, 28], "FP32", b"", name="cut", params={"classynet_cut": "E2"}),
    Err(Code.RESOURCE_EXHAUSTED, f"has {CLOUD_MAX + 1} samples", f"at most {CLOUD_MAX}")), CLOUD)
add("cut_2pow60_samples", lambda ctx: (
    request(ctx.model, [2**60, 16, 28, 28], "FP32", b"", name="cut", params={"classynet_cut": "E2"}),
    Err(Code.RESOURCE_EXHAUSTED, f"has {2**60} samples", f"at most {CLOUD_MAX}")), CLOUD)
add("cut_named_input", lambda ctx: (
    cut_request(ctx.model, cuts(1), name="input"),
    Err(IA, f"unexpected input `input` for {_cut_what(ctx)} (expected `cut`)")), CLOUD)
add("cut_wrong_fingerprint", lambda ctx: (
    cut_request(ctx.model, cuts(1), params={"classynet_fingerprint": "0123456789abcdef"}),
    Err(Code.FAILED_PRECONDITION, "fingerprint 0123456789abcdef", f"this server runs {FINGERPRINT}",
        "deploy matching models")), CLOUD)
add("cut_fingerprint_of_other_zoo_model", lambda ctx: (
    cut_request(ctx.model, cuts(1), params={"classynet_fingerprint": hashlib.sha256(
        (ROOT / "models" / "zoo" / "resnet110-7exit-cn.onnx").read_bytes()).hexdigest()[:16]}),
    Err(Code.FAILED_PRECONDITION, f"this server runs {FINGERPRINT}")), CLOUD)
for _cut in ["E9", "E0", "E", "", "X2", "E-1", "E2 "]:
    add(f"cut_unknown_{_cut.strip().replace('-', 'minus') or 'empty'}{'_trailing_space' if _cut.endswith(' ') else ''}",
        lambda ctx, _cut=_cut: (
            cut_request(ctx.model, cuts(1), cut=_cut),
            Err(Code.NOT_FOUND, f'cut "{_cut}" is not in model {ctx.model} (cuts E1..E{EXITS - 1})')), CLOUD)
add("cut_E7_all_exits", lambda ctx: (
    cut_request(ctx.model, cuts(1), cut="E7"),
    Err(IA, "cut E7 puts every exit on the edge; nothing is left to run here")), CLOUD)
add("cut_uint8", lambda ctx: (
    cut_request(ctx.model, cuts(1), dtype="UINT8", raw=b"\0" * (16 * 784)),
    Err(IA, f"UINT8 pixels are only accepted for image batches, not for {_cut_what(ctx)}")), CLOUD)
add("cut_int8_no_params", lambda ctx: (
    cut_request(ctx.model, cuts(1), dtype="INT8", raw=b"\0" * (16 * 784)),
    Err(IA, f"input `cut`: {INT8_NEEDS}")), CLOUD)
add("cut_fp16_short", lambda ctx: (
    cut_request(ctx.model, cuts(1), dtype="FP16", raw=b"\0" * (2 * 16 * 784 - 2)),
    Err(IA, f"shape [1, 16, 28, 28] of FP16 needs {2 * 16 * 784} bytes, found {2 * 16 * 784 - 2}")), CLOUD)
add("cut_fp32_sent_for_two_samples_as_one", lambda ctx: (
    request(ctx.model, [2, 16, 28, 28], "FP32", cuts(1).tobytes(), name="cut", params={"classynet_cut": "E2"}),
    Err(IA, f"needs {2 * 4 * 16 * 784} bytes, found {4 * 16 * 784}")), CLOUD)
add("cut_dtype_bf16", lambda ctx: (
    cut_request(ctx.model, cuts(1), dtype="BF16", raw=b"\0" * (2 * 16 * 784)),
    Err(IA, 'input `cut`: datatype "BF16" is not supported')), CLOUD)
add("cut_nan_one_sample", lambda ctx: (
    cut_request(ctx.model, np.where(np.arange(16 * 784).reshape(1, 16, 28, 28) == 42, np.nan, cuts(1)).astype(
        np.float32)),
    Err(IA, "input `cut` sample 0: element 42 is NaN; values must be finite")), CLOUD)
add("cut_policy_version_string", lambda ctx: (
    cut_request(ctx.model, cuts(1), params={"classynet_policy_version": "0"}),
    Err(IA, "request parameter `classynet_policy_version` must be an int64_param or uint64_param")), CLOUD)


@case("cut_nan_in_one_of_three", CLOUD)
def _(ctx):
    x = cuts(3)
    x[2, 7, 1, 1] = np.nan
    return cut_request(ctx.model, x, params={"classynet_fingerprint": FINGERPRINT}), Ok(
        _check_one_failed(2, 3, f"element {7 * 784 + 28 + 1} is NaN"))


add("ok_cut_E2_with_fingerprint", lambda ctx: (
    cut_request(ctx.model, cuts(2), params={"classynet_fingerprint": FINGERPRINT, "classynet_policy_version": 0}),
    Ok(_all_answered(2))), CLOUD, malformed=False)
add("ok_cut_lowercase_e2", lambda ctx: (cut_request(ctx.model, cuts(1), cut="e2"), Ok(_all_answered(1))),
    CLOUD, malformed=False)


# ---------------------------------------------------------------------------------------------
# Fixture: both servers, started once, warmed up, RSS measured


def warm_up(s: Server) -> None:
    for n in (1, 3, 16, 64, 16, 1):
        resp, err = call(s.stub, good(s.name, n))
        assert err is None, f"{s.side} warm-up with {n} samples: {err}"
    if s.side == "cloud":
        for n in (1, 16, 64):
            resp, err = call(s.stub, cut_request(s.name, cuts(n)))
            assert err is None, f"cloud cut warm-up with {n} samples: {err}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    model = str(MODEL)
    started: list[subprocess.Popen] = []
    channels: list[grpc.Channel] = []
    try:
        cloud, cloud_addr = start([str(BIN / "cloud-server"), "--model", model, "--listen", "127.0.0.1:0",
                                   "--threads", "1"], logs / "cloud.log")
        started.append(cloud)
        edge, edge_addr = start([str(BIN / "edge-agent"), "--model", model, "--partition", "E2", "--server",
                                 cloud_addr, "--listen", "127.0.0.1:0", "--threads", "1"], logs / "edge.log")
        started.append(edge)
        out = {}
        for side, proc, addr, limit in (("cloud", cloud, cloud_addr, CLOUD_MAX), ("edge", edge, edge_addr, EDGE_MAX)):
            ch = grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20),
                                                      ("grpc.max_receive_message_length", 64 << 20)])
            channels.append(ch)
            stub = pbg.GRPCInferenceServiceStub(ch)
            wait_ready(stub, side)
            name = stub.ModelMetadata(pb.ModelMetadataRequest(name=""), timeout=T).name
            out[side] = Server(side, proc, addr, ch, stub, name, limit, logs / f"{side}.log")
        for s in out.values():
            warm_up(s)
        time.sleep(0.2)
        for s in out.values():
            s.rss_before = rss_kb(s.proc.pid)
        yield out
    finally:
        for ch in channels:
            ch.close()
        for p in reversed(started):
            p.terminate()
        for p in reversed(started):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


# ---------------------------------------------------------------------------------------------
# Tests

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
PARAMS = [pytest.param(side, c, id=f"{side}-{c.id}") for side in BOTH for c in CASES if side in c.sides]


@pytest.mark.parametrize("side,case_", PARAMS)
def test_malformed_infer(servers, side, case_):
    s = servers[side]
    ctx = Ctx(side, s.name, s.max_samples)
    req, want = case_.build(ctx)
    resp, err = call(s.stub, req)
    assert s.alive(), f"{side} died on {case_.id}:\n{s.log_tail()}"
    if isinstance(want, Err):
        assert err is not None, f"{case_.id}: expected {want.code.name}, got an answer: {resp.parameters}"
        code, msg = err
        assert code == want.code, f"{case_.id}: expected {want.code.name}, got {code.name}: {msg}"
        for sub in want.substrings:
            assert sub in msg, f"{case_.id}: {sub!r} not in the message {msg!r}"
    else:
        assert err is None, f"{case_.id}: expected an answer, got {err[0].name}: {err[1]}"
        if want.check is not None:
            want.check(resp, ctx)


@pytest.mark.parametrize("side", BOTH)
def test_huge_finite_sample_does_not_spoil_its_batch(servers, side):
    """3e38 everywhere in one sample of 16: the other 15 get the answers they get alone."""
    s = servers[side]
    x = images(16)
    bad = 7
    x[bad] = 3e38
    good15 = np.delete(x, bad, axis=0)
    ref, err = call(s.stub, image_request(s.name, good15))
    assert err is None, err
    resp, err = call(s.stub, image_request(s.name, x))
    assert s.alive(), s.log_tail()
    assert err is None, f"expected an answer, got {err}"
    a, r = answers(resp), answers(ref)
    assert len(a["label"]) == 16
    keep = [i for i in range(16) if i != bad]
    assert (a["label"][keep] == r["label"]).all() and (a["exit"][keep] == r["exit"]).all(), (a, r)
    assert np.allclose(a["entropy"][keep], r["entropy"], rtol=1e-4, atol=1e-5)
    assert (a["label"][keep] >= 0).all() and (a["exit"][keep] >= 0).all()
    fails = failed_param(resp)
    for i in keep:
        assert f"sample {i}:" not in fails, fails
    if a["label"][bad] == -1:
        assert f"sample {bad}:" in fails, fails
    else:
        assert 0 <= a["label"][bad] < 10 and 0 <= a["exit"][bad] < EXITS


def test_mixed_shape_batch_isolation_on_the_edge(servers):
    """15 good single-sample requests and one [1,1,28,27] at once: the bad one alone is refused."""
    s = servers["edge"]
    reqs = [good(s.name) for _ in range(15)]
    bad = request(s.name, [1, 1, 28, 27], "FP32", images(1)[..., :27].tobytes())
    futures = [s.stub.ModelInfer.future(r, timeout=T) for r in reqs[:8]]
    bad_future = s.stub.ModelInfer.future(bad, timeout=T)
    futures += [s.stub.ModelInfer.future(r, timeout=T) for r in reqs[8:]]
    for i, f in enumerate(futures):
        resp = f.result()  # raises the RpcError if refused
        a = answers(resp)
        assert len(a["label"]) == 1 and a["label"][0] >= 0 and a["exit"][0] >= 0, (i, a)
    with pytest.raises(grpc.RpcError) as e:
        bad_future.result()
    assert e.value.code() == Code.INVALID_ARGUMENT
    assert "[1, 1, 28, 27]" in e.value.details() and "[N, 1, 28, 28]" in e.value.details()
    assert s.alive()


@pytest.mark.parametrize("side", BOTH)
def test_not_protobuf(servers, side):
    s = servers[side]
    raw = s.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff\x0f", timeout=T)
    assert e.value.code() == Code.INTERNAL, e.value.details()
    assert "decode" in e.value.details().lower(), e.value.details()
    assert s.alive()


@pytest.mark.parametrize("side", BOTH)
def test_message_over_the_size_limit(servers, side):
    """A message bigger than the largest acceptable request is refused by the gRPC layer."""
    s = servers[side]
    size = 5 << 20
    req = request(s.name, [1, 1, 28, 28], "FP32", b"\0" * size)
    resp, err = call(s.stub, req)
    assert err is not None, "an over-sized message was answered"
    assert err[0] in (Code.RESOURCE_EXHAUSTED, Code.OUT_OF_RANGE), err
    assert re.search(r"too large|larger than|limit|exceed", err[1], re.I), err
    assert s.alive()


@pytest.mark.parametrize("kind", ["int64", "uint64"])
@pytest.mark.parametrize("side", BOTH)
def test_deadline_in_the_timeout_parameter(servers, side, kind):
    """Triton's `timeout` parameter of 1 µs (both integer kinds are accepted by the server's
    parameter check): the deadline has passed before the batch runs."""
    s = servers[side]
    resp, err = call(s.stub, image_request(s.name, images(1), params={"timeout": (kind, 1)}))
    assert err is not None and err[0] == Code.DEADLINE_EXCEEDED, err
    assert s.alive()


META_CASES = [
    ("name_unknown", "resnet50", "", Code.NOT_FOUND, ['model "resnet50" is not served here']),
    ("name_case", "RESNET110-7EXIT-CNC", "", Code.NOT_FOUND, ["is not served here"]),
    ("version_2", None, "2", Code.NOT_FOUND, ['has no version "2"', '(served versions: "1")']),
    ("version_latest", None, "latest", Code.NOT_FOUND, ['has no version "latest"']),
    ("version_negative", None, "-1", Code.NOT_FOUND, ['has no version "-1"']),
    ("name_and_version_bad", "x", "9", Code.NOT_FOUND, ['model "x" is not served here']),
]


@pytest.mark.parametrize("side", BOTH)
@pytest.mark.parametrize("id_,name,version,code,subs", META_CASES, ids=[c[0] for c in META_CASES])
def test_model_metadata_bad_name_or_version(servers, side, id_, name, version, code, subs):
    s = servers[side]
    with pytest.raises(grpc.RpcError) as e:
        s.stub.ModelMetadata(pb.ModelMetadataRequest(name=s.name if name is None else name, version=version),
                             timeout=T)
    assert e.value.code() == code, e.value.details()
    for sub in subs:
        assert sub in e.value.details(), e.value.details()


@pytest.mark.parametrize("side", BOTH)
@pytest.mark.parametrize("id_,name,version,code,subs", META_CASES, ids=[c[0] for c in META_CASES])
def test_model_ready_bad_name_or_version(servers, side, id_, name, version, code, subs):
    s = servers[side]
    r = s.stub.ModelReady(pb.ModelReadyRequest(name=s.name if name is None else name, version=version), timeout=T)
    assert r.ready is False


@pytest.mark.parametrize("side", BOTH)
def test_model_metadata_and_ready_good(servers, side):
    s = servers[side]
    for name, version in ((s.name, ""), (s.name, "1"), ("", "")):
        meta = s.stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=T)
        assert meta.name == s.name and list(meta.inputs[0].shape) == [-1, 1, 28, 28]
        assert s.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=T).ready


@pytest.mark.parametrize("side", BOTH)
def test_alive_answering_and_memory_after_the_corpus(servers, side):
    """Runs last (file order): the corpus left the server alive, answering, and its memory flat."""
    s = servers[side]
    assert s.alive(), f"{side} is gone:\n{s.log_tail()}"
    assert s.stub.ServerLive(pb.ServerLiveRequest(), timeout=T).live
    assert s.stub.ServerReady(pb.ServerReadyRequest(), timeout=T).ready
    for n in (1, 16):
        resp, err = call(s.stub, good(s.name, n))
        assert err is None, err
        a = answers(resp)
        assert len(a["label"]) == n and (a["label"] >= 0).all()
    time.sleep(0.2)
    after = rss_kb(s.proc.pid)
    print(f"\n{side} VmRSS after warm-up {s.rss_before} kB, after the corpus {after} kB "
          f"({(after - s.rss_before) / s.rss_before:+.1%})")
    assert abs(after - s.rss_before) <= RSS_TOLERANCE * s.rss_before, (side, s.rss_before, after)
