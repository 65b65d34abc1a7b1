"""AlexNet and InceptionV3: the paper's exits, their shapes on 28x28 input, and exports that match
PyTorch through ONNX Runtime."""
import json
import subprocess

import onnx
import pytest
import torch

from classynet_models.backbones import BACKBONES, build
from classynet_models.backbones.alexnet import ALEXNET_EXITS
from classynet_models.backbones.inception import INCEPTION_EXITS, UNIT_END_LAYERS, unit_of_layer
from classynet_models.export import classynet_binary, export_run
from classynet_models.train import TrainConfig, train


def test_alexnet_has_the_papers_layers_and_exits_after_the_first_two_convolutions():
    assert ALEXNET_EXITS["3exit"] == [1, 2, 8]
    net = build("alexnet", "3exit", 1, [3, 4, 10]).eval()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    main_convs = [m for m in net.segments.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.heads[-1].modules() if isinstance(m, torch.nn.Linear)]
    assert len(main_convs) == 5 and len(linears) == 3, "five convolutional and three fully connected layers"
    assert len(convs) == 5 + 2, "plus one conv in each early exit head"
    logits, cuts = net(torch.zeros(2, 1, 28, 28), with_cuts=True)
    assert [tuple(x.shape) for x in logits] == [(2, 3), (2, 4), (2, 10)]
    assert [tuple(c.shape[1:]) for c in cuts] == [(64, 13, 13), (192, 6, 6)]
    base = build("alexnet", "base", 1, [10])
    assert base.num_exits == 1 and 23_000_000 < sum(p.numel() for p in base.parameters()) < 24_000_000


def test_inception_layers_map_to_modules_as_the_paper_counts_them():
    # 5 stem convolutions, then modules A A A B C C C C D E E; the classifier is layer 48.
    assert UNIT_END_LAYERS[-1] == 47 and len(UNIT_END_LAYERS) == 16
    assert [unit_of_layer(x) for x in INCEPTION_EXITS["7exit"]] == [1, 4, 7, 8, 10, 12, 15]
    with pytest.raises(ValueError, match="not in InceptionV3"):
        unit_of_layer(49)
    net = build("inceptionv3", "7exit", 1, [10] * 7).eval()
    logits, cuts = net(torch.zeros(2, 1, 28, 28), with_cuts=True)
    assert [tuple(x.shape) for x in logits] == [(2, 10)] * 7
    # After 2a (28x28), 4a (14x14), 5d (14x14), 6a, 6c, 6e (6x6); at half width.
    assert [tuple(c.shape[1:]) for c in cuts] == [(16, 28, 28), (96, 14, 14), (144, 14, 14), (384, 6, 6),
                                                 (384, 6, 6), (384, 6, 6)]
    assert set(BACKBONES) >= {"alexnet", "inceptionv3"}


@pytest.mark.parametrize("backbone,exits,weights,thresholds", [
    ("alexnet", "3exit", [0.6, 0.2, 0.2], [0.4, 0.4]),
    ("inceptionv3", "7exit", [0.3, 0.15, 0.15, 0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.3, 0.2, 0.2, 0.2]),
])
def test_a_trained_run_exports_and_matches_pytorch(tmp_path, npz_data, backbone, exits, weights, thresholds):
    n = len(weights)
    cfg = TrainConfig(mode="cn+c", backbone=backbone, exits=exits, scheme="ic",
                      assignment=[[2]] + [[0]] * (n - 2), weights=weights, thresholds=thresholds,
                      dataset=f"npz:{npz_data}", epochs=1, batch_size=32, seed=1, precision="fp32")
    train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / f"{backbone}.onnx"
    info = export_run(tmp_path / "run", out)
    assert info["max_abs_diff"] <= 1e-4
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["classynet"])
    assert [e["name"] for e in meta["exits"]] == [f"E{i + 1}" for i in range(n)]
    assert all(e["cut"] for e in meta["exits"][:-1]) and meta["exits"][-1]["cut"] is None
    # The runtime cuts the graph at every exit (InceptionV3: between modules whose branches run in
    # parallel) and head + tail compute what the whole model computes, on both engines.
    for backend in ("ort", "tract"):
        p = subprocess.run([str(classynet_binary()), "--backend", backend, "verify-split", "--model", str(out),
                            "--limit", "32"], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and "every partition matches the full model" in p.stdout, p.stdout + p.stderr
