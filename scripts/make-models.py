#!/usr/bin/env python3
"""Builds the ONNX models the runtime's tests, quick start and benchmark use.

    .venv/bin/python scripts/make-models.py fixtures   # runtime/tests/data/* (committed), or into DIR
    .venv/bin/python scripts/make-models.py demo       # models/demo/fmnist-demo-3exit.onnx (committed)
    .venv/bin/python scripts/make-models.py bench OUT  # ResNet-110-sized 7-exit model, random weights

Every model follows docs/model-format.md. Nothing here is ClassyNet training (that is the
trainer in models/); these are small graphs built directly with onnx.helper:

* fixtures: `tiny3`, a hand-countable 3-exit model (4 classes, 1x4x4 input) whose first exit is a
  bag-of-classes exit and whose second is a plain exit, plus `tiny3-plain` (the same network with
  a plain 4-way first exit and no metadata) for the plain-ONNX path.
* demo: a 3-exit Fashion-MNIST model with fixed random convolution features whose exit heads
  are fitted in closed form (ridge regression on the pooled features, then a temperature so the
  softmax is calibrated). It is a real, accurate-enough model for the quick start, trained in
  seconds without PyTorch.
* bench: ResNet-110 for 28x28 inputs (3 stages of 18 basic blocks, 16/32/64 channels, batch
  norm folded into the convolutions) with 7 exits, random weights: the benchmark's workload.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OPSET = 17
IR_VERSION = 8
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, rng: np.random.Generator):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = rng
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def init(self, prefix: str, arr: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name("n_" + op_type), **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, out: str | None = None,
             w: np.ndarray | None = None, b: np.ndarray | None = None) -> str:
        if w is None:
            w = self.rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))
        if b is None:
            b = self.rng.normal(0, 0.05, (cout,))
        return self.op("Conv", [x, self.init("w", w), self.init("b", b)], out,
                       kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride])

    def gemm(self, x: str, fin: int, fout: int, out: str | None = None,
             w: np.ndarray | None = None, b: np.ndarray | None = None) -> str:
        if w is None:
            w = self.rng.normal(0, np.sqrt(1.0 / fin), (fout, fin))
        if b is None:
            b = self.rng.normal(0, 0.05, (fout,))
        return self.op("Gemm", [x, self.init("fc_w", w), self.init("fc_b", b)], out, transB=1)

    def head(self, x: str, c: int, k: int, out: str, w: np.ndarray | None = None) -> str:
        """Exit head: global average pooling, then a linear layer (c*k + k parameters)."""
        p = self.op("GlobalAveragePool", [x])
        f = self.op("Flatten", [p], axis=1)
        return self.gemm(f, c, k, out, w=w, b=None if w is None else np.zeros(k))

    def model(self, inputs, outputs, meta: dict | None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "classynet", inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="classynet-make-models")
        m.ir_version = IR_VERSION
        if meta is not None:
            helper.set_model_props(m, {"classynet": json.dumps(meta)})
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        onnx.checker.check_model(m, full_check=True)
        return m


def tensor(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def fixtures(out_dir: Path) -> None:
    """tiny3: input [N,1,4,4], 4 classes, exits E1 (bag, S1={2}), E2 (plain), E3 (plain, last).

    Hand count of parameters (weights only, every initializer is float32):
      segment 1: conv 1->2 3x3 (18 + 2) + exit head 2->2 (4 + 2)            = 26
      segment 2: conv 2->2 3x3 (36 + 2) + residual add + exit head 2->4 (8+4) = 50
      segment 3: conv 2->4 1x1 (8 + 4), global pool as the logits            = 12
    """
    def build(e1_width: int) -> Graph:
        g = Graph(np.random.default_rng(7))
        x = g.conv("input", 1, 2, 3)
        cut1 = g.op("Relu", [x], "cut1")
        # Exit heads that compare the two channels, so that inputs spread over classes and exits.
        e1 = np.array([[4.0, -4.0], [-4.0, 4.0]] if e1_width == 2 else [[4, -4], [-4, 4], [2, 2], [-2, -2]])
        g.head(cut1, 2, e1_width, "exit1", w=e1)
        y = g.conv(cut1, 2, 2, 3, out="conv2_out")
        y = g.op("Relu", [y])
        cut2 = g.op("Add", [y, cut1], "cut2")  # a residual link: cut1 is needed by segment 2 only
        g.head(cut2, 2, 4, "exit2", w=np.array([[3.0, -3.0], [-3.0, 3.0], [1.5, 1.5], [-1.5, -1.5]]))
        z = g.conv(cut2, 2, 4, 1)
        p = g.op("GlobalAveragePool", [z])
        g.op("Flatten", [p], "exit3", axis=1)
        return g

    meta = {
        "format_version": 1,
        "name": "tiny3",
        "classes": ["north", "east", "south", "west"],
        "input": {"shape": [1, 4, 4], "scale": 1.0 / 255.0, "mean": [0.5], "std": [0.25]},
        "exits": [
            {"name": "E1", "logits": "exit1", "cut": "cut1", "classes": [2], "bag": True, "threshold": 0.5},
            {"name": "E2", "logits": "exit2", "cut": "cut2", "classes": [0, 1, 2, 3], "bag": False, "threshold": 0.9},
            {"name": "E3", "logits": "exit3", "cut": None, "classes": [0, 1, 2, 3], "bag": False, "threshold": None},
        ],
        "fixture_note": "unknown keys like this one are kept by readers",
    }
    ins = [tensor("input", ["N", 1, 4, 4])]
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [tensor("exit1", ["N", 2]), tensor("exit2", ["N", 4]), tensor("exit3", ["N", 4])]
    onnx.save(build(2).model(ins, outs, meta), out_dir / "tiny3.onnx")
    # The same network as a plain (BranchyNet-style) early-exit model: every exit has K logits
    # and there is no metadata; users name the cuts and exits.
    outs = [tensor("exit1", ["N", 4]), tensor("exit2", ["N", 4]), tensor("exit3", ["N", 4])]
    onnx.save(build(4).model(ins, outs, None), out_dir / "tiny3-plain.onnx")
    write_small_datasets(out_dir)
    print(f"wrote {out_dir}/tiny3.onnx, tiny3-plain.onnx and dataset samples")


def write_small_datasets(out_dir: Path) -> None:
    """Small files in each real dataset format, for the Rust readers' tests."""
    rng = np.random.default_rng(11)
    imgs = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 2], dtype=np.uint8)
    # IDX, gzip-compressed, as the Fashion-MNIST package ships them.
    # mtime=0 keeps the gzip header, and so the committed bytes, the same on every run.
    with gzip.GzipFile(out_dir / "tiny-images-idx3-ubyte.gz", "wb", mtime=0) as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([5, 4, 4], ">u4").tobytes() + imgs.tobytes())
    with gzip.GzipFile(out_dir / "tiny-labels-idx1-ubyte.gz", "wb", mtime=0) as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([5], ">u4").tobytes() + labels.tobytes())
    # CIFAR-10 binary batch: per record one label byte then 3x32x32 pixels, channel-major.
    recs = []
    for i in range(3):
        px = np.full((3, 32, 32), 0, np.uint8)
        px[0], px[1], px[2] = 10 * i, 100 + i, 200 + i
        recs.append(bytes([i + 4]) + px.tobytes())
    (out_dir / "tiny-cifar.bin").write_bytes(b"".join(recs))
    # npz: float images N x H x W and int64 labels; and a compressed N x C x H x W uint8 variant.
    np.savez(out_dir / "tiny.npz", x=(imgs.astype(np.float32) / 255.0), y=labels.astype(np.int64))
    np.savez_compressed(out_dir / "tiny-nchw-u8.npz", x=imgs[:, None], y=labels.astype(np.int32))


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data[4:4 + 4 * ndim], ">u4")
    return np.frombuffer(data[4 + 4 * ndim:], np.uint8).reshape(dims)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_head(feats: np.ndarray, targets: np.ndarray, k: int, lam: float = 1e-2):
    """Ridge regression onto one-hot targets, then a temperature fitted by NLL on a grid."""
    x = np.hstack([feats, np.ones((len(feats), 1))])
    y = np.eye(k)[targets]
    w = np.linalg.solve(x.T @ x + lam * len(x) * np.eye(x.shape[1]), x.T @ y)
    z = x @ w
    best = min((-np.log(softmax(z * t)[np.arange(len(z)), targets] + 1e-12).mean(), t)
               for t in np.geomspace(0.5, 200, 60))
    t = best[1]
    return (w[:-1].T * t).astype(np.float32), (w[-1] * t).astype(np.float32)


def demo() -> None:
    import onnxruntime as ort

    data_dir = Path("/usr/share/datasets/fashion-mnist")
    xtr = read_idx(data_dir / "train-images-idx3-ubyte.gz")[:20000]
    ytr = read_idx(data_dir / "train-labels-idx1-ubyte.gz")[:20000].astype(np.int64)
    mean, std = 0.2860, 0.3530
    s1, s2 = [1, 8], [1, 8, 9, 5]  # exit-1 classes (Trouser, Bag), exit 2 adds Ankle boot, Sandal
    rng = np.random.default_rng(2024)
    g = Graph(rng)
    x = g.conv("input", 1, 16, 5)
    x = g.op("Relu", [x])
    cut1 = g.op("MaxPool", [x], "cut1", kernel_shape=[2, 2], strides=[2, 2])          # 16x14x14
    g.op("Flatten", [g.op("AveragePool", [cut1], kernel_shape=[7, 7], strides=[7, 7])], "feat1", axis=1)
    y = g.op("Relu", [g.conv(cut1, 16, 32, 3)])
    cut2 = g.op("MaxPool", [y], "cut2", kernel_shape=[2, 2], strides=[2, 2])           # 32x7x7
    g.op("Flatten", [g.op("AveragePool", [cut2], kernel_shape=[3, 3], strides=[2, 2])], "feat2", axis=1)
    z = g.op("Relu", [g.conv(cut2, 32, 64, 3)])
    g.op("Flatten", [g.op("AveragePool", [z], kernel_shape=[3, 3], strides=[2, 2])], "feat3", axis=1)
    dims = {"feat1": 16 * 2 * 2, "feat2": 32 * 3 * 3, "feat3": 64 * 3 * 3}
    ins = [tensor("input", ["N", 1, 28, 28])]
    probe = g.model(ins, [tensor(n, ["N", d]) for n, d in dims.items()], None)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    xin = ((xtr.astype(np.float32) / 255.0 - mean) / std)[:, None]
    feats = {n: np.concatenate([sess.run([n], {"input": xin[i:i + 2000]})[0] for i in range(0, len(xin), 2000)])
             for n in dims}
    norm = {}
    for n, f in feats.items():  # standardise features inside the head: fold into the linear layer
        mu, sd = f.mean(0), f.std(0) + 1e-6
        norm[n] = (mu, sd)
        feats[n] = (f - mu) / sd

    def relabel(classes):
        table = np.full(10, len(classes))
        table[classes] = np.arange(len(classes))
        return table[ytr]

    heads = {"exit1": ("feat1", relabel(s1), len(s1) + 1), "exit2": ("feat2", relabel(s2), len(s2) + 1),
             "exit3": ("feat3", ytr, 10)}
    for out, (feat, tgt, k) in heads.items():
        w, b = fit_head(feats[feat], tgt, k)
        mu, sd = norm[feat]
        w_folded = w / sd
        b_folded = b - w_folded @ mu
        g.gemm(feat, dims[feat], k, out, w=w_folded, b=b_folded)
    meta = {
        "format_version": 1,
        "name": "fmnist-demo-3exit",
        "classes": FMNIST_CLASSES,
        "input": {"shape": [1, 28, 28], "scale": 1.0 / 255.0, "mean": [mean], "std": [std]},
        "exits": [
            {"name": "E1", "logits": "exit1", "cut": "cut1", "classes": s1, "bag": True, "threshold": 0.3},
            {"name": "E2", "logits": "exit2", "cut": "cut2", "classes": s2, "bag": True, "threshold": 0.3},
            {"name": "E3", "logits": "exit3", "cut": None, "classes": list(range(10)), "bag": False,
             "threshold": None},
        ],
        "training": {"mode": "demo-ridge", "scheme": "ic", "backbone": "random-conv-3",
                     "dataset": "fashion-mnist", "train_samples": int(len(xtr)), "seed": 2024,
                     "note": "fixed random convolutions, exit heads fitted by ridge regression"},
    }
    outs = [tensor("exit1", ["N", len(s1) + 1]), tensor("exit2", ["N", len(s2) + 1]), tensor("exit3", ["N", 10])]
    out = ROOT / "models" / "demo" / "fmnist-demo-3exit.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(g.model(ins, outs, meta), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def bench(out: Path) -> None:
    """ResNet-110 (n=18 basic blocks per stage) for 1x28x28 inputs with 7 exits.

    Exits sit after residual units 2, 9, 18, 27, 36, 45 and 54 (the paper's layers 4, 18, 36, 54,
    72, 90 and 110, with layer 1 the stem convolution and unit u covering layers 2u and 2u+1).
    """
    g = Graph(np.random.default_rng(110))
    x = g.op("Relu", [g.conv("input", 1, 16, 3)])
    exit_units = [2, 9, 18, 27, 36, 45, 54]
    exits, cin, unit = [], 16, 0
    for stage, cout in enumerate([16, 32, 64]):
        for block in range(18):
            unit += 1
            stride = 2 if (stage > 0 and block == 0) else 1
            y = g.op("Relu", [g.conv(x, cin, cout, 3, stride)])
            y = g.conv(y, cout, cout, 3)
            short = x if (stride == 1 and cin == cout) else g.conv(x, cin, cout, 1, stride)
            x = g.op("Relu", [g.op("Add", [y, short])])
            cin = cout
            if unit in exit_units:
                i = len(exits) + 1
                last = unit == exit_units[-1]
                logits = g.head(x, cout, 10, f"exit{i}")
                if not last:
                    x = g.op("Identity", [x], f"cut{i}")
                exits.append({"name": f"E{i}", "logits": logits, "cut": None if last else f"cut{i}",
                              "classes": list(range(10)), "bag": False, "threshold": None if last else 0.3})
    meta = {"format_version": 1, "name": "bench-resnet110-7exit", "classes": FMNIST_CLASSES,
            "input": {"shape": [1, 28, 28], "scale": 1.0 / 255.0, "mean": [0.2860], "std": [0.3530]},
            "exits": exits, "training": {"mode": "random-weights", "backbone": "resnet110"}}
    ins = [tensor("input", ["N", 1, 28, 28])]
    outs = [tensor(e["logits"], ["N", 10]) for e in exits]
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(g.model(ins, outs, meta), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    verb = sys.argv[1] if len(sys.argv) > 1 else ""
    if verb == "fixtures" and len(sys.argv) <= 3:
        fixtures(Path(sys.argv[2]) if len(sys.argv) == 3 else ROOT / "runtime" / "tests" / "data")
    elif verb == "demo":
        demo()
    elif verb == "bench" and len(sys.argv) == 3:
        bench(Path(sys.argv[2]))
    else:
        sys.exit("usage: make-models.py fixtures [DIR] | demo | bench OUT.onnx")
