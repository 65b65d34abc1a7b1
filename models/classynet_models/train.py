"""The training loop: seeded, resumable from checkpoints, with progress bars and a JSON log."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data as datasets
from .classes import ConfigError, ExitClasses, class_sets
from .evaluate import exit_logits, summarise
from .losses import DEFAULT_COSTS, ExitLoss, LossConfig, answerable, check_costs, exit_widths, uses_bags

PAPER_7EXIT = {"assignment": [[9], [8], [6], [1], [7], [0]], "weights": [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1],
               "thresholds": [0.3, 0.3, 0.3, 0.2, 0.2, 0.2]}
DEFAULTS = {
    "7exit": PAPER_7EXIT,
    "3exit": {"assignment": [[9, 8, 6], [1, 7, 0]], "weights": [0.3, 0.3, 0.4], "thresholds": [0.3, 0.3]},
    "base": {"assignment": [], "weights": [1.0], "thresholds": []},
}


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint and in the exported model."""

    mode: str = "cn"
    backbone: str = "resnet110"
    exits: str = "7exit"
    scheme: str = "ic"
    assignment: list[list[int]] = field(default_factory=lambda: PAPER_7EXIT["assignment"])
    weights: list[float] = field(default_factory=lambda: PAPER_7EXIT["weights"])
    thresholds: list[float] = field(default_factory=lambda: PAPER_7EXIT["thresholds"])
    costs: list[float] = field(default_factory=lambda: list(DEFAULT_COSTS))
    masking: bool = False
    dataset: str = "fashion-mnist"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "cosine"  # or "constant" (the paper's plain Adam)
    augment: bool = False
    seed: int = 0
    precision: str = "auto"  # bf16 autocast where the CPU supports it, else fp32
    # Held out of the training split (see data.validation_size): auto, a count or a fraction.
    # Runs from before the split read as "0" (they trained on everything; see `load_trained`).
    val_size: str = "auto"
    # A trained `base` run whose backbone and classifier this run starts from (frozen for
    # `epochs`, then trained whole for `finetune_epochs` at `finetune_lr`).
    init_from: str | None = None
    finetune_epochs: int = 0
    finetune_lr: float | None = None  # default: lr / 10
    # Conv layers in each early exit's head (backbones.ExitHead); runs from before read as 1.
    exit_convs: int = 1

    def exit_config(self) -> str:
        return "base" if self.mode == "base" else self.exits

    def validate(self, num_classes: int) -> ExitClasses:
        from .backbones import BACKBONES
        from .losses import MODES

        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r} (expected one of {', '.join(MODES)})")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r} (expected one of {', '.join(BACKBONES)})")
        n_exits = len(BACKBONES[self.backbone].exit_layers(self.exit_config()))
        classes = class_sets(self.assignment if self.mode != "base" else [], n_exits, num_classes, self.scheme)
        if len(self.weights) != n_exits:
            raise ConfigError(f"the exit-weight vector has {len(self.weights)} values, but {self.exit_config()} "
                              f"has {n_exits} exits")
        if len(self.thresholds) != n_exits - 1:
            raise ConfigError(f"{len(self.thresholds)} thresholds given, but {self.exit_config()} has "
                              f"{n_exits - 1} early exits")
        check_costs(tuple(self.costs))
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("epochs, batch size and learning rate must be positive")
        if self.finetune_epochs < 0 or (self.finetune_lr is not None and not self.finetune_lr > 0):
            raise ConfigError("--finetune-epochs must be 0 or more and --finetune-lr positive")
        if self.init_from is not None and self.mode == "base":
            raise ConfigError("--init-from starts the exits of a bn, cn, cn+c or cs run from a base run's backbone; "
                              "a base run has no exits to train")
        if self.finetune_epochs and self.init_from is None:
            raise ConfigError("--finetune-epochs follows --init-from (the frozen phase); without it, use --epochs")
        if self.exit_convs < 1:
            raise ConfigError(f"--exit-convs must be 1 or more (conv layers in each exit head), got {self.exit_convs}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r} (cosine or constant)")
        return classes


def bf16_available() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def use_bf16(cfg: TrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_available())


def build_model(cfg: TrainConfig, classes: ExitClasses, in_channels: int) -> torch.nn.Module:
    from .backbones import BACKBONES

    widths = exit_widths(cfg.mode, classes)
    return BACKBONES[cfg.backbone].build(cfg.exit_config(), in_channels, widths, cfg.exit_convs)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores), torch {torch.__version__}, torch threads: {torch.get_num_threads()}"


def train(cfg: TrainConfig, out: Path, data_dir: Path | None = None, progress: bool = True,
          max_minutes: float | None = None, max_steps: int | None = None) -> dict:
    """Trains (or resumes) the run in `out`. Returns the final summary.

    A checkpoint (`out/checkpoint.pt`) is written every few minutes and at every epoch end; a
    run started on a folder with a checkpoint resumes from it, and must have the same config.
    `max_minutes` (or `max_steps`, steps in this call) stops cleanly after a checkpoint so long
    runs can be split across sessions.
    """
    out.mkdir(parents=True, exist_ok=True)
    ds = load_split(cfg, data_dir)
    classes = cfg.validate(len(ds.classes))
    record_validation(ds, cfg, out)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg, classes, ds.train.x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = ExitLoss(LossConfig(cfg.mode, classes,
                                  cfg.weights, tuple(cfg.costs), cfg.thresholds, cfg.masking))  # type: ignore[arg-type]
    ckpt_path = out / "checkpoint.pt"
    epoch, step_in_epoch, elapsed = 0, 0, 0.0
    history: list[dict] = []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["config"] != asdict(cfg):
            raise ConfigError(f"{ckpt_path} was written by a different configuration; use another --out or the "
                              f"same settings (checkpoint: {json.dumps(ck['config'])})")
        model.load_state_dict(ck["model"])
        # A finished run may be kept without its optimizer state (a third of the size), as the
        # committed base run is: nothing is left to resume, and --init-from needs the weights only.
        if ck.get("optimizer") is not None:
            opt.load_state_dict(ck["optimizer"])
        elif ck["epoch"] < cfg.epochs + cfg.finetune_epochs:
            raise ConfigError(f"{ckpt_path} holds no optimizer state, so this unfinished run cannot resume; "
                              "start it again in another --out")
        epoch, step_in_epoch, elapsed, history = ck["epoch"], ck["step"], ck["elapsed"], ck["history"]
        print(f"resuming {out} at epoch {epoch + 1}, step {step_in_epoch} ({elapsed / 60:.1f} min done)")
    elif cfg.init_from is not None:
        init_from_base(model, Path(cfg.init_from), cfg, ds)
        print(f"backbone and classifier from {cfg.init_from}: frozen for {cfg.epochs} epochs"
              + (f", then {cfg.finetune_epochs} epochs of fine-tuning" if cfg.finetune_epochs else ""))
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    bf16 = use_bf16(cfg)
    model = model.to(memory_format=torch.channels_last)
    n = len(ds.train.y)
    steps = math.ceil(n / cfg.batch_size)
    epochs = cfg.epochs + cfg.finetune_epochs
    xtr = torch.from_numpy(ds.train.x)
    ytr = torch.from_numpy(ds.train.y)
    last_ckpt = time.monotonic()
    started = time.monotonic()
    first_step = epoch * steps + step_in_epoch

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "epoch": epoch, "step": step_in_epoch, "elapsed": elapsed + time.monotonic() - started,
                    "history": history}, tmp)
        tmp.replace(ckpt_path)  # atomic: a crash never leaves a half-written checkpoint

    while epoch < epochs:
        # With --init-from the backbone and the classifier stay as the base run left them (batch
        # norm statistics included) until the fine-tuning epochs.
        frozen = cfg.init_from is not None and epoch < cfg.epochs
        set_frozen(model, frozen)
        model.train()
        if frozen:
            for part in frozen_parts(model):
                part.eval()
        # Each phase has its own cosine schedule: training (or the exits alone), then fine-tuning.
        phase_start, phase_epochs, phase_lr = (
            (0, cfg.epochs, cfg.lr) if epoch < cfg.epochs
            else (cfg.epochs, cfg.finetune_epochs, cfg.finetune_lr or cfg.lr / 10))
        # The order of an epoch depends only on (seed, epoch), so a resumed run sees the same
        # batches as an uninterrupted one.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        bar = tqdm(range(step_in_epoch, steps), desc=f"{cfg.mode} epoch {epoch + 1}/{epochs}",
                   disable=not progress, unit="step", initial=step_in_epoch, total=steps)
        for s in bar:
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb = xtr[idx]
            if cfg.augment:
                xb = datasets.augment(xb, torch.Generator().manual_seed(cfg.seed * 10**7 + epoch * 10**4 + s), ds.flip)
            xb = datasets.normalise(xb, ds.mean, ds.std).contiguous(memory_format=torch.channels_last)
            g = epoch * steps + s
            in_phase = (epoch - phase_start) * steps + s
            lr = phase_lr if cfg.schedule == "constant" else \
                phase_lr * 0.5 * (1 + math.cos(math.pi * in_phase / (phase_epochs * steps)))
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outputs = model(xb)
            loss, parts = loss_fn(outputs, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_in_epoch = s + 1
            if s % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
            if time.monotonic() - last_ckpt > 300:
                save()
                last_ckpt = time.monotonic()
            done_here = (max_steps is not None and (g + 1 - first_step) >= max_steps)
            if done_here or (max_minutes is not None and (time.monotonic() - started) / 60 > max_minutes):
                save()
                print(f"stopping after {max_minutes} min as asked; run the same command to resume")
                return {"finished": False}
        bar.close()
        # Followed on the validation split where there is one: the test split stays unseen until
        # the export.
        watch = ds.val if ds.val is not None else ds.test
        logits = exit_logits(model, watch.x, ds.mean, ds.std, progress=progress)
        metrics = summarise(logits, watch.y, answerable(cfg.mode, classes), uses_bags(cfg.mode),
                            list(cfg.thresholds), ds.classes)
        epoch += 1
        step_in_epoch = 0
        history.append({"epoch": epoch, "evaluated_on": "validation" if ds.val is not None else "test",
                        "final_exit_accuracy": metrics["final_exit_accuracy"],
                        "early_exit_accuracy": metrics["early_exit_accuracy"],
                        "exit_counts": metrics["exit_counts"], "minutes": (elapsed + time.monotonic() - started) / 60})
        print(f"{cfg.mode} epoch {epoch} ({history[-1]['evaluated_on']}): final exit {100 * metrics['final_exit_accuracy']:.2f}%, "
              f"with early exits {100 * metrics['early_exit_accuracy']:.2f}%, exits {metrics['exit_counts']}")
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(history[-1]) + "\n")
        save()
        last_ckpt = time.monotonic()
    ck = torch.load(ckpt_path, weights_only=False)
    summary = {"finished": True, "epochs": epochs, "train_minutes": ck["elapsed"] / 60,
               "hardware": hardware(), "precision": "bf16 autocast" if bf16 else "fp32", "history": ck["history"]}
    (out / "train-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def frozen_parts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What --init-from keeps from the base run: every segment and the last exit's classifier."""
    return [*model.segments, model.heads[-1]]


def set_frozen(model: torch.nn.Module, frozen: bool) -> None:
    for part in frozen_parts(model):
        for p in part.parameters():
            p.requires_grad_(not frozen)


def _leaves(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that hold parameters or buffers themselves, in definition order."""
    return [m for m in module.modules()
            if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]


def init_from_base(model: torch.nn.Module, base_run: Path, cfg: TrainConfig, ds: datasets.Dataset) -> None:
    """Copies a finished `base` run's backbone into `model`'s segments and its classifier into
    the last exit. The base run must be the same backbone on the same data, and must have held
    out the same validation samples (else this run's calibration would see training samples)."""
    ck_path = base_run / "checkpoint.pt"
    if not ck_path.exists():
        raise ConfigError(f"--init-from {base_run}: no checkpoint.pt there (train the base run first)")
    ck = torch.load(ck_path, weights_only=False)
    base_cfg = config_of(ck)
    if base_cfg.mode != "base":
        raise ConfigError(f"--init-from {base_run}: a {base_cfg.mode} run; expected a base run (one exit)")
    if ck["epoch"] < base_cfg.epochs:
        raise ConfigError(f"--init-from {base_run}: trained {ck['epoch']} of {base_cfg.epochs} epochs; finish it first")
    if (base_cfg.backbone, base_cfg.dataset) != (cfg.backbone, cfg.dataset):
        raise ConfigError(f"--init-from {base_run}: it is {base_cfg.backbone} on {base_cfg.dataset}; this run is "
                          f"{cfg.backbone} on {cfg.dataset}")
    base_ds = load_split(base_cfg)
    mine = [] if ds.val_indices is None else ds.val_indices.tolist()
    theirs = [] if base_ds.val_indices is None else base_ds.val_indices.tolist()
    if mine != theirs:
        raise ConfigError(f"--init-from {base_run}: it held out other validation samples (--seed {base_cfg.seed} "
                          f"--val-size {base_cfg.val_size}); use the same --seed and --val-size, so that no sample "
                          "this run calibrates on was trained on")
    base = build_model(base_cfg, base_cfg.validate(len(ds.classes)), ds.train.x.shape[1])
    base.load_state_dict(ck["model"])
    src = [m for seg in base.segments for m in _leaves(seg)] + _leaves(base.heads[-1])
    dst = [m for seg in model.segments for m in _leaves(seg)] + _leaves(model.heads[-1])
    shapes = lambda ms: [(type(m).__name__, tuple(t.shape for t in m.state_dict().values())) for m in ms]  # noqa: E731
    if shapes(src) != shapes(dst):
        raise ConfigError(f"--init-from {base_run}: its backbone's layers do not line up with this run's "
                          f"({len(src)} against {len(dst)} layers with weights)")
    with torch.no_grad():
        for a, b in zip(src, dst):
            b.load_state_dict(a.state_dict())


def load_trained(out: Path) -> tuple[TrainConfig, torch.nn.Module, ExitClasses, datasets.Dataset]:
    """The model of a finished (or checkpointed) run, in fp32 eval mode, with its data."""
    if not (out / "checkpoint.pt").exists():
        raise ConfigError(f"{out} holds no checkpoint.pt; train it first with classynet-train train --out {out}")
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    cfg = config_of(ck)
    return cfg, *_restore(cfg, ck)


def config_of(ck: dict) -> TrainConfig:
    """The configuration a checkpoint was trained with; runs from before the validation split
    trained on the whole training split."""
    return TrainConfig(**{"val_size": "0", **ck["config"]})


def load_split(cfg: TrainConfig, data_dir: Path | None = None) -> datasets.Dataset:
    """The run's dataset with its validation split held out (the same samples for a seed)."""
    ds = datasets.load(cfg.dataset, data_dir)
    n_val = datasets.validation_size(cfg.val_size, cfg.dataset, len(ds.train.y))
    return datasets.with_validation(ds, n_val, cfg.seed)


def record_validation(ds: datasets.Dataset, cfg: TrainConfig, out: Path) -> None:
    """Writes which training samples the run holds out (`validation.json`), so that what the run
    never trained on can be checked and reused."""
    idx = [] if ds.val_indices is None else [int(i) for i in ds.val_indices]
    (out / "validation.json").write_text(json.dumps(
        {"dataset": cfg.dataset, "val_size": cfg.val_size, "seed": cfg.seed, "samples": len(idx),
         "train_samples": len(ds.train.y), "indices": idx}) + "\n")


def _restore(cfg: TrainConfig, ck: dict, data_dir: Path | None = None):
    ds = load_split(cfg, data_dir)
    classes = cfg.validate(len(ds.classes))
    if ck.get("pruning"):
        # A pruned run (classynet_models.prune) keeps its whole module: its layer widths are no
        # longer the backbone's.
        model = ck["module"]
    else:
        model = build_model(cfg, classes, ds.train.x.shape[1])
    model.load_state_dict(ck["model"])
    model.eval()
    return model, classes, ds
