"""Training resumes exactly, and the export round-trips its metadata and matches ONNX Runtime."""
import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from classynet_models.backbones import BACKBONES
from classynet_models.backbones.resnet import layer_to_unit, resnet
from classynet_models.classes import ConfigError
from classynet_models.export import export_run
from classynet_models.train import TrainConfig, train


def tiny_cfg(path, **kw):
    base = dict(mode="cn+c", backbone="tiny", exits="3exit", scheme="ic", assignment=[[2], [0]],
                weights=[0.3, 0.3, 0.4], thresholds=[0.4, 0.4], dataset=f"npz:{path}", epochs=2,
                batch_size=32, seed=3, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_resume_gives_the_same_weights_as_one_run(tmp_path, npz_data):
    cfg = tiny_cfg(npz_data)
    train(cfg, tmp_path / "a", progress=False)
    first = train(cfg, tmp_path / "b", progress=False, max_steps=7)  # stops mid-epoch 2
    assert first == {"finished": False}
    done = train(cfg, tmp_path / "b", progress=False)
    assert done["finished"] and len(done["history"]) == 2
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="different configuration"):
        train(replace(cfg, lr=0.5), tmp_path / "b", progress=False)


def test_export_writes_the_format_and_matches_onnx_runtime(tmp_path, npz_data):
    cfg = tiny_cfg(npz_data)
    train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "tiny.onnx"
    info = export_run(tmp_path / "run", out)
    assert info["max_abs_diff"] <= 1e-4 and out.stat().st_size < 200_000
    proto = onnx.load(str(out))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["classynet"])
    assert meta["format_version"] == 1
    assert [e["name"] for e in meta["exits"]] == ["E1", "E2", "E3"]
    assert [e["bag"] for e in meta["exits"]] == [True, True, False]
    assert [e["classes"] for e in meta["exits"]] == [[2], [2, 0], [0, 1, 2]]
    assert [e["cut"] for e in meta["exits"]] == ["cut1", "cut2", None]
    assert [e["threshold"] for e in meta["exits"]] == [0.4, 0.4, None]
    t = meta["training"]
    assert (t["mode"], t["scheme"], t["backbone"], t["costs"], t["epochs"], t["seed"]) == (
        "cn+c", "ic", "tiny", [0.5, 1.0, 1.5, 2.0], 2, 3)
    assert t["exit_weights"] == [0.3, 0.3, 0.4] and "final_exit_accuracy" in t["metrics"]
    # Graph: input [N,1,28,28], logits outputs only; the cuts are named tensors inside.
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["exit1", "exit2", "exit3"]
    assert {"cut1", "cut2"} <= {o for n in proto.graph.node for o in n.output}
    widths = [o.type.tensor_type.shape.dim[1].dim_value for o in proto.graph.output]
    assert widths == [2, 3, 3]
    # Any batch size runs.
    sess = ort.InferenceSession(str(out))
    assert sess.run(["exit3"], {"input": np.zeros((5, 1, 28, 28), np.float32)})[0].shape == (5, 3)


def test_a_run_holds_out_its_validation_split_and_records_it(tmp_path, npz_data):
    cfg = tiny_cfg(npz_data, epochs=1)
    done = train(cfg, tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "validation.json").read_text())
    # 200 samples, 40 of them the test split: 10 % of the 160 training samples held out.
    assert rec["samples"] == 16 and rec["train_samples"] == 144 and len(set(rec["indices"])) == 16
    assert done["history"][0]["evaluated_on"] == "validation"
    none = train(replace(cfg, val_size="0"), tmp_path / "all", progress=False)
    assert json.loads((tmp_path / "all" / "validation.json").read_text())["samples"] == 0
    assert none["history"][0]["evaluated_on"] == "test"


def test_export_refuses_an_unfinished_run(tmp_path, npz_data):
    cfg = tiny_cfg(npz_data)
    train(cfg, tmp_path / "run", progress=False, max_steps=2)
    with pytest.raises(ConfigError, match="has trained 0 of 2 epochs"):
        export_run(tmp_path / "run", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_resnet110_layers_map_to_units_and_exits():
    assert [layer_to_unit(layer, 54) for layer in [4, 18, 36, 54, 72, 90, 110]] == [2, 9, 18, 27, 36, 45, 54]
    with pytest.raises(ValueError):
        layer_to_unit(1, 54)
    net = resnet(110, "7exit", 1, [10] * 7)
    convs = [m for m in net.segments.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 109  # stem + 54 units x 2: the paper's 110 layers with the classifier
    logits, cuts = net(torch.zeros(2, 1, 28, 28), with_cuts=True)
    assert [c.shape[1:] for c in cuts] == [(16, 28, 28), (16, 28, 28), (16, 28, 28), (32, 14, 14),
                                          (32, 14, 14), (64, 7, 7)]
    assert set(BACKBONES) >= {"resnet110", "tiny"}


def test_train_rejects_bad_configs(npz_data, tmp_path):
    with pytest.raises(ConfigError, match="exit-weight vector has 2 values"):
        train(tiny_cfg(npz_data, weights=[0.5, 0.5]), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="class 1 is assigned to both E1 and E2"):
        train(tiny_cfg(npz_data, scheme="mc", assignment=[[1], [1]]), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="class 7, but class ids run 0..2"):
        train(tiny_cfg(npz_data, assignment=[[7], [1]]), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="--exit-convs must be 1 or more"):
        train(tiny_cfg(npz_data, exit_convs=0), tmp_path / "x", progress=False)


def test_deeper_exit_heads_keep_the_one_conv_names_and_export(tmp_path, npz_data):
    """--exit-convs 2 adds a conv to every early exit's head; a one-conv head keeps the names of
    the checkpoints written before the option, and the deeper model exports and verifies."""
    one, two = resnet(110, "7exit", 1, [10] * 7), resnet(110, "7exit", 1, [10] * 7, head_convs=2)
    assert set(one.heads[0].state_dict()) == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                              "bn.running_var", "bn.num_batches_tracked", "fc.weight", "fc.bias"}
    assert two.heads[0].fc.in_features == 64 and two.heads[6].fc.in_features == one.heads[6].fc.in_features
    logits = two(torch.zeros(2, 1, 28, 28))
    assert [tuple(x.shape) for x in logits] == [(2, 10)] * 7
    train(tiny_cfg(npz_data, exit_convs=2, epochs=1), tmp_path / "run", progress=False)
    info = export_run(tmp_path / "run", tmp_path / "deep.onnx")
    assert info["max_abs_diff"] <= 1e-4
    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "deep.onnx")).metadata_props}["classynet"])
    assert meta["training"]["exit_convs"] == 2


def test_export_calibrates_the_thresholds_on_the_validation_split(tmp_path):
    """The export asks `classynet calibrate` for thresholds on the run's held-out samples, puts
    them in the model, and keeps the trained ones and their results beside them."""
    rng = np.random.default_rng(5)
    y = np.arange(1500) % 3
    x = np.clip(rng.normal(60 + 70 * y[:, None, None], 40, (1500, 28, 28)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "toy.npz", x=x, y=y)
    cfg = tiny_cfg(tmp_path / "toy.npz", epochs=1, thresholds=[0.05, 0.05])
    train(cfg, tmp_path / "run", progress=False)
    info = export_run(tmp_path / "run", tmp_path / "cal.onnx", calibrate="precision=0.95")
    cal = info["calibration"]
    assert cal["samples"] == 120 and cal["target"] == "precision=0.95"  # 10 % of the 1,200 training samples
    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "cal.onnx")).metadata_props}["classynet"])
    served = [e["threshold"] for e in meta["exits"][:-1]]
    assert served == [e["threshold"] for e in cal["exits"][:-1]] == info["thresholds"]
    assert served != [0.05, 0.05], "the typed thresholds were replaced"
    t = meta["training"]
    assert t["default_thresholds"] == [0.05, 0.05] and t["calibration"]["samples"] == 120
    assert t["metrics"]["exit_counts"] == info["metrics"]["exit_counts"]
    # On the validation samples, the early exits are right at least 95 % of the time.
    for e in cal["exits"][:-1]:
        assert e["count"] == 0 or e["correct"] / e["count"] >= 0.95, e
    from classynet_models.card import write_card

    card = write_card(tmp_path / "cal.onnx", info)
    assert card["thresholds"] == served and card["trained_thresholds"] == [0.05, 0.05]
    assert card["trained_threshold_results"]["exit_counts"] == info["default_metrics"]["exit_counts"]
    assert "calibrated" in (tmp_path / "cal.card.md").read_text()

    plain = export_run(tmp_path / "run", tmp_path / "plain.onnx", calibrate=None)
    assert plain["calibration"] is None and plain["thresholds"] == [0.05, 0.05]


def test_init_from_a_base_run_keeps_its_backbone_while_frozen_then_fine_tunes(tmp_path, npz_data):
    base = tiny_cfg(npz_data, mode="base", exits="3exit", assignment=[], weights=[1.0], thresholds=[], epochs=1)
    train(base, tmp_path / "base", progress=False)
    ck_base = torch.load(tmp_path / "base" / "checkpoint.pt", weights_only=False)["model"]

    cfg = tiny_cfg(npz_data, epochs=1, init_from=str(tmp_path / "base"))
    train(cfg, tmp_path / "exits", progress=False)
    ck = torch.load(tmp_path / "exits" / "checkpoint.pt", weights_only=False)["model"]
    # Base: one segment of three blocks; 3exit: one block per segment. Every backbone tensor
    # (running statistics of batch norm too) and the classifier are the base run's, unchanged.
    for blk in range(3):
        for k, v in ck_base.items():
            prefix = f"segments.0.{blk}."
            if k.startswith(prefix):
                assert torch.equal(ck[f"segments.{blk}." + k[len(prefix):]], v), k
    assert torch.equal(ck["heads.2.fc.weight"], ck_base["heads.0.fc.weight"])
    # The early exits did train.
    fresh = torch.load(tmp_path / "exits" / "checkpoint.pt", weights_only=False)
    assert fresh["epoch"] == 1

    tuned = replace(cfg, finetune_epochs=1)
    done = train(tuned, tmp_path / "tuned", progress=False)
    assert done["finished"] and done["epochs"] == 2
    ck2 = torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=False)["model"]
    assert not torch.equal(ck2["segments.0.0.weight"], ck_base["segments.0.0.0.weight"]), "fine-tuning moves it"
    export_run(tmp_path / "tuned", tmp_path / "tuned.onnx", calibrate=None)
    proto = onnx.load(str(tmp_path / "tuned.onnx"))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["classynet"])
    assert meta["training"]["init_from"] == "base", "the model names its base run, not a local path"

    with pytest.raises(ConfigError, match="held out other validation samples"):
        train(replace(cfg, seed=4), tmp_path / "other", progress=False)
    with pytest.raises(ConfigError, match="expected a base run"):
        train(replace(cfg, init_from=str(tmp_path / "exits")), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="follows --init-from"):
        train(replace(cfg, init_from=None, finetune_epochs=1), tmp_path / "y", progress=False)


def test_a_finished_run_kept_without_its_optimizer_still_seeds_init_from(tmp_path, npz_data):
    base = tiny_cfg(npz_data, mode="base", exits="3exit", assignment=[], weights=[1.0], thresholds=[], epochs=1)
    train(base, tmp_path / "base", progress=False)
    path = tmp_path / "base" / "checkpoint.pt"
    ck = torch.load(path, weights_only=False)
    torch.save({**ck, "optimizer": None}, path)  # as the committed zoo base run is kept
    assert train(base, tmp_path / "base", progress=False)["finished"]  # nothing left to resume
    cfg = tiny_cfg(npz_data, epochs=1, init_from=str(tmp_path / "base"))
    assert train(cfg, tmp_path / "exits", progress=False)["finished"]

    # An unfinished run without its optimizer state says why it cannot resume.
    train(base, tmp_path / "half", progress=False, max_steps=2)
    half = tmp_path / "half" / "checkpoint.pt"
    torch.save({**torch.load(half, weights_only=False), "optimizer": None}, half)
    with pytest.raises(ConfigError, match="no optimizer state"):
        train(base, tmp_path / "half", progress=False)
