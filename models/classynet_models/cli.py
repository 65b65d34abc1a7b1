"""Command line: ``classynet-train train | prune | export | evaluate``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .classes import ConfigError, parse_assignment
from .losses import MODES


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def config_from(args: argparse.Namespace):
    from .train import DEFAULTS, TrainConfig

    exits = "base" if args.mode == "base" else args.exits
    d = DEFAULTS.get(exits, DEFAULTS["7exit"])
    return TrainConfig(
        mode=args.mode, backbone=args.backbone, exits=args.exits, scheme=args.scheme,
        assignment=parse_assignment(args.assign) if args.assign is not None else d["assignment"],
        weights=args.weights if args.weights is not None else d["weights"],
        thresholds=args.thresholds if args.thresholds is not None else d["thresholds"],
        costs=args.costs, masking=args.masking, dataset=args.dataset, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, augment=args.augment,
        seed=args.seed, precision=args.precision, val_size=args.val_size,
        init_from=str(args.init_from.resolve()) if args.init_from else None,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, exit_convs=args.exit_convs,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="classynet-train", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train (or resume) a model; checkpoints go to --out")
    t.add_argument("--mode", choices=MODES, default="cn", help="base, bn (BranchyNet), cn (bags), cn+c (bags + costs), cs (costs)")
    t.add_argument("--backbone", default="resnet110", help="resnet110, resnet20, alexnet, inceptionv3 or tiny")
    t.add_argument("--exits", default="7exit", help="exit configuration: 7exit or 3exit (base ignores it)")
    t.add_argument("--scheme", choices=["ic", "mc"], default="ic", help="incremental or mutually exclusive class sets")
    t.add_argument("--assign", help="classes per early exit, e.g. '9;8;6;1;7;0' (default: the paper's)")
    t.add_argument("--weights", type=floats, help="exit-weight vector, one per exit (default: the paper's)")
    t.add_argument("--thresholds", type=floats, help="entropy thresholds (nats), one per early exit")
    t.add_argument("--exit-convs", type=int, default=1,
                   help="conv 3x3 stride-2 layers in each early exit's head before its pool (default 1; "
                        "more keep more of an object's shape at the earliest exits)")
    t.add_argument("--costs", type=floats, default=[0.5, 1.0, 1.5, 2.0], help="c1,c2,c3,c4 of the cost matrix")
    t.add_argument("--masking", action="store_true", help="instance-level masking of samples that already exit")
    t.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, cifar10, svhn or npz:PATH")
    t.add_argument("--data-dir", type=Path, help="dataset folder (default for Fashion-MNIST: the Debian package's)")
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 0.001)")
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    t.add_argument("--augment", action="store_true", help="random crops (and flips where label-preserving)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init-from", type=Path, metavar="RUN",
                   help="start from a finished base run (same backbone, data, --seed and --val-size): its backbone "
                        "and classifier stay frozen for --epochs while the exits train")
    t.add_argument("--finetune-epochs", type=int, default=0,
                   help="with --init-from: then train the whole network this many epochs more")
    t.add_argument("--finetune-lr", type=float, help="learning rate of the fine-tuning epochs (default: --lr / 10)")
    t.add_argument("--val-size", default="auto",
                   help="training samples held out for validation and calibration, chosen by --seed: auto "
                        "(5000 for Fashion-MNIST, 10%% elsewhere), a count, a fraction (0.1), or 0")
    t.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bfloat16 autocast where the CPU supports it (weights stay fp32)")
    t.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    t.add_argument("--max-minutes", type=float, help="checkpoint and stop after this long; rerun to resume")
    t.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log, config)")
    t.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("prune", help="prune a finished base run to a memory budget (the paper's baselines), "
                       "fine-tune it, and write a run folder that export takes")
    r.add_argument("--from", dest="base_run", type=Path, required=True, metavar="RUN",
                   help="the finished base run (one exit), e.g. models/runs/v2/resnet110-7exit-base")
    r.add_argument("--method", choices=["sensitivity", "hrank"], required=True,
                   help="sensitivity: per-layer sensitivity analysis, L1-smallest filters first; hrank: lowest "
                        "average feature-map rank first, the same share of every layer")
    r.add_argument("--budget", required=True,
                   help="edge memory budget, e.g. 470kB or 2.31MB: the model keeps at most budget / (4 B x --batch) "
                        "parameters (the paper's formula)")
    r.add_argument("--batch", type=int, default=16, help="batch of the paper's formula (default 16)")
    r.add_argument("--finetune-epochs", type=float, default=1,
                   help="epochs of fine-tuning after pruning (default 1; a fraction trains on that share of the "
                        "training split)")
    r.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam learning rate, cosine decay (default 0.001)")
    r.add_argument("--analysis-samples", type=int, default=250,
                   help="validation samples of the sensitivity analysis (cached in the base run) and of the "
                        "accuracy printed before fine-tuning; HRank ranks feature maps on the first 256")
    r.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    r.add_argument("--out", type=Path, required=True, help="run folder to write")
    r.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("export", help="export a trained run to ONNX (verified against PyTorch)")
    e.add_argument("--run", type=Path, required=True, help="run folder written by train")
    e.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    e.add_argument("--name", help="model name in the metadata (default: the file name)")
    e.add_argument("--data-dir", type=Path)
    e.add_argument("--card", action="store_true", help="also write MODEL.card.json and MODEL.card.md")
    e.add_argument("--base-card", type=Path, help="the base model's card, for the accuracy target comparison")
    e.add_argument("--calibrate", default="precision=0.99",
                   help="threshold calibration on the run's validation split with the classynet tool: a "
                        "'classynet calibrate --target' (precision=P or accuracy-drop=D), or none to keep the "
                        "trained thresholds")

    v = sub.add_parser("evaluate", help="test-set metrics of a run or an exported ONNX model")
    v.add_argument("--run", type=Path, help="run folder written by train")
    v.add_argument("--model", type=Path, help="exported ONNX model (evaluated with ONNX Runtime)")
    v.add_argument("--thresholds", type=floats, help="override the thresholds")
    v.add_argument("--data-dir", type=Path)
    v.add_argument("--json", action="store_true")

    args = p.parse_args(argv)
    try:
        if args.verb == "train":
            from .train import train

            if args.threads:
                torch.set_num_threads(args.threads)
            cfg = config_from(args)
            from .data import FASHION_CLASSES

            cfg.validate(len(FASHION_CLASSES) if cfg.dataset == "fashion-mnist" else 10**6)
            summary = train(cfg, args.out, args.data_dir, progress=not args.no_progress, max_minutes=args.max_minutes)
            if summary.get("finished"):
                print(f"done: {args.out} ({summary['train_minutes']:.1f} min); export with "
                      f"classynet-train export --run {args.out} --out MODEL.onnx")
        elif args.verb == "prune":
            from .prune import PruneSettings, prune_run

            if args.threads:
                torch.set_num_threads(args.threads)
            s = PruneSettings(args.method, args.budget, args.batch, args.finetune_epochs, args.finetune_lr,
                              args.analysis_samples)
            info = prune_run(args.base_run, s, args.out, progress=not args.no_progress)
            print(f"done: {args.out} ({info['params']:,} parameters); export with "
                  f"classynet-train export --run {args.out} --out MODEL.onnx")
        elif args.verb == "export":
            from .export import export_run

            calibrate = None if args.calibrate.strip().lower() == "none" else args.calibrate
            info = export_run(args.run, args.out, name=args.name, data_dir=args.data_dir, calibrate=calibrate)
            print(f"wrote {args.out}: max |onnx - torch| = {info['max_abs_diff']:.2e} on {info['samples']} test samples")
            if info["calibration"] is not None:
                cal = info["calibration"]
                print(f"thresholds calibrated for {cal['target']} on {cal['samples']} validation samples: "
                      + ", ".join("off" if t is None else f"{t:.4f}" for t in info["thresholds"])
                      + f"; test accuracy with early exits {100 * info['metrics']['early_exit_accuracy']:.2f}% "
                      f"(trained thresholds: {100 * info['default_metrics']['early_exit_accuracy']:.2f}%)")
            if args.card:
                from .card import write_card

                card = write_card(args.out, info, args.base_card)
                print(f"wrote {args.out.with_suffix('.card.md')}: final exit {100 * card['final_exit_accuracy']:.2f}%, "
                      f"with early exits {100 * card['early_exit_accuracy']:.2f}%")
        else:
            from .export import evaluate_cmd

            result = evaluate_cmd(args.run, args.model, args.thresholds, args.data_dir)
            print(json.dumps(result, indent=2) if args.json else _fmt(result))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _fmt(r: dict) -> str:
    lines = [f"final exit accuracy {100 * r['final_exit_accuracy']:.2f}%",
             f"accuracy with early exits {100 * r['early_exit_accuracy']:.2f}%",
             "exit counts " + ", ".join(f"E{i + 1} {c}" for i, c in enumerate(r["exit_counts"]))]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
