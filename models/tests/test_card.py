"""Cards and the zoo README say how each model was trained."""
import json
from pathlib import Path

from classynet_models.card import markdown, zoo_readme


def card(**extra) -> dict:
    c = {"model": "m.onnx", "backbone": "resnet110", "exits": "7exit", "mode": "cn+c", "scheme": "ic",
         "dataset": "fashion-mnist", "epochs": 3, "seed": 0, "batch_size": 128, "lr": 0.001, "schedule": "cosine",
         "final_exit_accuracy": 0.92, "early_exit_accuracy": 0.91, "thresholds": [0.3], "per_exit_accuracy": [0.99, 0.92],
         "exit_counts": [10, 90], "exit_correct": [10, 81], "exit_distribution_per_class": {"a": [10, 90]},
         "bytes": 1, "sha256": "0" * 64, "export_max_abs_diff": 1e-6, "samples": 100, "train_minutes": 5.0,
         "hardware": "cpu", "precision": "fp32"}
    c.update(extra)
    return c


def test_a_model_trained_from_a_base_run_says_so_and_how_long_it_was_frozen_and_fine_tuned():
    text = markdown(card(init_from="resnet110-7exit-base", finetune_epochs=1, finetune_lr=1e-4))
    assert "3 epochs from `resnet110-7exit-base` with its backbone and classifier frozen" in text
    assert "then 1 epoch of the whole network at lr 0.0001" in text
    assert "for 3 epochs (seed 0" in markdown(card())


def test_the_zoo_readme_describes_the_recipe_its_cards_were_trained_with(tmp_path: Path):
    (tmp_path / "m.card.json").write_text(json.dumps(card()))
    scratch = zoo_readme(tmp_path)
    assert "first recipe's models (from scratch" in scratch and "`--init-from`" not in scratch
    (tmp_path / "m.card.json").write_text(json.dumps(card(init_from="b", finetune_epochs=1, finetune_lr=1e-4)))
    based = zoo_readme(tmp_path)
    assert "`--init-from`" in based and "3 frozen + 1 fine-tuning epochs from base" in based
