"""Dataset loaders on small files written in each format's exact layout."""
import gzip
import pickle

import numpy as np
import pytest
import scipy.io

from classynet_models import data
from classynet_models.classes import ConfigError


def write_idx(path, arr, compress=True):
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    payload = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    tr, te = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 5]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", te)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 7]))
    ds = data.load("fashion-mnist", tmp_path)
    assert ds.train.x.shape == (6, 1, 28, 28) and ds.test.x.shape == (3, 1, 28, 28)
    assert (ds.train.x[:, 0] == tr).all() and ds.test.y.tolist() == [9, 8, 7]
    assert ds.mean[0] == pytest.approx(tr.mean() / 255.0)
    assert ds.classes[9] == "Ankle boot"


def test_truncated_idx_and_missing_files_are_explained(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 4, 4)))
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):
        data.load("fashion-mnist", tmp_path)
    with pytest.raises(ConfigError, match="header says 32 bytes of data, found 27"):
        data._read_idx(tmp_path / "train-images-idx3-ubyte.gz")


def test_cifar10_python_batches(tmp_path):
    def batch(name, n, first_label):
        x = np.zeros((n, 3072), np.uint8)
        x[:, :1024] = 10  # red plane
        x[:, 1024:2048] = 20
        x[:, 2048:] = 30
        d = {b"batch_label": name.encode(), b"labels": [first_label + i for i in range(n)], b"data": x}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(d, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}", 2, i)
    batch("test_batch", 3, 0)
    ds = data.load("cifar10", tmp_path)
    assert ds.train.x.shape == (10, 3, 32, 32) and ds.test.y.tolist() == [0, 1, 2]
    assert ds.train.x[0, :, 5, 5].tolist() == [10, 20, 30]
    assert ds.classes[0] == "airplane"


def test_svhn_mat_files(tmp_path):
    x = np.zeros((32, 32, 3, 4), np.uint8)
    x[0, 1, 2, 3] = 77  # row 0, col 1, channel 2, sample 3
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3]])})
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x[..., :2], "y": np.array([[5], [10]])})
    ds = data.load("svhn", tmp_path)
    assert ds.train.x.shape == (4, 3, 32, 32)
    assert ds.train.x[3, 2, 0, 1] == 77
    assert ds.train.y.tolist() == [0, 1, 2, 3]  # label 10 stands for the digit 0
    assert ds.test.y.tolist() == [5, 0]
    assert not ds.flip
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"images": x})
    with pytest.raises(ConfigError, match="expected variables X and y"):
        data.load("svhn", tmp_path)


def test_npz(tmp_path):
    x = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 3)
    ds = data.load(f"npz:{tmp_path / 'd.npz'}")
    assert ds.train.x.shape == (8, 1, 4, 4) and ds.test.x.shape == (2, 1, 4, 4)
    assert ds.classes == ["0", "1", "2"]
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(ConfigError, match=r"expected arrays x and y, found \['images'\]"):
        data.load(f"npz:{tmp_path / 'bad.npz'}")


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        data.load("mnist")


def fake_train(n):
    return data.Dataset("fashion-mnist", [str(i) for i in range(10)],
                        data.Split(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), np.arange(n) % 10),
                        data.Split(np.zeros((2, 1, 1, 1), np.uint8), np.zeros(2, np.int64)), [0.0], [1.0], flip=False)


def test_the_validation_split_is_disjoint_from_training_and_stable_for_a_seed():
    ds = fake_train(200)
    a = data.with_validation(ds, 30, seed=7)
    # Every sample is in exactly one of the two (the images are their own index here).
    val, tr = set(a.val.x.reshape(-1).tolist()), set(a.train.x.reshape(-1).tolist())
    assert len(val) == 30 and len(tr) == 170 and not val & tr and val | tr == set(range(200))
    assert sorted(val) == a.val_indices.tolist()
    assert (a.val.y == a.val_indices % 10).all(), "labels travel with their images"
    assert data.with_validation(ds, 30, seed=7).val_indices.tolist() == a.val_indices.tolist()
    assert data.with_validation(ds, 30, seed=8).val_indices.tolist() != a.val_indices.tolist()
    assert data.with_validation(ds, 0, seed=7) is ds


def test_val_size_takes_auto_a_count_or_a_fraction():
    assert data.validation_size("auto", "fashion-mnist", 60000) == 5000
    assert data.validation_size("auto", "npz:x.npz", 1000) == 100
    assert data.validation_size("auto", "fashion-mnist", 200) == 20  # small copies get the fraction
    assert data.validation_size("300", "svhn", 1000) == 300
    assert data.validation_size("0.25", "svhn", 1000) == 250
    assert data.validation_size("0", "svhn", 1000) == 0
    for bad in ("-1", "1.5", "lots"):
        with pytest.raises(ConfigError, match="expected auto, a sample count"):
            data.validation_size(bad, "svhn", 1000)
    with pytest.raises(ConfigError, match="leave none of the 1000 to train on"):
        data.validation_size("1000", "svhn", 1000)


def test_npz_takes_separate_train_and_test_files(tmp_path):
    np.savez(tmp_path / "tr.npz", x=np.full((8, 4, 4), 7, np.uint8), y=np.arange(8) % 3)
    np.savez(tmp_path / "te.npz", x=np.full((3, 4, 4), 9, np.uint8), y=np.array([0, 1, 4]))
    ds = data.load(f"npz:{tmp_path / 'tr.npz'},{tmp_path / 'te.npz'}")
    assert len(ds.train.y) == 8 and ds.test.y.tolist() == [0, 1, 4]
    assert (ds.test.x == 9).all() and len(ds.classes) == 5
    np.savez(tmp_path / "odd.npz", x=np.zeros((3, 5, 5), np.uint8), y=np.zeros(3))
    with pytest.raises(ConfigError, match="holds"):
        data.load(f"npz:{tmp_path / 'tr.npz'},{tmp_path / 'odd.npz'}")
    with pytest.raises(ConfigError, match="not a readable .npz"):
        data.load(f"npz:{tmp_path / 'tr.npz'},{tmp_path / 'missing.npz'}")
