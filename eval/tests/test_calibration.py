"""The reproduction calibrates every model with early exits to one target on the zoo's held-out
training images before it measures anything, and runs each with the policy it wrote."""
import json
import os
from pathlib import Path

from classynet_eval import reproduce
from classynet_eval.binaries import Bins, classynet_run

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))


def study(tmp_path, monkeypatch, validation: Path | None, trained_with_split: bool):
    if validation is not None:
        monkeypatch.setattr(reproduce, "VALIDATION", validation)
    else:
        monkeypatch.setattr(reproduce, "VALIDATION", tmp_path / "absent" / "validation.json")
    real_meta = reproduce._meta

    def meta(path):
        # Stand in for files trained with the split (as the zoo's are) or without it (as a model
        # trained on the whole training set is), whatever the zoo holds today.
        m = json.loads(real_meta(path))
        training = m.setdefault("training", {})
        if trained_with_split:
            training["validation"] = "auto"
        else:
            training.pop("validation", None)
        return json.dumps(m)

    monkeypatch.setattr(reproduce, "_meta", meta)
    s = reproduce.Settings.make(quick=True)
    return reproduce.Study(s, Bins(BIN_DIR), tmp_path / "out", reproduce.FASHION_DIR, tmp_path / "work")


def test_models_are_calibrated_on_the_split_and_served_with_their_policy(tmp_path, monkeypatch):
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"indices": list(range(0, 6000, 20))}))  # 300 training images
    st = study(tmp_path, monkeypatch, validation, trained_with_split=True)
    info = st.calibrate()
    assert "skipped" not in info and info["target"] == "precision=0.99"
    assert set(info["models"]) == {"bn", "bn+gate", "cs-ee", "cn", "cn+c"}
    for key, got in info["models"].items():
        v = st.variants[key]
        if key == "cs-ee":
            continue
        assert v.policy == tmp_path / "out" / "policies" / f"{key}-calibrated.toml" and v.policy.is_file()
        assert got["samples"] == 300 and len(got["thresholds"]) == 6
        assert len(st.costs[key]) == 7
    # The gated BranchyNet keeps its gating: E1 answers only the first priority class.
    assert "classes = [9]" in st.variants["bn+gate"].policy.read_text().replace("\n", " ").replace("  ", " ")
    # Served with the calibrated policy, the validation images leave where calibration said.
    npz = reproduce.write_npz(tmp_path / "val.npz", *train_images(), list(range(0, 6000, 20)))
    r = classynet_run(st.bins, st.variants["cn+c"].file, f"npz:{npz}", 16, 1, st.variants["cn+c"].policy)
    assert [e["count"] for e in r["exits"]] == info["models"]["cn+c"]["exit_counts"]


def test_cs_ee_has_one_policy_per_priority_class_and_answers_only_that_class_early(tmp_path, monkeypatch):
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"indices": list(range(0, 12000, 20))}))  # 600 training images
    st = study(tmp_path, monkeypatch, validation, trained_with_split=True)
    info = st.calibrate()["models"]["cs-ee"]
    assert set(info["per_class"]) == {str(c) for c in st.assignment}
    assert st.variants["cs-ee"].policy == st.cs_ee[st.target]
    npz = reproduce.write_npz(tmp_path / "val.npz", *train_images(), list(range(0, 12000, 20)))
    for c, policy in st.cs_ee.items():
        text = policy.read_text()
        assert "class_thresholds" in text or "disabled = true" in text, text
        assert len(st.costs[f"cs-ee:{c}"]) == 7
        # Served with its policy, every early answer is the targeted class, and the exits answer
        # on the calibration images as many as calibration counted.
        r = classynet_run(st.bins, st.variants["cs-ee"].file, f"npz:{npz}", 16, 1, policy)
        assert [e["count"] for e in r["exits"]] == info["per_class"][str(c)]["exit_counts"]
        for e in r["exits"][:-1]:
            predicted = [sum(col) for col in zip(*e["confusion"])]
            assert all(n == 0 for k, n in enumerate(predicted) if k != c), (c, e["name"], predicted)
    # The exit-1 class leaves early at all (the BN model's exits are sure of Trouser-like classes).
    assert sum(info["exit_counts"][:-1]) > 0, info


def train_images():
    import gzip

    import numpy as np

    d = reproduce.FASHION_DIR
    x = np.frombuffer(gzip.open(d / "train-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(d / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def test_without_the_split_the_typed_thresholds_stay_and_the_report_says_why(tmp_path, monkeypatch):
    st = study(tmp_path, monkeypatch, None, trained_with_split=False)
    info = st.calibrate()
    assert "predates the validation split" in info["skipped"]
    assert all(v.policy is None or v.key == "bn+gate" for v in st.variants.values())
    # CS-EE's thresholds are measured per class: without the split it is not run, and says why.
    assert "cs-ee" not in st.variants and "validation split" in info["models"]["cs-ee"]["skipped"]
    validation = tmp_path / "validation.json"
    validation.write_text("[0, 1, 2]")
    st = study(tmp_path, monkeypatch, validation, trained_with_split=False)
    info = st.calibrate()
    assert info["models"]["cn+c"]["skipped"].startswith("trained on the whole training split")
