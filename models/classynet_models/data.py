"""Datasets as uint8 image arrays N x C x H x W plus int64 labels.

* ``fashion-mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (/usr/share/datasets/fashion-mnist) or of ``--data-dir``.
* ``cifar10``: the "python version" pickle batches (data_batch_1..5, test_batch).
* ``svhn``: the cropped-digits ``train_32x32.mat`` / ``test_32x32.mat`` (X is H x W x C x N,
  y holds 1..10 with 10 standing for digit 0, which becomes label 0).
* ``npz:PATH``: arrays ``x`` (N x C x H x W or N x H x W, uint8) and ``y``; the first 20 % are
  the test split. ``npz:TRAIN,TEST`` takes the two splits from two files.

Validation (``--val-size``): part of the training split is held out, chosen by the run's seed,
never trained on, and used to pick thresholds (calibration) and to follow training. Default
5,000 samples for Fashion-MNIST (as in the early-exit literature's 55k/5k split), 10 % for
other datasets; ``0`` trains on everything.

Augmentation (``--augment``, training only): random crop with 2-pixel zero padding and, for
datasets where it is meaningful, a horizontal flip. Off by default.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .classes import ConfigError
from .idx import IdxError, read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Split:
    x: np.ndarray  # uint8, N x C x H x W
    y: np.ndarray  # int64, N


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split
    mean: list[float]
    std: list[float]
    flip: bool  # whether horizontal flips are label-preserving
    val: Split | None = None  # held out of `train` by `with_validation`
    val_indices: np.ndarray | None = None  # their indices in the full training split


# Samples held out for validation when --val-size is "auto": a count per dataset, else a fraction.
DEFAULT_VAL_COUNT = {"fashion-mnist": 5000}
DEFAULT_VAL_FRACTION = 0.1


def validation_size(spec: str, dataset: str, n_train: int) -> int:
    """The number of validation samples ``--val-size`` asks for: ``auto``, a count (``5000``) or a
    fraction of the training split (``0.1``)."""
    spec = str(spec).strip()
    if spec == "auto":
        count = DEFAULT_VAL_COUNT.get(dataset)
        # A small training split (a test fixture, a trimmed copy) gets the fraction instead.
        if count is None or n_train < 10 * count:
            count = round(n_train * DEFAULT_VAL_FRACTION)
        return min(count, n_train - 1) if n_train > 1 else 0
    bad = ConfigError(f"--val-size {spec!r}: expected auto, a sample count (5000) or a fraction (0.1)")
    try:
        if "." in spec:
            fraction = float(spec)
            if not 0 <= fraction < 1:
                raise bad
            n = round(n_train * fraction)
        else:
            n = int(spec)
    except ValueError:
        raise bad from None
    if n < 0:
        raise bad
    if n >= n_train:
        raise ConfigError(f"--val-size {spec}: {n} validation samples leave none of the {n_train} to train on")
    return n


def with_validation(ds: Dataset, n_val: int, seed: int) -> Dataset:
    """``ds`` with ``n_val`` training samples, chosen by ``seed``, moved to ``ds.val``."""
    if n_val <= 0:
        return ds
    n = len(ds.train.y)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])
    keep = np.ones(n, bool)
    keep[idx] = False
    return Dataset(ds.name, ds.classes, Split(ds.train.x[keep], ds.train.y[keep]), ds.test, ds.mean, ds.std, ds.flip,
                   val=Split(ds.train.x[idx], ds.train.y[idx]), val_indices=idx)


def _read_idx(path: Path) -> np.ndarray:
    try:
        return read_idx(path)
    except IdxError as e:
        raise ConfigError(str(e)) from None


def _stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    f = x.astype(np.float64) / 255.0
    return [float(v) for v in f.mean(axis=(0, 2, 3))], [float(v) for v in f.std(axis=(0, 2, 3))]


def fashion_mnist(data_dir: Path | None) -> Dataset:
    d = data_dir or FASHION_DIR
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [f for f in files if not (d / f).exists()]
    if missing:
        raise ConfigError(f"Fashion-MNIST not found in {d} (missing {', '.join(missing)}); install the Debian "
                          "package dataset-fashion-mnist (scripts/setup does) or pass --data-dir")
    xtr, ytr, xte, yte = (_read_idx(d / f) for f in files)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ConfigError(f"{d}: image and label counts differ")
    train = Split(xtr[:, None].copy(), ytr.astype(np.int64))
    mean, std = _stats(train.x)
    return Dataset("fashion-mnist", FASHION_CLASSES, train, Split(xte[:, None].copy(), yte.astype(np.int64)),
                   mean, std, flip=True)


def _cifar_batch(path: Path) -> Split:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    key = lambda k: d[k.encode()] if k.encode() in d else d[k]  # noqa: E731
    try:
        x = np.asarray(key("data"), np.uint8)
        y = np.asarray(key("labels"), np.int64)
    except KeyError as e:
        raise ConfigError(f"{path}: not a CIFAR-10 python batch (no {e} key)") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise ConfigError(f"{path}: expected data N x 3072 and N labels, found {x.shape} and {len(y)}")
    return Split(x.reshape(-1, 3, 32, 32), y)


def cifar10(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        raise ConfigError("cifar10 needs --data-dir (the folder with data_batch_1..5 and test_batch)")
    parts = [_cifar_batch(data_dir / f"data_batch_{i}") for i in range(1, 6) if (data_dir / f"data_batch_{i}").exists()]
    if not parts or not (data_dir / "test_batch").exists():
        raise ConfigError(f"{data_dir}: expected data_batch_1..5 and test_batch (CIFAR-10 python version)")
    train = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    mean, std = _stats(train.x)
    return Dataset("cifar10", CIFAR_CLASSES, train, _cifar_batch(data_dir / "test_batch"), mean, std, flip=True)


def _svhn_split(path: Path) -> Split:
    from scipy.io import loadmat

    try:
        d = loadmat(path)
    except Exception as e:  # scipy raises several types for a bad file
        raise ConfigError(f"{path}: not a readable .mat file ({e})") from None
    if "X" not in d or "y" not in d:
        raise ConfigError(f"{path}: expected variables X and y (SVHN cropped digits), found {sorted(k for k in d if not k.startswith('__'))}")
    x = np.asarray(d["X"], np.uint8)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ConfigError(f"{path}: X must be 32 x 32 x 3 x N, found {x.shape}")
    y = np.asarray(d["y"]).reshape(-1).astype(np.int64) % 10  # label 10 is digit 0
    return Split(np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y)


def svhn(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        raise ConfigError("svhn needs --data-dir (the folder with train_32x32.mat and test_32x32.mat)")
    train = _svhn_split(data_dir / "train_32x32.mat")
    mean, std = _stats(train.x)
    return Dataset("svhn", [str(i) for i in range(10)], train, _svhn_split(data_dir / "test_32x32.mat"),
                   mean, std, flip=False)


def _npz_split(path: Path) -> Split:
    try:
        with np.load(path) as d:
            if "x" not in d or "y" not in d:
                raise ConfigError(f"{path}: expected arrays x and y, found {sorted(d.files)}")
            x, y = np.asarray(d["x"]), np.asarray(d["y"]).reshape(-1).astype(np.int64)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable .npz archive ({e})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) != len(y):
        raise ConfigError(f"{path}: x must be N x C x H x W or N x H x W with N = len(y), found {x.shape}, {len(y)}")
    if x.dtype != np.uint8:
        x = np.clip(np.round(x.astype(np.float64) * (255.0 if x.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    return Split(x, y)


def npz(path: Path, test_fraction: float = 0.2, test_path: Path | None = None) -> Dataset:
    """One archive split into test (the first ``test_fraction``) and train, or two archives."""
    whole = _npz_split(path)
    if test_path is not None:
        train, test = whole, _npz_split(test_path)
        if train.x.shape[1:] != test.x.shape[1:]:
            raise ConfigError(f"{path} holds {train.x.shape[1:]} samples but {test_path} holds {test.x.shape[1:]}")
    else:
        n_test = max(1, int(len(whole.x) * test_fraction))
        train, test = Split(whole.x[n_test:], whole.y[n_test:]), Split(whole.x[:n_test], whole.y[:n_test])
    k = int(max(train.y.max(), test.y.max())) + 1
    mean, std = _stats(train.x)
    return Dataset(f"npz:{path.name}", [str(i) for i in range(k)], train, test, mean, std, flip=False)


def load(name: str, data_dir: Path | None = None) -> Dataset:
    if name == "fashion-mnist":
        return fashion_mnist(data_dir)
    if name == "cifar10":
        return cifar10(data_dir)
    if name == "svhn":
        return svhn(data_dir)
    if name.startswith("npz:"):
        train, _, test = name[4:].partition(",")
        return npz(Path(train), test_path=Path(test) if test else None)
    raise ConfigError(f"unknown dataset {name!r} (expected fashion-mnist, cifar10, svhn, npz:PATH or npz:TRAIN,TEST)")


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 N x C x H x W -> float, (x / 255 - mean) / std per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random 2-pixel-padded crop (and horizontal flip when `flip`) of a uint8 batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    if flip:
        f = torch.rand(n, generator=gen) < 0.5
        out[f] = out[f].flip(-1)
    return out
