"""Evaluation with the inference rule of the runtime (Algorithm 1): per-exit accuracy, the exit
distribution per class, and accuracy with early exits on at given thresholds."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from .classes import ExitClasses


@torch.no_grad()
def exit_logits(model: torch.nn.Module, x_u8: np.ndarray, mean, std, batch: int = 500,
                progress: bool = False, desc: str = "evaluate") -> list[np.ndarray]:
    from .data import normalise

    model.eval()
    outs: list[list[np.ndarray]] = []
    it = range(0, len(x_u8), batch)
    for i in tqdm(it, desc=desc, disable=not progress, leave=False, unit="batch"):
        xb = normalise(torch.from_numpy(x_u8[i:i + batch]), mean, std)
        logits = model(xb)
        if not outs:
            outs = [[] for _ in logits]
        for j, z in enumerate(logits):
            outs[j].append(z.float().numpy())
    return [np.concatenate(o) for o in outs]


def decide(logits: list[np.ndarray], classes: ExitClasses, bags: bool, thresholds: list[float | None]):
    """Algorithm 1 over a whole set: returns (label, exit index) arrays."""
    n = len(logits[0])
    label = np.full(n, -1, np.int64)
    where = np.full(n, -1, np.int64)
    alive = np.ones(n, bool)
    m_total = len(logits)
    for m, z in enumerate(logits):
        last = m == m_total - 1
        z64 = z.astype(np.float64)
        p = np.exp(z64 - z64.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        h = -(p * np.log(np.clip(p, 1e-300, None))).sum(1)
        a = p.argmax(1)
        is_bag = bags and not last
        cls = np.array(classes.sets[m] + ((-1,) if is_bag else ()), np.int64)[a] if is_bag else a
        if last:
            ok = alive.copy()
        else:
            t = thresholds[m]
            ok = alive & (t is not None) & (h < (t if t is not None else 0)) & (cls >= 0)
            ok &= np.isin(cls, classes.sets[m])
        label[ok] = cls[ok]
        where[ok] = m
        alive &= ~ok
    return label, where


def summarise(logits: list[np.ndarray], y: np.ndarray, classes: ExitClasses, bags: bool,
              thresholds: list[float | None], class_names: list[str]) -> dict:
    """Metrics a model card reports."""
    k = classes.num_classes
    m_total = len(logits)
    per_exit_acc = []
    for m, z in enumerate(logits):
        a = z.argmax(1)
        if bags and m < m_total - 1:
            table = np.full(k, len(classes.sets[m]), np.int64)
            table[list(classes.sets[m])] = np.arange(len(classes.sets[m]))
            per_exit_acc.append(float((a == table[y]).mean()))  # accuracy on the exit's own labels
        else:
            per_exit_acc.append(float((a == y).mean()))
    label, where = decide(logits, classes, bags, thresholds)
    dist = np.zeros((m_total, k), np.int64)
    np.add.at(dist, (where, y), 1)
    exit_correct = [int(((where == m) & (label == y)).sum()) for m in range(m_total)]
    return {
        "final_exit_accuracy": float((logits[-1].argmax(1) == y).mean()),
        "per_exit_accuracy": per_exit_acc,
        "early_exit_accuracy": float((label == y).mean()),
        "exit_counts": [int((where == m).sum()) for m in range(m_total)],
        "exit_correct": exit_correct,
        "exit_distribution_per_class": {class_names[c]: [int(v) for v in dist[:, c]] for c in range(k)},
        "samples": int(len(y)),
    }
