"""Model cards: a JSON file and a short Markdown page next to each exported model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

BASE_TARGET = 0.90  # `base` final-exit accuracy target
EXIT_MODEL_MARGIN = 0.01  # bn, cn, cn+c with early exits: within 1.0 point of base


def write_card(onnx_path: Path, info: dict, base_card: Path | None = None) -> dict:
    m = info["metrics"]
    cfg = info["config"]
    summary = info.get("summary", {})
    data = onnx_path.read_bytes()
    card = {
        "model": onnx_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "mode": cfg["mode"], "scheme": cfg["scheme"], "backbone": cfg["backbone"], "exits": cfg["exits"],
        "dataset": cfg["dataset"], "epochs": cfg["epochs"], "seed": cfg["seed"], "batch_size": cfg["batch_size"],
        "lr": cfg["lr"], "schedule": cfg["schedule"], "assignment": cfg["assignment"],
        "thresholds": cfg["thresholds"], "exit_weights": cfg["weights"],
        "costs": cfg["costs"] if cfg["mode"] in ("cn+c", "cs") else None,
        "train_minutes": summary.get("train_minutes"), "hardware": summary.get("hardware"),
        "precision": summary.get("precision"),
        "final_exit_accuracy": m["final_exit_accuracy"],
        "per_exit_accuracy": m["per_exit_accuracy"],
        "early_exit_accuracy": m["early_exit_accuracy"],
        "exit_counts": m["exit_counts"],
        "exit_correct": m["exit_correct"],
        "exit_distribution_per_class": m["exit_distribution_per_class"],
        "export_max_abs_diff": info["max_abs_diff"],
    }
    if cfg["mode"] == "base":
        card["target"] = {"what": f"final-exit accuracy >= {100 * BASE_TARGET:.0f} %",
                          "met": m["final_exit_accuracy"] >= BASE_TARGET,
                          "gap_points": round(100 * (m["final_exit_accuracy"] - BASE_TARGET), 2)}
    elif base_card is not None and base_card.exists():
        base = json.loads(base_card.read_text())["final_exit_accuracy"]
        gap = m["early_exit_accuracy"] - base
        card["target"] = {"what": "accuracy with early exits at default thresholds within 1.0 point of base "
                                  f"({100 * base:.2f} %)",
                          "met": gap >= -EXIT_MODEL_MARGIN, "gap_points": round(100 * gap, 2)}
    onnx_path.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")
    onnx_path.with_suffix(".card.md").write_text(markdown(card))
    return card


def markdown(c: dict) -> str:
    pct = lambda v: f"{100 * v:.2f} %"  # noqa: E731
    lines = [
        f"# {c['model']}",
        "",
        f"{c['backbone']} {c['exits'] if c['mode'] != 'base' else '(no early exits)'}, mode `{c['mode']}`"
        + (f", scheme `{c['scheme']}`" if c["mode"] in ("cn", "cn+c", "cs") else "")
        + f", trained on {c['dataset']} for {c['epochs']} epochs (seed {c['seed']}, batch {c['batch_size']}, "
          f"Adam lr {c['lr']}, {c['schedule']} schedule).",
        "",
        f"- Final-exit test accuracy: **{pct(c['final_exit_accuracy'])}**",
        f"- Accuracy with early exits at the default thresholds {c['thresholds']}: "
        f"**{pct(c['early_exit_accuracy'])}**",
    ]
    if "target" in c:
        t = c["target"]
        lines.append(f"- Target ({t['what']}): {'met' if t['met'] else 'missed'} "
                     f"({t['gap_points']:+.2f} points)")
    if c.get("train_minutes") is not None:
        lines.append(f"- Training: {c['train_minutes']:.0f} min on {c['hardware']} ({c['precision']})")
    lines.append(f"- File: {c['bytes']:,} bytes, sha256 `{c['sha256'][:16]}…`; ONNX Runtime vs PyTorch max |Δ| "
                 f"{c['export_max_abs_diff']:.1e}")
    n = len(c["exit_counts"])
    lines += ["", "| exit | accuracy on its labels | answered | correct |", "|---|---|---|---|"]
    for i in range(n):
        lines.append(f"| E{i + 1} | {pct(c['per_exit_accuracy'][i])} | {c['exit_counts'][i]} | "
                     f"{c['exit_correct'][i]} |")
    lines += ["", "Exit distribution per class (10k test samples, default thresholds):", "",
              "| class | " + " | ".join(f"E{i + 1}" for i in range(n)) + " |",
              "|---|" + "---|" * n]
    for name, row in c["exit_distribution_per_class"].items():
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
