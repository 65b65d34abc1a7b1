"""An existing Open Inference Protocol client (NVIDIA's tritonclient, unchanged) against the real
cloud-server and edge-agent binaries on 127.0.0.1, with the zoo's tiny model."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))
MODEL = ROOT / "models" / "zoo" / "tiny-3exit-cn.onnx"
sys.path.insert(0, str(ROOT / "models"))

from classynet_models.classes import ExitClasses  # noqa: E402
from classynet_models.data import fashion_mnist  # noqa: E402
from classynet_models.evaluate import decide  # noqa: E402


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return p, m.group(1)


@pytest.fixture(scope="module")
def servers():
    cloud, cloud_addr = start([str(BIN / "cloud-server"), "--model", str(MODEL), "--listen", "127.0.0.1:0", "--threads", "1"])
    edge, edge_addr = start([str(BIN / "edge-agent"), "--model", str(MODEL), "--partition", "E1", "--server", cloud_addr,
                             "--listen", "127.0.0.1:0", "--threads", "1"])
    yield cloud_addr, edge_addr
    for p in (edge, cloud):
        p.terminate()
        p.wait(timeout=20)


def metadata() -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(MODEL)).metadata_props}["classynet"])


def expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 on ONNX Runtime's logits, in Python (the trainer's evaluation code)."""
    sess = ort.InferenceSession(str(MODEL))
    meta = metadata()
    logits = sess.run([e["logits"] for e in meta["exits"]], {"input": x})
    classes = ExitClasses(10, tuple(tuple(e["classes"]) for e in meta["exits"]))
    return decide(logits, classes, True, [e["threshold"] for e in meta["exits"][:-1]])


@pytest.mark.parametrize("side", ["cloud", "edge"])
def test_tritonclient_talks_to_the_servers_unchanged(servers, side):
    addr = servers[0] if side == "cloud" else servers[1]
    client = grpcclient.InferenceServerClient(url=addr)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata("tiny-3exit-cn")
    assert [o.name for o in meta.outputs] == ["label", "exit", "entropy", "probability"]
    assert list(meta.inputs[0].shape) == [-1, 1, 28, 28]

    m = metadata()
    ds = fashion_mnist(None)
    x = ((ds.test.x[:64].astype(np.float32) / 255.0 - m["input"]["mean"][0]) / m["input"]["std"][0]).astype(np.float32)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outs = [grpcclient.InferRequestedOutput(n) for n in ("label", "exit", "entropy", "probability")]
    result = client.infer("tiny-3exit-cn", [inp], outputs=outs)
    label, exit_ = result.as_numpy("label"), result.as_numpy("exit")
    want_label, want_exit = expected(x)
    assert label.dtype == np.int64 and exit_.dtype == np.int32
    assert (label == want_label).all() and (exit_ == want_exit).all()
    assert ((result.as_numpy("probability") > 0) & (result.as_numpy("probability") <= 1)).all()


def test_bad_requests_get_clear_errors(servers):
    client = grpcclient.InferenceServerClient(url=servers[0])
    x = np.zeros((2, 1, 28, 27), np.float32)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match=r"\[N, 1, 28, 28\]"):
        client.infer("tiny-3exit-cn", [inp])
    with pytest.raises(InferenceServerException, match="not served here"):
        client.infer("resnet50", [inp])
