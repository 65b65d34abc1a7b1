import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture
def npz_data(tmp_path):
    """200 28x28 images in 3 classes with class-dependent brightness (learnable in a few steps)."""
    rng = np.random.default_rng(1)
    y = np.arange(200) % 3
    x = np.clip(rng.normal(60 + 70 * y[:, None, None], 25, (200, 28, 28)), 0, 255).astype(np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y)
    return path
