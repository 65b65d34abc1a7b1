"""Export to the runtime's ONNX model format (docs/model-format.md), verified against PyTorch.

The graph has input ``input`` [N, C, H, W], one logits output per exit (``exit1``..``exitM``)
and named cut tensors ``cut1``..``cut{M-1}`` (exported as outputs so they keep their names, then
removed from the output list). Metadata key ``classynet`` carries class names, normalisation,
exits and the training record. The export runs ONNX Runtime on 256 test samples and fails,
leaving no file behind, unless every output is within 1e-4 of PyTorch's.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch

from .classes import ConfigError, ExitClasses
from .data import normalise
from .evaluate import exit_logits, summarise
from .losses import answerable, uses_bags, uses_costs

# What `classynet-train export` calibrates for unless told otherwise (--calibrate).
DEFAULT_CALIBRATION = "precision=0.99"

OPSET = 17
IR_VERSION = 8
PARITY_SAMPLES = 256
PARITY_TOLERANCE = 1e-4


class _WithCuts(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        logits, cuts = self.net(x, with_cuts=True)
        return (*logits, *cuts)


def metadata(name: str, cfg, classes: ExitClasses, class_names: list[str], in_shape: list[int],
             mean: list[float], std: list[float], training_extra: dict | None = None) -> dict:
    m = classes.num_exits
    bags = uses_bags(cfg.mode)
    exits = []
    for i in range(m):
        last = i == m - 1
        if last or cfg.mode in ("bn", "base"):
            cls = list(range(classes.num_classes))  # class-agnostic exits answer every class
        else:
            cls = list(classes.sets[i])  # bag exits: trained set; cs: the priority set
        exits.append({"name": f"E{i + 1}", "logits": f"exit{i + 1}", "cut": None if last else f"cut{i + 1}",
                      "classes": cls, "bag": bool(bags and not last),
                      "threshold": None if last else float(cfg.thresholds[i])})
    training = {"mode": cfg.mode, "scheme": cfg.scheme, "backbone": cfg.backbone, "exit_config": cfg.exit_config(),
                "dataset": cfg.dataset, "class_sets": [list(s) for s in classes.sets],
                "assignment": cfg.assignment, "exit_weights": cfg.weights, "exit_convs": cfg.exit_convs,
                "costs": cfg.costs if uses_costs(cfg.mode) else None, "masking": cfg.masking,
                "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "schedule": cfg.schedule,
                "augment": cfg.augment, "seed": cfg.seed, "precision": cfg.precision,
                "validation": cfg.val_size, "finetune_epochs": cfg.finetune_epochs,
                # The base run by name: its path on the training machine means nothing where the
                # model is served (the run's config.json keeps the path, for resuming).
                "init_from": Path(cfg.init_from).name if cfg.init_from else None}
    training.update(training_extra or {})
    return {"format_version": 1, "name": name, "classes": class_names,
            "input": {"shape": in_shape, "scale": 1.0 / 255.0, "mean": mean, "std": std},
            "exits": exits, "training": training}


def export_model(model: torch.nn.Module, meta: dict, x_u8: np.ndarray, out: Path) -> dict:
    """Writes `out` and checks it with ONNX Runtime on `x_u8` (uint8 N x C x H x W samples)."""
    import onnxruntime as ort

    model = model.float().eval().to(memory_format=torch.contiguous_format)
    m = len(meta["exits"])
    names = [f"exit{i + 1}" for i in range(m)] + [f"cut{i + 1}" for i in range(m - 1)]
    dummy = torch.zeros(2, *meta["input"]["shape"])
    buf = io.BytesIO()
    # The wrapper must be in eval mode too: the exporter restores the wrapper's mode onto every
    # child afterwards, and a wrapper left in training mode would switch batch norm to batch
    # statistics.
    # The TorchScript exporter (dynamo=False) writes the fixed opset directly and keeps the
    # output names; the newer exporter also works but needs onnxscript and renames tensors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_WithCuts(model).eval(), (dummy,), buf, input_names=["input"], output_names=names,
                          dynamic_axes={n: {0: "N"} for n in ["input", *names]}, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    # Cuts stay named tensors inside the graph but are not outputs: the runtime cuts there.
    keep = [o for o in proto.graph.output if not o.name.startswith("cut")]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    proto.ir_version = IR_VERSION
    proto = onnx.shape_inference.infer_shapes(proto)
    onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {"classynet": json.dumps(meta)})
    x = normalise(torch.from_numpy(x_u8[:PARITY_SAMPLES]), meta["input"]["mean"], meta["input"]["std"])
    with torch.no_grad():
        want = [t.numpy() for t in model.eval()(x)]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run([f"exit{i + 1}" for i in range(m)], {"input": x.numpy()})
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    if not diff <= PARITY_TOLERANCE:
        raise ConfigError(f"export check failed: ONNX Runtime and PyTorch differ by {diff:.2e} "
                          f"(allowed {PARITY_TOLERANCE:.0e}) on {len(x)} samples; nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, out)
    return {"max_abs_diff": diff, "samples": int(len(x))}


def export_run(run: Path, out: Path, name: str | None = None, data_dir: Path | None = None,
               calibrate: str | None = DEFAULT_CALIBRATION) -> dict:
    """Exports a finished run. With `calibrate` (a `classynet calibrate --target`, or None) and a
    validation split in the run, the exits' thresholds in the model are the ones `classynet
    calibrate` chooses on that split; the trained defaults are kept beside them in the metadata,
    and the test metrics are given for both."""
    from .train import _restore, config_of

    if not (run / "checkpoint.pt").exists():
        raise ConfigError(f"{run} holds no checkpoint.pt; train it first with classynet-train train --out {run}")
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    cfg = config_of(ck)
    if ck["epoch"] < cfg.epochs:
        raise ConfigError(f"{run} has trained {ck['epoch']} of {cfg.epochs} epochs; finish it first "
                          "(rerun the same train command to resume)")
    model, classes, ds = _restore(cfg, ck, data_dir)
    logits = exit_logits(model, ds.test.x, ds.mean, ds.std)
    rule = (answerable(cfg.mode, classes), uses_bags(cfg.mode))
    default_metrics = summarise(logits, ds.test.y, *rule, list(cfg.thresholds), ds.classes)
    summary_path = run / "train-summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    extra = {"metrics": _card_metrics(default_metrics),
             "train_minutes": summary.get("train_minutes"), "hardware": summary.get("hardware")}
    if ck.get("pruning"):
        # Which channels each group kept stays in the run (pruning.json) and on the card.
        extra["pruning"] = {k: v for k, v in ck["pruning"].items() if k != "groups"}
    meta = metadata(name or out.stem, cfg, classes, ds.classes, list(ds.train.x.shape[1:]), ds.mean, ds.std, extra)
    info = export_model(model, meta, ds.test.x, out)
    thresholds: list[float | None] = list(cfg.thresholds)
    calibration = None
    if calibrate and cfg.mode != "base" and ds.val is not None and len(ds.val.y) > 0:
        calibration = calibrate_exported(out, ds.val, calibrate)
        thresholds = [e["threshold"] for e in calibration["exits"][:-1]]
        metrics = summarise(logits, ds.test.y, *rule, thresholds, ds.classes)
        for e, t in zip(meta["exits"], thresholds):
            e["threshold"] = t
        meta["training"]["metrics"] = _card_metrics(metrics)
        meta["training"]["default_thresholds"] = list(cfg.thresholds)
        meta["training"]["default_threshold_metrics"] = _card_metrics(default_metrics)
        meta["training"]["calibration"] = {
            "target": calibration["target"], "samples": calibration["samples"], "on": "the run's validation split",
            "accuracy": calibration["accuracy"], "final_exit_accuracy": calibration["final_exit_accuracy"],
            "notes": [e["note"] for e in calibration["exits"] if e.get("note")],
        }
        proto = onnx.load(str(out))
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, {"classynet": json.dumps(meta)})
        onnx.save(proto, out)
    else:
        metrics = default_metrics
    info["metrics"] = metrics
    info["default_metrics"] = default_metrics
    info["thresholds"] = thresholds
    info["calibration"] = calibration
    info["config"] = asdict(cfg)
    info["summary"] = summary
    info["pruning"] = ck.get("pruning")
    return info


def _card_metrics(m: dict) -> dict:
    return {k: m[k] for k in ("final_exit_accuracy", "per_exit_accuracy", "early_exit_accuracy", "exit_counts")}


def classynet_binary() -> Path:
    """The `classynet` tool: $CLASSYNET_BIN_DIR, then this checkout's release and debug builds,
    then PATH."""
    import os
    import shutil

    root = Path(__file__).resolve().parents[2]
    dirs = [os.environ.get("CLASSYNET_BIN_DIR"), root / "target" / "release", root / "target" / "debug"]
    for d in dirs:
        if d and (Path(d) / "classynet").is_file():
            return Path(d) / "classynet"
    found = shutil.which("classynet")
    if found:
        return Path(found)
    raise ConfigError("calibrating the exported thresholds needs the classynet tool: build it with "
                      "'cargo build --release -p classynet-cli' (scripts/setup does), set CLASSYNET_BIN_DIR, or "
                      "export with --calibrate none")


def run_tool_json(cmd: list[str], what: str) -> dict:
    """Runs one of the project's tools with --json and returns what it printed; a failure is a
    ConfigError that carries the tool's own message."""
    import subprocess

    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except OSError as e:
        raise ConfigError(f"could not run {cmd[0]}: {e}") from None
    if r.returncode != 0:
        raise ConfigError(f"{what} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def calibrate_exported(model: Path, val, target: str) -> dict:
    """Runs `classynet calibrate` on the exported model over the validation samples (written to
    a temporary .npz, uint8 as the trainer holds them) and returns its JSON report."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="classynet-calibrate-") as tmp:
        data = Path(tmp) / "validation.npz"
        np.savez(data, x=val.x, y=val.y)
        cmd = [str(classynet_binary()), "calibrate", "--model", str(model), "--dataset", f"npz:{data}",
               "--target", target, "--batch", "64", "--json"]
        return run_tool_json(cmd, "classynet calibrate")


def evaluate_cmd(run: Path | None, model_path: Path | None, thresholds: list[float] | None,
                 data_dir: Path | None) -> dict:
    from . import data as datasets

    if (run is None) == (model_path is None):
        raise ConfigError("give exactly one of --run or --model")
    if run is not None:
        from .train import load_trained

        cfg, model, classes, ds = load_trained(run)
        logits = exit_logits(model, ds.test.x, ds.mean, ds.std, progress=True)
        t = thresholds or list(cfg.thresholds)
        return summarise(logits, ds.test.y, answerable(cfg.mode, classes), uses_bags(cfg.mode), t, ds.classes)
    import onnxruntime as ort

    proto = onnx.load(str(model_path))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["classynet"])
    tr = meta.get("training", {})
    ds = datasets.load(tr.get("dataset", "fashion-mnist"), data_dir)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outs = [e["logits"] for e in meta["exits"]]
    logits = [np.concatenate(z) for z in zip(*[
        sess.run(outs, {"input": normalise(torch.from_numpy(ds.test.x[i:i + 500]), meta["input"]["mean"],
                                           meta["input"]["std"]).numpy()})
        for i in range(0, len(ds.test.y), 500)])]
    bags = any(e["bag"] for e in meta["exits"])
    sets = [tuple(e["classes"]) for e in meta["exits"]]
    classes = ExitClasses(len(meta["classes"]), tuple(sets))
    t = thresholds or [e["threshold"] for e in meta["exits"][:-1]]
    return summarise(logits, ds.test.y, classes, bags, t, meta["classes"])
