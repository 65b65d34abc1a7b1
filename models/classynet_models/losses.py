"""Training losses: BranchyNet's joint loss, bags of classes and the cost-sensitive matrix.

Modes (``Mode``):
  base  only the final classifier, plain cross-entropy.
  bn    BranchyNet: sum_m w_m CE(exit m, y), every exit over all K classes.
  cn    bag-of-classes: early exit m predicts S_m plus one bag logit; labels are relabelled by
        eq. 4 and the loss is the weighted sum of cross-entropies.
  cn+c  cn with the per-exit cost matrix: each sample's cross-entropy at exit m is multiplied
        by C_m[y_m, argmax] (eqs. 7-9).
  cs    the cost matrix without bags: every exit over all K classes, C_m built with S_m as the
        targeted classes.

Cost matrix (eq. 3), indexed [true, predicted] over an exit's K_m labels. A row of a targeted
class has c1 on the diagonal and c2 elsewhere; a row of a non-targeted class (or of the bag)
has c3 on the diagonal and c4 elsewhere. The paper asks for c1 < c2, c3 < c4 and
c1, c2 < c3, c4; the defaults (0.5, 1.0, 1.5, 2.0) obey that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .classes import ConfigError, ExitClasses, relabel_table

MODES = ("base", "bn", "cn", "cn+c", "cs")
DEFAULT_COSTS = (0.5, 1.0, 1.5, 2.0)


def uses_bags(mode: str) -> bool:
    return mode in ("cn", "cn+c")


def uses_costs(mode: str) -> bool:
    return mode in ("cn+c", "cs")


def exit_widths(mode: str, classes: ExitClasses) -> list[int]:
    """Logits per exit: |S_m| + 1 for bag exits, K otherwise (the last exit is always plain)."""
    k = classes.num_classes
    if uses_bags(mode):
        return [len(s) + 1 for s in classes.sets[:-1]] + [k]
    return [k] * classes.num_exits


def answerable(mode: str, classes: ExitClasses) -> ExitClasses:
    """Classes each exit may answer at inference: every class for the class-agnostic BranchyNet
    (and base), the exit's class set S_m for the class-aware modes. The exporter writes the
    same sets into the metadata, so Python's evaluation and the runtime agree."""
    if mode in ("bn", "base"):
        every = tuple(range(classes.num_classes))
        return ExitClasses(classes.num_classes, tuple(every for _ in classes.sets))
    return classes


def cost_matrix(targeted: list[bool], costs: tuple[float, float, float, float]) -> torch.Tensor:
    """Eq. 3: rows are true labels, columns predicted labels; `targeted[i]` marks row i."""
    c1, c2, c3, c4 = costs
    n = len(targeted)
    m = torch.empty(n, n)
    for i, t in enumerate(targeted):
        m[i, :] = c2 if t else c4
        m[i, i] = c1 if t else c3
    return m


def check_costs(costs: tuple[float, ...]) -> tuple[float, float, float, float]:
    if len(costs) != 4:
        raise ConfigError(f"the cost matrix needs four values c1,c2,c3,c4, got {len(costs)}")
    c1, c2, c3, c4 = costs
    if not (c1 < c2 and c3 < c4 and max(c1, c2) < min(c3, c4)):
        raise ConfigError(
            f"costs {costs} break the paper's ordering: c1 < c2, c3 < c4 and c1, c2 < c3, c4 "
            "(correct targeted < wrong targeted < correct non-targeted < wrong non-targeted)"
        )
    if min(costs) <= 0:
        raise ConfigError(f"costs must be positive, got {costs}")
    return (c1, c2, c3, c4)


@dataclass
class LossConfig:
    mode: str
    classes: ExitClasses
    weights: list[float]
    costs: tuple[float, float, float, float] = DEFAULT_COSTS
    thresholds: list[float] | None = None  # for instance-level masking
    masking: bool = False


class ExitLoss:
    """Computes the joint loss over all exits for a batch."""

    def __init__(self, cfg: LossConfig):
        if cfg.mode not in MODES:
            raise ConfigError(f"unknown training mode {cfg.mode!r} (expected one of {', '.join(MODES)})")
        m = cfg.classes.num_exits
        if len(cfg.weights) != m:
            raise ConfigError(f"the exit-weight vector has {len(cfg.weights)} values, but the model has {m} exits")
        if cfg.masking and (cfg.thresholds is None or len(cfg.thresholds) != m - 1):
            raise ConfigError(f"instance masking needs {m - 1} thresholds, one per early exit")
        self.cfg = cfg
        k = cfg.classes.num_classes
        bags = uses_bags(cfg.mode)
        self.tables = [relabel_table(s, k) if bags and i < m - 1 else None for i, s in enumerate(cfg.classes.sets)]
        self.costs: list[torch.Tensor | None] = []
        for i, s in enumerate(cfg.classes.sets):
            if not uses_costs(cfg.mode):
                self.costs.append(None)
            elif bags and i < m - 1:
                self.costs.append(cost_matrix([True] * len(s) + [False], cfg.costs))
            else:
                self.costs.append(cost_matrix([c in s for c in range(k)], cfg.costs))

    def exit_labels(self, m: int, y: torch.Tensor) -> torch.Tensor:
        """Eq. 4: the label of each sample at exit m (the bag index for classes outside S_m)."""
        t = self.tables[m]
        return y if t is None else t.to(y.device)[y]

    def per_sample(self, m: int, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Eq. 9 per sample: cross-entropy, times C_m[y_m, argmax] when the mode uses costs."""
        ym = self.exit_labels(m, y)
        ce = F.cross_entropy(logits.float(), ym, reduction="none")
        c = self.costs[m]
        if c is not None:
            pred = logits.detach().argmax(dim=1)  # eq. 7
            ce = ce * c.to(logits.device)[ym, pred]  # eq. 8
        return ce

    def exits_here(self, m: int, logits: torch.Tensor) -> torch.Tensor:
        """Which samples the inference rule would let leave at early exit m (no gradient)."""
        with torch.no_grad():
            p = F.softmax(logits.float(), dim=1)
            h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)
            ok = h < self.cfg.thresholds[m]  # type: ignore[index]
            if self.tables[m] is not None:
                ok &= p.argmax(dim=1) != logits.shape[1] - 1
            return ok

    def __call__(self, outputs: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Joint loss (eq. 10) and the mean loss of each exit, for logging."""
        if self.cfg.mode == "base":
            outputs = outputs[-1:]
        total = outputs[0].new_zeros((), dtype=torch.float32)
        alive = torch.ones(len(y), dtype=torch.bool, device=y.device)
        parts = []
        first = self.cfg.classes.num_exits - len(outputs)
        for j, logits in enumerate(outputs):
            m = first + j
            loss = self.per_sample(m, logits, y)
            if self.cfg.masking:
                # Instance-level masking: a sample that would already have left contributes
                # nothing at later exits.
                loss = loss * alive
                if m < self.cfg.classes.num_exits - 1:
                    alive = alive & ~self.exits_here(m, logits)
            mean = loss.mean()
            parts.append(float(mean.detach()))
            total = total + self.cfg.weights[m] * mean
        return total, parts
