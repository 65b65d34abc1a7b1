"""Test sets with a chosen share of one class (the paper's Fig. 9 and its "biased" sets).

A composition of `n` samples with share `s` of class `t` holds exactly round(s * n) samples of
`t`; the rest is split as evenly as possible over the other classes (the first
`(n - k) mod (classes - 1)` of them in a seeded order get one more). Within a class, samples are
taken from seeded permutations of that class's images laid end to end, so no image repeats until
every image of the class has been used once: Fashion-MNIST's test set has 1,000 images per class,
so a 90 % share of 10,000 uses each image of the target class 9 times, and a 10 % share of 10,000
is exactly the test set. The final order is shuffled with the same generator. The generator is
numpy's PCG64 seeded with (seed, target, round(share * 1000), n), so every point of a sweep is
reproducible on its own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class CompositionError(ValueError):
    pass


def _tile(pool: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """`k` members of `pool`, each used floor(k / len) or ceil(k / len) times."""
    if k == 0:
        return pool[:0]
    if len(pool) == 0:
        raise CompositionError(f"asked for {k} samples of a class that has none")
    reps = -(-k // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:k]


def composition(labels: np.ndarray, target: int, share: float, n: int, seed: int = 0) -> np.ndarray:
    """Indices into `labels` of a set of `n` samples, a `share` of them of class `target`."""
    labels = np.asarray(labels)
    if not 0.0 <= share <= 1.0:
        raise CompositionError(f"share must be within [0, 1], found {share}")
    if n <= 0:
        raise CompositionError(f"n must be positive, found {n}")
    classes = np.unique(labels)
    if target not in classes:
        raise CompositionError(f"class {target} has no samples; classes present: {classes.tolist()}")
    rng = np.random.default_rng([seed, int(target), round(share * 1000), n])
    k = round(share * n)
    parts = [_tile(np.flatnonzero(labels == target), k, rng)]
    others = [c for c in classes if c != target]
    if others:
        base, extra = divmod(n - k, len(others))
        lucky = set(rng.permutation(len(others))[:extra].tolist())
        for i, c in enumerate(others):
            parts.append(_tile(np.flatnonzero(labels == c), base + (1 if i in lucky else 0), rng))
    elif n - k:
        raise CompositionError(f"only class {target} exists, so a share of {share} cannot be met")
    idx = np.concatenate(parts)
    return rng.permutation(idx)


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> Path:
    """Writes the subset as the `npz:` dataset the runtime reads (`x`: uint8 images, `y`: labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=images[indices], y=labels[indices].astype(np.int64))
    return path
