"""The pruning baselines: a pruned model has no more parameters than its budget allows by the
paper's formula, exports exactly, and the runtime loads and runs it."""
import json
import subprocess

import numpy as np
import onnx
import pytest
import torch

from classynet_models.classes import ConfigError
from classynet_models.export import classynet_binary, export_run
from classynet_models.prune import (PruneSettings, budget_params, parse_size, prune_run, ratio_within,
                                    runtime_params)
from classynet_models.train import TrainConfig, load_trained, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-20 base run on 200 toy images (3 classes), and the archive."""
    tmp = tmp_path_factory.mktemp("prune")
    rng = np.random.default_rng(1)
    y = np.arange(200) % 3
    x = np.clip(rng.normal(60 + 70 * y[:, None, None], 25, (200, 28, 28)), 0, 255).astype(np.uint8)
    data = tmp / "toy.npz"
    np.savez(data, x=x, y=y)
    cfg = TrainConfig(mode="base", backbone="resnet20", exits="7exit", assignment=[], weights=[1.0], thresholds=[],
                      dataset=f"npz:{data}", epochs=1, batch_size=32, seed=0, precision="fp32")
    train(cfg, tmp / "base", progress=False)
    return tmp / "base", data


def test_budgets_follow_the_papers_formula():
    assert parse_size("470kB") == 470_000 and parse_size("2.31MB") == 2_310_000 and parse_size("1KiB") == 1024
    # params x 4 B x batch 16: the paper's reductions of ResNet-110 (1.73 M parameters) follow.
    assert budget_params(parse_size("470kB")) == 7343
    assert budget_params(parse_size("28.5MB")) == 445_312
    with pytest.raises(ConfigError, match="expected a number and a unit"):
        parse_size("470 parsecs")


def test_ratio_within_takes_the_largest_ratio_whose_loss_stays_within_the_tolerance():
    curve = [(0.0, 0.0), (0.25, 0.01), (0.5, 0.03), (0.75, 0.2), (0.9, 0.5)]
    assert ratio_within(curve, 0.0) == 0.0
    assert ratio_within(curve, 0.01) == 0.25
    assert ratio_within(curve, 0.02) == pytest.approx(0.375)
    assert ratio_within(curve, 1.0) == 0.9
    # A loss that falls again at a larger ratio does not let that ratio in below the worse one.
    assert ratio_within([(0.0, 0.0), (0.5, 0.3), (0.9, 0.1)], 0.2) == pytest.approx(0.5 * 0.2 / 0.3)


@pytest.mark.parametrize("method", ["sensitivity", "hrank"])
def test_a_pruned_model_fits_its_budget_exports_and_runs_in_the_runtime(tmp_path, trained, method):
    base, npz_data = trained
    _, model, _, _ = load_trained(base)
    full = runtime_params(model)
    budget = "1.6MB"  # 25,000 parameters by the formula: about a tenth of ResNet-20
    allowed = budget_params(parse_size(budget))
    assert allowed < full / 5
    info = prune_run(base, PruneSettings(method, budget, finetune_epochs=1, analysis_samples=16), tmp_path / "p",
                     progress=False)
    assert 0 < info["params"] <= allowed and info["reduction"] > 0.8
    assert info["base_params"] == full
    # Filters were removed, not zeroed: the convolutions are narrower.
    _, pruned, _, _ = load_trained(tmp_path / "p")
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(widths) < 64 and runtime_params(pruned) == info["params"]

    out = tmp_path / f"{method}.onnx"
    exported = export_run(tmp_path / "p", out)
    assert exported["max_abs_diff"] <= 1e-4
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["classynet"])
    assert meta["training"]["pruning"]["method"] == method and len(meta["exits"]) == 1

    # The runtime counts the same parameters and says the model fits the budget by the formula.
    plan = subprocess.run([str(classynet_binary()), "plan", "--model", str(out), "--budget", budget,
                           "--formula", "paper", "--json"], capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    p = json.loads(plan.stdout)
    assert p["chosen"] == "E1" and p["partitions"][0]["params"] == info["params"]
    # And runs it: the same accuracy on the test split (the archive's first 20 %) as PyTorch's.
    run = subprocess.run([str(classynet_binary()), "run", "--model", str(out), "--dataset", f"npz:{npz_data}",
                          "--limit", "40", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["accuracy"] == pytest.approx(exported["metrics"]["final_exit_accuracy"])


def test_pruning_refuses_what_it_cannot_do(tmp_path, trained):
    base, _ = trained
    with pytest.raises(ConfigError, match="cannot fit"):
        prune_run(base, PruneSettings("hrank", "5kB", finetune_epochs=0, analysis_samples=16), tmp_path / "p",
                  progress=False)
    with pytest.raises(ConfigError, match="unknown pruning method"):
        prune_run(base, PruneSettings("random", "1MB"), tmp_path / "p", progress=False)
    # A budget the base already fits: nothing is removed.
    info = prune_run(base, PruneSettings("sensitivity", "112MB", analysis_samples=16), tmp_path / "q", progress=False)
    assert info["reduction"] == 0 and info["finetune_epochs"] == 0
    pruned = tmp_path / "p2"
    prune_run(base, PruneSettings("hrank", "1.6MB", finetune_epochs=0, analysis_samples=16), pruned, progress=False)
    with pytest.raises(ConfigError, match="pruning starts from a finished base run"):
        prune_run(pruned, PruneSettings("hrank", "1MB", analysis_samples=16), tmp_path / "p3", progress=False)
    assert np.isfinite(json.loads((pruned / "pruning.json").read_text())["pruned_accuracy"])
