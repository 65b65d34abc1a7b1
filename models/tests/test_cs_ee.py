"""CS-EE as a configuration of the zoo's BranchyNet model: one calibrated policy per targeted
class, served by the real `classynet` tool, and a card that says what was chosen."""
import json
from pathlib import Path

import pytest

from classynet_models import cs_ee
from classynet_models.classes import ConfigError

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    doc = json.loads((ZOO / "validation.json").read_text())
    path = tmp_path_factory.mktemp("split") / "validation.json"
    path.write_text(json.dumps({"indices": doc["indices"][:600]}))
    return path


def test_each_policy_answers_only_its_class_early_and_precisely(tmp_path, split):
    card = cs_ee.configure(ZOO / "resnet110-7exit-bn.onnx", [9, 1], split, tmp_path, "bn-cs-ee", test_limit=500)
    assert [r["class"] for r in card["classes"]] == [9, 1]
    for r in card["classes"]:
        policy = (tmp_path / r["policy"]).read_text()
        # Every early exit is gated to the class, with a threshold of its own or turned off.
        assert policy.count("[[exits]]") == 6 and f"classes = [{r['class']}]" in policy, policy
        assert "class_thresholds" in policy
        t = r["test"]
        assert t["samples"] == 500 and t["other_classes_early"] == 0, r
        # Ankle boots and Trousers are easy for BranchyNet's exits: many leave early, nearly all right.
        assert t["class_early"] >= 10 and t["class_early_correct"] / t["class_early"] >= 0.9, r
        assert sum(t["exit_counts"]) == 500 and t["exit_counts"][-1] < 500
        assert any(x is not None for x in r["thresholds"])
    md = (tmp_path / "bn-cs-ee.card.md").read_text()
    assert "Where the description leaves room" in md and "bn-cs-ee-class9.toml" in md
    assert json.loads((tmp_path / "bn-cs-ee.card.json").read_text())["target"] == "precision=0.99"


def test_what_cannot_be_cs_ee_is_refused_with_the_reason(tmp_path, split):
    bn = ZOO / "resnet110-7exit-bn.onnx"
    with pytest.raises(ConfigError, match="precision target"):
        cs_ee.configure(bn, [9], split, tmp_path, "x", target="accuracy-drop=1")
    with pytest.raises(ConfigError, match=r"class ids of this model, 0\.\.9"):
        cs_ee.configure(bn, [12], split, tmp_path, "x")
    with pytest.raises(ConfigError, match="bag-of-classes exits"):
        cs_ee.configure(ZOO / "tiny-3exit-cn.onnx", [9], split, tmp_path, "x")
    with pytest.raises(ConfigError, match="held-out split"):
        cs_ee.configure(bn, [9], tmp_path / "missing.json", tmp_path, "x")
