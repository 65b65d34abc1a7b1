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
    from .backbones import BACKBONES

    backbone = BACKBONES.get(cfg["backbone"])
    card = {
        "model": onnx_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "mode": cfg["mode"], "scheme": cfg["scheme"], "backbone": cfg["backbone"], "exits": cfg["exits"],
        "dataset": cfg["dataset"], "epochs": cfg["epochs"], "seed": cfg["seed"], "batch_size": cfg["batch_size"],
        "lr": cfg["lr"], "schedule": cfg["schedule"], "assignment": cfg["assignment"],
        # The recipe: the run a bn/cn/cn+c/cs model started from (its backbone frozen for `epochs`),
        # the fine-tuning epochs after, and the validation split held out of training.
        "init_from": Path(cfg["init_from"]).name if cfg.get("init_from") else None,
        "finetune_epochs": cfg.get("finetune_epochs") or 0,
        "finetune_lr": (cfg.get("finetune_lr") or cfg["lr"] / 10) if cfg.get("finetune_epochs") else None,
        "val_size": cfg.get("val_size"),
        # The thresholds in the model (calibrated where the export calibrated) and the trained ones.
        "thresholds": info.get("thresholds", cfg["thresholds"]), "trained_thresholds": cfg["thresholds"],
        "calibration": info.get("calibration") and {
            k: info["calibration"][k] for k in ("target", "samples", "accuracy", "final_exit_accuracy")},
        "exit_weights": cfg["weights"],
        "exit_convs": cfg.get("exit_convs", 1),
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
        "samples": m.get("samples"),
        "adaptation": backbone.adaptation if backbone else "",
    }
    if info.get("calibration") is not None:
        d = info["default_metrics"]
        card["trained_threshold_results"] = {"early_exit_accuracy": d["early_exit_accuracy"],
                                             "exit_counts": d["exit_counts"]}
    if info.get("pruning"):
        pr = card["pruning"] = info["pruning"]
        card["target"] = {"what": f"at most {pr['max_params']:,} parameters ({pr['budget']} by the paper's formula, "
                                  f"{pr['formula']} with batch {pr['batch']})",
                          "met": pr["params"] <= pr["max_params"], "params": pr["params"]}
    elif cfg["mode"] == "base":
        card["target"] = {"what": f"final-exit accuracy >= {100 * BASE_TARGET:.0f} %",
                          "met": m["final_exit_accuracy"] >= BASE_TARGET,
                          "gap_points": round(100 * (m["final_exit_accuracy"] - BASE_TARGET), 2)}
    elif base_card is not None and base_card.exists():
        base = json.loads(base_card.read_text())["final_exit_accuracy"]
        gap = m["early_exit_accuracy"] - base
        card["target"] = {"what": "accuracy with early exits at the model's thresholds within 1.0 point of base "
                                  f"({100 * base:.2f} %)",
                          "met": gap >= -EXIT_MODEL_MARGIN, "gap_points": round(100 * gap, 2)}
    onnx_path.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")
    onnx_path.with_suffix(".card.md").write_text(markdown(card))
    return card


def recipe(c: dict) -> str:
    """How long and from what a card's model trained, in words."""
    if c.get("pruning"):
        p = c["pruning"]
        text = f"`{p['base_run']}` pruned by {p['method']} to fit {p['budget']}"
        if p.get("finetune_epochs"):
            text += f", then {p['finetune_epochs']:g} epoch{'s' if p['finetune_epochs'] > 1 else ''} of fine-tuning " \
                    f"at lr {p['finetune_lr']:g}"
        return text
    if not c.get("init_from"):
        return f"{c['epochs']} epochs"
    text = f"{c['epochs']} epochs from `{c['init_from']}` with its backbone and classifier frozen"
    if c.get("finetune_epochs"):
        text += f", then {c['finetune_epochs']} epoch{'s' if c['finetune_epochs'] > 1 else ''} of the whole " \
                f"network at lr {c['finetune_lr']:g}"
    return text


def markdown(c: dict) -> str:
    pct = lambda v: f"{100 * v:.2f} %"  # noqa: E731
    head = (f"{c['backbone']} (no early exits), {recipe(c)} (Adam, cosine schedule, batch 128), on {c['dataset']}."
            if c.get("pruning") else None)
    lines = [
        f"# {c['model']}",
        "",
        head or f"{c['backbone']} {c['exits'] if c['mode'] != 'base' else '(no early exits)'}, mode `{c['mode']}`"
        + (f", scheme `{c['scheme']}`" if c["mode"] in ("cn", "cn+c", "cs") else "")
        + f", trained on {c['dataset']} for {recipe(c)} (seed {c['seed']}, batch {c['batch_size']}, "
          f"Adam lr {c['lr']}, {c['schedule']} schedule)."
        + (f" Early exit heads with {c['exit_convs']} conv layers, exit weights {c['exit_weights']}."
           if c.get("exit_convs", 1) > 1 else ""),
        "",
    ]
    if c.get("adaptation"):
        lines += [c["adaptation"], ""]
    lines += [
        f"- Final-exit test accuracy: **{pct(c['final_exit_accuracy'])}**",
    ]
    fmt_t = lambda ts: "[" + ", ".join("off" if t is None else f"{t:.3g}" for t in ts) + "]"  # noqa: E731
    if c["mode"] != "base" and c.get("calibration"):
        cal, d = c["calibration"], c["trained_threshold_results"]
        lines.append(f"- Thresholds calibrated with `classynet calibrate --target {cal['target']}` on "
                     f"{cal['samples']} validation samples: {fmt_t(c['thresholds'])}")
        lines.append(f"- Accuracy with early exits: **{pct(c['early_exit_accuracy'])}** at the calibrated "
                     f"thresholds, exit counts {c['exit_counts']}; {pct(d['early_exit_accuracy'])} at the "
                     f"trained thresholds {fmt_t(c['trained_thresholds'])}, exit counts {d['exit_counts']}")
    elif c["mode"] != "base":
        lines.append(f"- Accuracy with early exits at the default thresholds {c['thresholds']}: "
                     f"**{pct(c['early_exit_accuracy'])}**")
    if c.get("pruning"):
        p = c["pruning"]
        how = (f"tolerance {100 * p['sensitivity']['tolerance']:.2f} points of accuracy lost per group, from a "
               f"sensitivity analysis on {p['sensitivity']['samples']} validation samples" if "sensitivity" in p
               else f"{100 * p['hrank']['ratio']:.2f} % of every group's channels, those with the lowest average "
                    f"feature-map rank on {p['hrank']['images']} validation images" if "hrank" in p else "nothing removed")
        lines.append(f"- Pruned by `{p['method']}` ({how}): **{p['params']:,} parameters**, "
                     f"{100 * p['reduction']:.2f} % fewer than the base's {p['base_params']:,}; validation accuracy "
                     f"{100 * p['pruned_accuracy']:.2f} % before fine-tuning")
        if p.get("groups"):
            kept = ", ".join(f"{n} {g['kept']} of {g['channels']}" for n, g in list(p["groups"].items())[:3])
            lines.append(f"- Channels kept: every group's in the card's JSON (`pruning.groups`); the residual "
                         f"streams, named by a module writing them: {kept}")
    if "target" in c:
        t = c["target"]
        gap = f"{t['gap_points']:+.2f} points" if "gap_points" in t else f"{t['params']:,} parameters"
        lines.append(f"- Target ({t['what']}): {'met' if t['met'] else 'missed'} ({gap})")
    if c.get("train_minutes") is not None:
        lines.append(f"- Training: {c['train_minutes']:.0f} min on {c['hardware']} ({c['precision']})")
    lines.append(f"- File: {c['bytes']:,} bytes, sha256 `{c['sha256'][:16]}…`; ONNX Runtime vs PyTorch max |Δ| "
                 f"{c['export_max_abs_diff']:.1e}")
    n = len(c["exit_counts"])
    lines += ["", "| exit | accuracy on its labels | answered | correct |", "|---|---|---|---|"]
    for i in range(n):
        lines.append(f"| E{i + 1} | {pct(c['per_exit_accuracy'][i])} | {c['exit_counts'][i]} | "
                     f"{c['exit_correct'][i]} |")
    which = "calibrated" if c.get("calibration") else "default"
    lines += ["", f"Exit distribution per class ({c.get('samples') or 10000} test samples, {which} thresholds):", "",
              "| class | " + " | ".join(f"E{i + 1}" for i in range(n)) + " |",
              "|---|" + "---|" * n]
    for name, row in c["exit_distribution_per_class"].items():
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


RETRAIN = {
    "resnet110-7exit-base": "scripts/train-zoo base",
    "resnet110-7exit-bn": "scripts/train-zoo bn",
    "resnet110-7exit-cn": "scripts/train-zoo cn",
    "resnet110-7exit-cnc": "scripts/train-zoo cnc",
    "tiny-3exit-cn": "scripts/train-zoo tiny",
    **{f"{b}-{e}-{v}": f"BACKBONE={b} scripts/train-zoo {v}"
       for b, e in (("alexnet", "3exit"), ("inceptionv3", "7exit")) for v in ("base", "bn", "cn", "cnc")},
    **{f"resnet110-prune-{m}-{b}": f"BUDGETS={b} scripts/train-zoo prune-{m}"
       for m in ("sensitivity", "hrank") for b in ("470kB", "2.31MB", "5.54MB", "28.5MB")},
}


def short_recipe(c: dict) -> str:
    if c.get("pruning"):
        n = c["pruning"].get("finetune_epochs") or 0
        return f"pruned from base + {n:g} fine-tuning epoch{'' if n == 1 else 's'}"
    if not c.get("init_from"):
        return f"{c['epochs']} epochs"
    return f"{c['epochs']} frozen + {c.get('finetune_epochs') or 0} fine-tuning epochs from base"


def intro(cards: list[dict]) -> list[str]:
    """What the zoo's models were trained on and how: the from-base recipe when any card has it."""
    if any(c.get("init_from") for c in cards):
        return [
            "Trained on Fashion-MNIST (Debian package `dataset-fashion-mnist`): 55,000 training images, with",
            "5,000 more held out as a validation split ([validation.json](validation.json): the same split,",
            "seed 0, for every ResNet-110), and evaluated on the 10,000 test images. Every model is one ONNX",
            "file in the runtime's format (docs/model-format.md) with a card (`NAME.card.md`, `NAME.card.json`):",
            "per-exit accuracy, the exit distribution per class, training time and hardware.",
            "",
            "The recipe (from base): `base` trains the whole ResNet-110 for 6 epochs (seed 0, batch 128, Adam",
            "lr 0.001, cosine decay, bfloat16 autocast). `bn`, `cn` and `cn+c` start from it (`--init-from`): its",
            "backbone and classifier stay frozen while the exits train, then the whole network is fine-tuned",
            "(epochs and learning rate on each card). They use the paper's 7-exit assignment (classes 9, 8, 6,",
            "1, 7, 0 to exits 1-6, IC scheme) and the paper's exit weights [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1],",
            "except where a card says otherwise (weights, and exit heads of more than one conv layer). The export",
            "calibrates every exit's threshold on the validation split (`classynet calibrate --target",
            "precision=0.99`) and writes them into the model, so that a server loading the file uses them; the",
            "typed thresholds and their results are on each card. The table's figures are at the thresholds in",
            "the model. A model whose card names no base run was trained from scratch.",
            "[reports/zoo-recipes](../../reports/zoo-recipes/README.md) compares the recipes.",
        ]
    return [
        "Trained on the Fashion-MNIST training set (60,000 images, Debian package `dataset-fashion-mnist`),",
        "evaluated on its 10,000 test images. Every model is one ONNX file in the runtime's format",
        "(docs/model-format.md) with a card (`NAME.card.md`, `NAME.card.json`): per-exit accuracy, the exit",
        "distribution per class at the default thresholds, training time and hardware.",
        "",
        "The ResNet-110 variants share the budget and the seed: 6 epochs, seed 0, batch 128, Adam (lr 0.001,",
        "cosine decay), bfloat16 autocast. They use the paper's 7-exit assignment (classes 9, 8, 6, 1, 7, 0 to",
        "exits 1-6, IC scheme), exit weights [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1] and thresholds",
        "[0.3, 0.3, 0.3, 0.2, 0.2, 0.2]. Two runs trained side by side, one torch thread each.",
        "",
        "These are the first recipe's models (from scratch, no validation split, typed thresholds).",
        "[reports/zoo-recipes](../../reports/zoo-recipes/README.md) measures the second (from a trained base,",
        "calibrated on a held-out split): closer to base in accuracy, fewer priority samples at their exit.",
    ]


def zoo_readme(zoo: Path) -> str:
    """The zoo's README: one row per model card found in `zoo`."""
    cards = [json.loads(p.read_text()) for p in sorted(zoo.glob("*.card.json"))]
    lines = [
        "# Model zoo",
        "",
        *intro(cards),
        "",
        "| model | mode | final-exit accuracy | accuracy with early exits | answered before the last exit | target | training | retrain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cards:
        name = c["model"].removesuffix(".onnx")
        early = sum(c["exit_counts"][:-1])
        t = c.get("target")
        gap = "-" if t is None else f"{t['gap_points']:+.2f} pts" if "gap_points" in t else f"{t['params']:,} params"
        target = "-" if t is None else f"{'met' if t['met'] else 'missed'} ({gap})"
        minutes = c.get("train_minutes")
        lines.append(
            f"| [{name}]({name}.card.md) | `{'pruned: ' + c['pruning']['method'] if c.get('pruning') else c['mode']}` | {100 * c['final_exit_accuracy']:.2f} % | "
            + ("-" if c["mode"] == "base" else f"{100 * c['early_exit_accuracy']:.2f} %")
            + f" | {early} / {c['samples'] if 'samples' in c else sum(c['exit_counts'])} | {target} | "
            + (f"{minutes:.0f} min, " if minutes is not None else "") + short_recipe(c)
            + f" | `{RETRAIN.get(name, 'see card')}` |"
        )
    lines += [
        "",
        "Targets: `base` reaches at least 90 % final-exit accuracy; `bn`, `cn` and `cn+c`, with early exits at",
        "the model's thresholds, stay within 1.0 point of `base`; a pruned model has no more parameters than its",
        "budget allows by the paper's formula (bytes / (4 B x batch 16)). A missed target is shown with its gap.",
        "",
        "`scripts/train-zoo NAME` trains (or resumes), exports, calibrates, verifies the export against",
        "PyTorch and writes the card (`RECIPE=scratch|base` and the budget variables: see the script). The",
        "test `cli/tests/zoo.rs` checks that every model here splits exactly at every partition and that",
        "`classynet run` reproduces the card's accuracy and exit counts.",
    ]
    lines += cs_ee_section(zoo)
    return "\n".join(lines) + "\n"


def cs_ee_section(zoo: Path) -> list[str]:
    """The CS-EE policies of `zoo/cs-ee` (classynet_models.cs_ee): one row per targeted class."""
    cards = [json.loads(p.read_text()) for p in sorted((zoo / "cs-ee").glob("*.card.json"))]
    if not cards:
        return []
    lines = ["", "## CS-EE policies (the paper's class-specific early-exit baseline)", "",
             "Not models but runtime configurations of a `bn` model: per targeted class, every early exit answers "
             "only that class, with thresholds of its own calibrated on the validation split (`classynet calibrate "
             "--per-class`). The card says what was chosen where the paper's description leaves room. Test set:", "",
             "| policy set | targeted class | answered early | precision early | recall early | accuracy | remake |",
             "|---|---|---|---|---|---|---|"]
    for c in cards:
        for r in c["classes"]:
            t = r["test"]
            prec = f"{100 * t['class_early_correct'] / t['class_early']:.2f} %" if t["class_early"] else "-"
            rec = f"{100 * t['class_early_correct'] / t['class_samples']:.1f} %" if t["class_samples"] else "-"
            lines.append(f"| [{c['name']}](cs-ee/{c['name']}.card.md) on `{c['model']}` | {r['class']} {r['label']} | "
                         f"{t['class_early']:,} / {t['samples']:,} | {prec} | {rec} | {100 * t['accuracy']:.2f} % | "
                         "`scripts/train-zoo cs-ee` |")
    return lines


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "models/zoo")
    (target / "README.md").write_text(zoo_readme(target))
    print(f"wrote {target / 'README.md'}")
