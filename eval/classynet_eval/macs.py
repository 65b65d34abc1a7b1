"""Multiply-accumulates per sample, counted from an ONNX graph (deterministic, unlike wall time).

Counted: Conv (output elements x input channels per group x kernel area), Gemm and MatMul
(output elements x the reduced dimension). Element-wise ops, pooling and BatchNorm are not
counted, as is usual for MAC figures; ClassyNet exports fold BatchNorm into the convolutions.
The batch dimension is left out, so every figure is per sample.

The cost of a sample that leaves at exit `k` is the MACs of every node needed to compute the
logits of the exits evaluated up to and including `k`: the backbone up to `k` plus each enabled
exit branch on the way (a disabled exit's branch is never run by the runtime, see
runtime/src/runner.rs).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference


class MacError(ValueError):
    pass


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    out: dict[str, list[int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        # A symbolic (batch) dimension counts as 1: figures are per sample.
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(model: onnx.ModelProto) -> list[int]:
    """MACs per sample of each node of `model.graph.node`, in graph order."""
    shapes = _shapes(model)
    macs = []
    for node in model.graph.node:
        def shape(name: str) -> list[int]:
            if name not in shapes:
                raise MacError(f"no shape known for tensor `{name}` of {node.op_type} node `{node.name}`")
            return shapes[name]
        if node.op_type == "Conv":
            out, w = shape(node.output[0]), shape(node.input[1])
            # w: [C_out, C_in / group, kH, kW]; out: [N, C_out, H, W]
            macs.append(int(np.prod(out[1:])) * int(np.prod(w[1:])))
        elif node.op_type == "Gemm":
            a = shape(node.input[0])
            k = a[0] if _attr(node, "transA", 0) else a[1]
            macs.append(int(np.prod(shape(node.output[0])[1:])) * k)
        elif node.op_type == "MatMul":
            a = shape(node.input[0])
            out = shape(node.output[0])
            per_sample = out[1:] if len(out) > 2 else out
            macs.append(int(np.prod(per_sample)) * a[-1])
        elif node.op_type in ("ConvTranspose", "ConvInteger", "QLinearConv", "QLinearMatMul", "MatMulInteger"):
            raise MacError(f"{node.op_type} (node `{node.name}`) is not counted by this MAC counter")
        else:
            macs.append(0)
    return macs


def ancestors(model: onnx.ModelProto, outputs: list[str]) -> set[int]:
    """Indices of the nodes needed to compute `outputs`."""
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    seen: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    missing = [o for o in outputs if o not in producer]
    if missing:
        raise MacError(f"no node produces {missing}")
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack.extend(producer[t] for t in model.graph.node[i].input if t in producer)
    return seen


def exit_costs(model: onnx.ModelProto, logits: list[str], enabled: list[bool]) -> list[int]:
    """MACs per sample of a sample leaving at each exit, given which exits are evaluated.

    `logits[k]` is exit k's logits output; the last exit is always evaluated.
    """
    if len(logits) != len(enabled):
        raise MacError(f"{len(logits)} exits but {len(enabled)} enabled flags")
    per_node = node_macs(model)
    costs = []
    for k in range(len(logits)):
        wanted = [logits[j] for j in range(k) if enabled[j]] + [logits[k]]
        costs.append(sum(per_node[i] for i in ancestors(model, wanted)))
    return costs


def classynet_exits(path: Path) -> tuple[onnx.ModelProto, dict]:
    """The model and its `classynet` metadata (see docs/model-format.md)."""
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if "classynet" not in meta:
        raise MacError(f"{path} has no `classynet` metadata entry")
    return model, json.loads(meta["classynet"])


def model_exit_costs(path: Path, enabled: list[bool] | None = None) -> list[int]:
    """`exit_costs` of a ClassyNet export; by default exits with a threshold are enabled."""
    model, meta = classynet_exits(path)
    exits = meta["exits"]
    if enabled is None:
        enabled = [e.get("threshold") is not None for e in exits]
    enabled = list(enabled)
    enabled[-1] = True
    return exit_costs(model, [e["logits"] for e in exits], enabled)
