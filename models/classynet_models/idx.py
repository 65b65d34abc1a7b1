"""The IDX format of MNIST and Fashion-MNIST: the one Python reader of the project (the trainer
and the paper reproduction both use it; the Rust side has its own in runtime/src/dataset.rs).
Free of torch, so that tools which only read data need not import it."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


class IdxError(ValueError):
    """A file that is not a well-formed IDX file of unsigned bytes; the message says why."""


def read_idx(path: Path) -> np.ndarray:
    """The array of an IDX file of unsigned bytes, gzip-compressed or not (told by its magic)."""
    path = Path(path)
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise IdxError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4]!r})")
    nd = data[3]
    if len(data) < 4 + 4 * nd:
        raise IdxError(f"{path}: IDX header names {nd} dimensions but the file ends inside it")
    dims = np.frombuffer(data[4:4 + 4 * nd], ">u4").astype(int)
    want = int(np.prod(dims))
    body = data[4 + 4 * nd:]
    if len(body) != want:
        raise IdxError(f"{path}: IDX header says {want} bytes of data, found {len(body)}")
    return np.frombuffer(body, np.uint8).reshape(dims)
