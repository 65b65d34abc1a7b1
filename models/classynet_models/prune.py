"""The paper's pruning baselines (Tables IV and V): a trained `base` network shrunk, by removing
whole filters, until it fits an edge memory budget, then fine-tuned briefly.

Two ways of choosing the filters, as the paper compares:

* ``sensitivity`` (the paper's [50], with per-filter L1 magnitude as the criterion, as Li et
  al.'s filter pruning does it): every prunable group of channels is pruned alone at 25, 50, 75 %
  and down to one channel, and the accuracy lost on validation samples is measured (the
  sensitivity analysis). A tolerance then gives each group the largest ratio whose loss stays
  within it, so layers that the network needs keep more of their filters; the tolerance is
  searched for the smallest one that meets the budget. Within a group the filters with the
  smallest L1 norm go.
* ``hrank`` (the paper's [51]): filters are ranked by the average rank of the feature maps they
  produce (after batch norm and ReLU) on validation images, and the lowest-rank filters go. As
  in HRank, every layer loses the same share of its filters; the share is searched for the
  smallest one that meets the budget.

"Group" is torch-pruning's dependency group: the channels that must go together. In a ResNet
the channels of the residual stream of a stage (every unit's output, the shortcuts, the stem)
form one group, and each unit's inner channels another. HRank's own ResNet code prunes only the
inner channels; that cannot reach the paper's smallest budgets (99.59 % reduction), so both
methods here prune the residual stream too.

The budget follows the paper's formula (section VI-B): parameters x 4 bytes x batch 16, so a
budget of B bytes allows B / 64 parameters. Parameters are counted as the runtime counts them
in the exported graph (`classynet plan --formula paper`): batch norm folds into the preceding
convolution, so each of its channels adds one bias.
"""
from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .classes import ConfigError

METHODS = ("sensitivity", "hrank")
PAPER_BATCH = 16
# Ratios the sensitivity analysis measures for every group, besides "all but one channel".
SENSITIVITY_RATIOS = (0.25, 0.5, 0.75)
_UNITS = {"": 1, "B": 1, "kB": 1e3, "KB": 1e3, "k": 1e3, "K": 1e3, "KiB": 1024, "MB": 1e6, "M": 1e6,
          "MiB": 2**20, "GB": 1e9, "G": 1e9, "GiB": 2**30}


def parse_size(text: str) -> int:
    """Bytes of `470kB`, `2.31MB`, `28.5MiB` or `1024`; the runtime's units (kB, MB: powers of 10)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"budget {text!r}: expected a number and a unit (B, kB, KiB, MB, MiB, GB, GiB), "
                          "e.g. 470kB or 2.31MB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def budget_params(budget_bytes: int, batch: int = PAPER_BATCH) -> int:
    """Parameters a budget allows by the paper's formula (params x 4 B x batch)."""
    return budget_bytes // (4 * batch)


def runtime_params(model: nn.Module) -> int:
    """Parameters of the exported graph: every weight and bias, batch norm folded into the
    convolution before it (one bias per channel, or none where the convolution had one)."""
    n = 0
    prev: nn.Module | None = None
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if not (isinstance(prev, nn.Conv2d) and prev.bias is not None):
                n += m.num_features
        elif not list(m.children()):
            n += sum(p.numel() for p in m.parameters(recurse=False))
        if not list(m.children()):
            prev = m
    return n


# ---------------------------------------------------------------------------------------------
# Groups


def _ints(idxs) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


def _graph(model: nn.Module, in_shape: tuple[int, ...]):
    import torch_pruning as tp

    example = torch.zeros(1, *in_shape)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                               output_transform=lambda out: sum(o.sum() for o in out))
    # The classifier's outputs are the classes: never pruned.
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    groups = list(dg.get_all_groups(ignored_layers=[last], root_module_types=[nn.Conv2d, nn.Linear]))
    return dg, groups


class Groups:
    """The prunable channel groups of a model, named by their root module, with for each the
    modules whose output channels they are (position j of a group is channel idxs[j] there)."""

    def __init__(self, model: nn.Module, in_shape: tuple[int, ...]):
        import torch_pruning as tp

        self.model = model
        self.dg, groups = _graph(model, in_shape)
        names = {m: n for n, m in model.named_modules()}
        out_fns = {tp.prune_conv_out_channels, tp.prune_batchnorm_out_channels, tp.prune_linear_out_channels}
        self.names: list[str] = []
        self.roots: list[tuple[nn.Module, object, list[int]]] = []
        self.outputs: list[list[tuple[str, nn.Module, list[int]]]] = []
        for g in groups:
            dep0, idx0 = g[0].dep, g[0].idxs
            self.names.append(names[dep0.target.module])
            self.roots.append((dep0.target.module, dep0.handler, _ints(idx0)))
            outs = []
            for item in g:
                dep, idxs = item.dep, item.idxs
                mod = dep.target.module
                if mod in names and dep.handler in out_fns and isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)):
                    outs.append((names[mod], mod, _ints(idxs)))
            self.outputs.append(outs)

    def __len__(self) -> int:
        return len(self.names)

    def channels(self, g: int) -> int:
        return len(self.roots[g][2])

    def prune(self, g: int, positions: list[int]) -> None:
        mod, handler, idxs = self.roots[g]
        if positions:
            self.dg.get_pruning_group(mod, handler, idxs=[idxs[j] for j in positions]).prune()


def l1_importance(groups: Groups) -> list[np.ndarray]:
    """Per group and channel position: the L1 norm of the filters producing that channel, summed
    over the group's convolutions (a residual stream is produced by several)."""
    out = []
    for g in range(len(groups)):
        score = np.zeros(groups.channels(g))
        for _, mod, idxs in groups.outputs[g]:
            if isinstance(mod, nn.Conv2d):
                w = mod.weight.detach().abs().flatten(1).sum(1).numpy()
                score += w[idxs]
        out.append(score)
    return out


@torch.no_grad()
def hrank_importance(groups: Groups, x: torch.Tensor, batch: int = 64, progress: bool = False) -> list[np.ndarray]:
    """Per group and channel position: the average rank of the channel's feature maps (after
    batch norm and ReLU) over the images `x`, averaged over the group's batch norms."""
    bns = {name: mod for g in groups.outputs for name, mod, _ in g if isinstance(mod, nn.BatchNorm2d)}
    sums = {name: torch.zeros(mod.num_features, dtype=torch.float64) for name, mod in bns.items()}
    hooks = []
    for name, mod in bns.items():
        def hook(_m, _i, y, name=name):
            maps = torch.relu(y.float())
            sums[name] += torch.linalg.matrix_rank(maps).double().sum(0)
        hooks.append(mod.register_forward_hook(hook))
    groups.model.eval()
    try:
        for i in tqdm(range(0, len(x), batch), desc="hrank: feature-map ranks", disable=not progress,
                      leave=False, unit="batch"):
            groups.model(x[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    out = []
    for g in range(len(groups)):
        score, n = np.zeros(groups.channels(g)), 0
        for name, mod, idxs in groups.outputs[g]:
            if name in sums:
                score += (sums[name] / len(x)).numpy()[idxs]
                n += 1
        out.append(score / max(n, 1))
    return out


def _lowest(importance: np.ndarray, ratio: float) -> list[int]:
    """Positions of the `ratio` share of channels with the lowest importance (one always stays)."""
    c = len(importance)
    n = min(int(math.floor(ratio * c + 1e-9)), c - 1)
    return [int(j) for j in np.argsort(importance, kind="stable")[:n]]


# ---------------------------------------------------------------------------------------------
# Sensitivity analysis


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    right = 0
    for i in range(0, len(x), batch):
        right += int((model(x[i:i + batch])[-1].argmax(1) == y[i:i + batch]).sum())
    return right / len(y)


@torch.no_grad()
def sensitivity(groups: Groups, importance: list[np.ndarray], x: torch.Tensor, y: torch.Tensor,
                progress: bool = False, partial: Path | None = None) -> dict:
    """Accuracy lost on (x, y) with each group alone pruned at each ratio, by zeroing the
    channels that pruning would remove (a zero channel contributes nothing downstream, so the
    accuracy is that of the pruned network, without rebuilding it each time).

    Each group's curve is appended to `partial` as it is measured, and a rerun with the same
    groups and samples resumes from there: the analysis is a full forward pass per group and
    ratio, tens of minutes for ResNet-110 on a small CPU."""
    base = _accuracy(groups.model, x, y)
    curves: list = []
    if partial is not None and partial.exists():
        done = json.loads(partial.read_text())
        if done.get("groups") == groups.names and done.get("samples") == len(y):
            curves = done["curves"]
    total = len(groups) * (len(SENSITIVITY_RATIOS) + 1)
    bar = tqdm(total=total, initial=len(curves) * (len(SENSITIVITY_RATIOS) + 1), desc="sensitivity analysis",
               disable=not progress, unit="eval")
    for g in range(len(curves), len(groups)):
        c = groups.channels(g)
        ratios = sorted({*(r for r in SENSITIVITY_RATIOS if math.floor(r * c) >= 1), (c - 1) / c})
        points = [(0.0, 0.0)]
        for r in ratios:
            positions = _lowest(importance[g], r)
            saved = []
            for _, mod, idxs in groups.outputs[g]:
                rows = [idxs[j] for j in positions]
                for p in (mod.weight, mod.bias):
                    if p is not None:
                        saved.append((p, rows, p.data[rows].clone()))
                        p.data[rows] = 0
            points.append((r, base - _accuracy(groups.model, x, y)))
            for p, rows, v in saved:
                p.data[rows] = v
            bar.update()
        curves.append(points)
        if partial is not None:
            partial.write_text(json.dumps({"groups": groups.names, "samples": int(len(y)), "curves": curves}) + "\n")
    bar.close()
    return {"accuracy": base, "samples": int(len(y)), "groups": groups.names, "curves": curves}


def ratio_within(curve: list[tuple[float, float]], tolerance: float) -> float:
    """The largest ratio whose measured loss (made monotone, linear between measured ratios) is
    at most `tolerance`."""
    pts, worst = [], 0.0
    for r, d in curve:
        worst = max(worst, d)
        pts.append((r, worst))
    best = 0.0
    for (r0, d0), (r1, d1) in zip(pts, pts[1:]):
        if d1 <= tolerance:
            best = r1
        elif d0 <= tolerance:
            best = r0 + (r1 - r0) * (tolerance - d0) / (d1 - d0)
            break
        else:
            break
    return best


# ---------------------------------------------------------------------------------------------
# Pruning to a budget


def apply(model: nn.Module, in_shape: tuple[int, ...], importance: list[np.ndarray], ratios: list[float],
          names: list[str]) -> nn.Module:
    """A pruned copy of `model`: each group (matched by name) loses its `ratios[g]` share of
    channels, the least important first."""
    pruned = copy.deepcopy(model)
    groups = Groups(pruned, in_shape)
    if groups.names != names:
        raise RuntimeError("the copy's channel groups differ from the original's")
    for g in range(len(groups)):
        groups.prune(g, _lowest(importance[g], ratios[g]))
    return pruned


def search(fn, target: int, lo: float, hi: float, steps: int = 24):
    """The smallest knob in [lo, hi] whose model has at most `target` parameters (parameters fall
    as the knob grows). Returns (knob, model, params)."""
    model = fn(hi)
    params = runtime_params(model)
    if params > target:
        return hi, model, params
    best = (hi, model, params)
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = fn(mid)
        params = runtime_params(model)
        if params <= target:
            hi, best = mid, (mid, model, params)
        else:
            lo = mid
    return best


@dataclass
class PruneSettings:
    method: str
    budget: str
    batch: int = PAPER_BATCH
    finetune_epochs: float = 1
    finetune_lr: float = 1e-3
    analysis_samples: int = 250
    seed: int = 0


def prune_run(base_run: Path, s: PruneSettings, out: Path, progress: bool = True, data_dir: Path | None = None) -> dict:
    """Prunes the finished base run `base_run` to the budget, fine-tunes it and writes a run
    folder that `classynet-train export` exports like any other."""
    from .train import config_of, hardware, _restore

    if s.method not in METHODS:
        raise ConfigError(f"unknown pruning method {s.method!r} (expected {' or '.join(METHODS)})")
    if s.batch < 1 or s.finetune_epochs < 0 or not s.finetune_lr > 0 or s.analysis_samples < 10:
        raise ConfigError("--batch must be positive, --finetune-epochs 0 or more, --finetune-lr positive and "
                          "--analysis-samples at least 10")
    budget_bytes = parse_size(s.budget)
    target = budget_params(budget_bytes, s.batch)
    ck_path = base_run / "checkpoint.pt"
    if not ck_path.exists():
        raise ConfigError(f"{base_run}: no checkpoint.pt there; train the base run first (scripts/train-zoo base)")
    ck = torch.load(ck_path, weights_only=False)
    cfg = config_of(ck)
    if cfg.mode != "base" or ck.get("pruning"):
        raise ConfigError(f"{base_run}: a {'pruned' if ck.get('pruning') else cfg.mode} run; pruning starts from a "
                          "finished base run (one exit)")
    if ck["epoch"] < cfg.epochs:
        raise ConfigError(f"{base_run}: trained {ck['epoch']} of {cfg.epochs} epochs; finish it first")
    started = time.monotonic()
    torch.manual_seed(s.seed)
    model, _, ds = _restore(cfg, ck, data_dir)
    in_shape = tuple(ds.train.x.shape[1:])
    if ds.val is None or len(ds.val.y) < s.analysis_samples:
        raise ConfigError(f"{base_run} holds out {0 if ds.val is None else len(ds.val.y)} validation samples; the "
                          f"analysis needs {s.analysis_samples} (--analysis-samples)")
    from .data import normalise

    xa = normalise(torch.from_numpy(ds.val.x[:s.analysis_samples]), ds.mean, ds.std)
    ya = torch.from_numpy(ds.val.y[:s.analysis_samples])
    base_params = runtime_params(model)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"method": s.method, "budget": s.budget, "budget_bytes": budget_bytes, "batch": s.batch,
                  "formula": "params x 4 B x batch", "max_params": target, "base_run": base_run.name,
                  "base_params": base_params}
    if base_params <= target:
        print(f"{base_run.name} has {base_params:,} parameters, within the {target:,} that {s.budget} allows: "
              "nothing to prune")
        pruned, knob, ratios = model, 0.0, None
        s.finetune_epochs = 0
    else:
        groups = Groups(model, in_shape)
        if s.method == "sensitivity":
            importance = l1_importance(groups)
            cache = base_run / f"sensitivity-{s.analysis_samples}.json"
            analysis = json.loads(cache.read_text()) if cache.exists() else None
            if analysis is None or analysis["groups"] != groups.names:
                analysis = sensitivity(groups, importance, xa, ya, progress, cache.with_suffix(".partial.json"))
                cache.write_text(json.dumps(analysis) + "\n")
                cache.with_suffix(".partial.json").unlink(missing_ok=True)
            curves = analysis["curves"]
            top = max(d for c in curves for _, d in c) + 1e-6

            def build(t: float):
                return apply(model, in_shape, importance, [ratio_within(c, t) for c in curves], groups.names)
            knob, pruned, params = search(build, target, 0.0, top)
            ratios = [ratio_within(c, knob) for c in curves]
            info["sensitivity"] = {"samples": analysis["samples"], "accuracy": analysis["accuracy"],
                                   "tolerance": knob}
        else:
            importance = hrank_importance(groups, xa[:256], progress=progress)

            def build(r: float):
                return apply(model, in_shape, importance, [r] * len(groups), groups.names)
            knob, pruned, params = search(build, target, 0.0, 1.0)
            ratios = [knob] * len(groups)
            info["hrank"] = {"images": int(min(256, len(xa))), "ratio": knob}
        if params > target:
            raise ConfigError(f"{s.method} cannot fit {s.budget}: with one channel left in every group the network "
                              f"still has {params:,} parameters, more than the {target:,} the budget allows")
        info["groups"] = {n: {"channels": groups.channels(g), "kept": groups.channels(g) - len(
            _lowest(importance[g], ratios[g]))} for g, n in enumerate(groups.names)}
    info["params"] = runtime_params(pruned)
    info["reduction"] = 1 - info["params"] / base_params
    info["pruned_accuracy"] = _accuracy(pruned, xa, ya)
    print(f"{s.method} to {s.budget}: {info['params']:,} parameters (at most {target:,}; base {base_params:,}, "
          f"{100 * info['reduction']:.2f} % fewer); validation accuracy before fine-tuning "
          f"{100 * info['pruned_accuracy']:.2f} % on {len(ya)} samples")
    history = finetune(pruned, ds, s, progress) if s.finetune_epochs else []
    info["finetune_epochs"], info["finetune_lr"] = s.finetune_epochs, s.finetune_lr
    pruned.eval()
    minutes = (time.monotonic() - started) / 60
    torch.save({"config": asdict(cfg), "module": pruned, "model": pruned.state_dict(), "optimizer": None,
                "epoch": cfg.epochs, "step": 0, "elapsed": minutes * 60, "history": history, "pruning": info},
               out / "checkpoint.pt")
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "pruning": asdict(s)}, indent=2) + "\n")
    (out / "pruning.json").write_text(json.dumps(info, indent=2) + "\n")
    # The same held-out samples as the base run's: calibration and the report's validation split.
    (out / "validation.json").write_text((base_run / "validation.json").read_text())
    summary = {"finished": True, "epochs": s.finetune_epochs, "train_minutes": minutes, "hardware": hardware(),
               "precision": "fp32", "history": history}
    (out / "train-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return info


def finetune(model: nn.Module, ds, s: PruneSettings, progress: bool) -> list[dict]:
    """A few epochs of the whole pruned network (Adam, cosine from `finetune_lr`, batch 128, the
    base run's training split; the validation split stays held out)."""
    from .data import normalise

    x, y = torch.from_numpy(ds.train.x), torch.from_numpy(ds.train.y)
    xv = normalise(torch.from_numpy(ds.val.x), ds.mean, ds.std)
    yv = torch.from_numpy(ds.val.y)
    opt = torch.optim.Adam(model.parameters(), lr=s.finetune_lr)
    n, bs = len(y), 128
    steps = math.ceil(n / bs)
    # A fraction of an epoch is allowed (0.5: half the training split, once).
    total = max(1, round(steps * s.finetune_epochs))
    epochs = math.ceil(total / steps)
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 1000 + epoch))
        bar = tqdm(range(min(steps, total - epoch * steps)), desc=f"fine-tune epoch {epoch + 1}/{epochs}",
                   disable=not progress, unit="step")
        for i in bar:
            g = epoch * steps + i
            for group in opt.param_groups:
                group["lr"] = s.finetune_lr * 0.5 * (1 + math.cos(math.pi * g / total))
            idx = perm[i * bs:(i + 1) * bs]
            loss = nn.functional.cross_entropy(model(normalise(x[idx], ds.mean, ds.std))[-1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        acc = _accuracy(model, xv, yv)
        history.append({"epoch": epoch + 1, "evaluated_on": "validation", "final_exit_accuracy": acc})
        print(f"fine-tune epoch {epoch + 1}: validation accuracy {100 * acc:.2f} %")
    return history
