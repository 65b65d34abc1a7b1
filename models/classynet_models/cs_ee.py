"""CS-EE, the paper's class-specific early-exit baseline (Bonato and Bouganis, its [42]), as a
configuration of a trained early-exit model: `python -m classynet_models.cs_ee`.

For each targeted class it writes one runtime policy in which every early exit answers only that
class, with an entropy threshold of its own for it at each exit, chosen on held-out images for
precision by `classynet calibrate --per-class` (an exit where no threshold reaches the target
answers nothing). It then serves each policy on the test set with `classynet run` and writes a
card (NAME.card.md, NAME.card.json) with the thresholds, where the class leaves, its precision
and recall there, and the MACs per sample.

Where Bonato and Bouganis's description leaves room, and what is chosen here (the card repeats it):
* Exit placement: they attach new exits to a pretrained network where they pay off for the class;
  here the exits are the trained BranchyNet model's (the zoo's `bn`, trained from the frozen base),
  so the comparison with ClassyNet is at the same exits and backbone.
* Exit training: their exits are trained for the targeted class; these were trained for every
  class, and are made class-specific at inference by gating and a per-class threshold.
* Confidence: softmax entropy (the runtime's exit rule), not top-1 probability; a per-class
  entropy threshold is the same family of rule.
* Threshold target: the precision of the class's early answers on the held-out split (0.99 by
  default), as the rest of the zoo is calibrated.
* One class per policy: CS-EE serves one targeted class, so there is one policy per class.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .export import classynet_binary, run_tool_json
from .classes import ConfigError


def _model_meta(model: Path) -> dict:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == "classynet":
            return json.loads(p.value)
    raise ConfigError(f"{model} has no classynet metadata: export it with classynet-train export")


def configure(model: Path, classes: list[int], samples: Path, out: Path, name: str, target: str = "precision=0.99",
              dataset: str = "fashion-mnist:train", test_dataset: str = "fashion-mnist:test",
              test_limit: int | None = None, data_dir: Path | None = None) -> dict:
    """Writes OUT/NAME-class{C}.toml for every class, and OUT/NAME.card.{json,md}; returns the card."""
    if not target.startswith("precision="):
        raise ConfigError(f"--target {target}: CS-EE holds each class to a precision target (precision=P)")
    meta = _model_meta(model)
    k, n_early = len(meta["classes"]), len(meta["exits"]) - 1
    if n_early < 1:
        raise ConfigError(f"{model} has no early exits: CS-EE needs a model with early exits")
    bad = [c for c in classes if not 0 <= c < k]
    if bad or not classes:
        raise ConfigError(f"--classes {classes}: expected class ids of this model, 0..{k - 1}")
    bag_exits = [e["name"] for e in meta["exits"][:-1] if e.get("bag")]
    if bag_exits:
        raise ConfigError(f"{model.name} has bag-of-classes exits ({', '.join(bag_exits)}), which answer only their "
                          "trained classes: CS-EE needs plain exits (a BranchyNet `bn` model)")
    if not samples.is_file():
        raise ConfigError(f"--samples {samples} not found: the held-out split (a trainer run's validation.json)")
    tool = str(classynet_binary())
    extra = ["--data-dir", str(data_dir)] if data_dir else []
    out.mkdir(parents=True, exist_ok=True)
    per_class = []
    with tempfile.TemporaryDirectory(prefix="classynet-cs-ee-") as tmp:
        for c in classes:
            start = Path(tmp) / f"start-{c}.json"
            start.write_text(json.dumps({"version": 1, "exits": [{"name": e["name"], "classes": [c]}
                                                                 for e in meta["exits"][:-1]]}))
            policy = out / f"{name}-class{c}.toml"
            print(f"[cs-ee] class {c} ({meta['classes'][c]}): calibrating on {samples.name}", file=sys.stderr,
                  flush=True)
            cal = run_tool_json([tool, "calibrate", "--model", str(model), "--dataset", dataset, "--samples", str(samples),
                             "--target", target, "--per-class", "--policy", str(start), "--batch", "64",
                             "--out", str(policy), "--json", *extra], f"classynet calibrate for class {c}")
            print(f"[cs-ee] class {c}: serving the policy on {test_dataset}", file=sys.stderr, flush=True)
            run_cmd = [tool, "run", "--model", str(model), "--dataset", test_dataset, "--policy", str(policy),
                       "--batch", "64", "--json", *extra]
            if test_limit:
                run_cmd += ["--limit", str(test_limit)]
            run = run_tool_json(run_cmd, f"classynet run for class {c}")
            per_class.append(_class_summary(c, meta, cal, run, policy))
    card = {"name": name, "model": model.name, "model_classes": meta["classes"], "target": target,
            "calibration": {"dataset": dataset, "samples": str(samples), "count": per_class[0]["calibration_samples"]},
            "test": {"dataset": test_dataset, "samples": per_class[0]["test"]["samples"]},
            "classes": per_class, "choices": CHOICES}
    (out / f"{name}.card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / f"{name}.card.md").write_text(render(card))
    return card


def _class_summary(c: int, meta: dict, cal: dict, run: dict, policy: Path) -> dict:
    exits = run["exits"]
    early = exits[:-1]
    # Answers of the class at the early exits: column c of each early exit's confusion matrix
    # (rows: true class, columns: the answer).
    answered = sum(sum(row[c] for row in e["confusion"]) for e in early)
    right = sum(e["confusion"][c][c] for e in early)
    others = sum(sum(row[j] for row in e["confusion"] for j in range(len(row)) if j != c) for e in early)
    total_c = sum(sum(e["confusion"][c]) for e in exits)
    return {
        "class": c, "label": meta["classes"][c], "policy": policy.name,
        "thresholds": [cal_e["class_thresholds"].get(str(c)) for cal_e in cal["exits"][:-1]],
        "notes": {cal_e["name"]: cal_e["note"] for cal_e in cal["exits"] if cal_e.get("note")},
        "calibration_samples": cal["samples"],
        "calibration": {"accuracy": cal["accuracy"], "macs_per_sample": cal["macs_per_sample"],
                        "whole_model_macs": cal["whole_model_macs"], "macs_counted": cal["macs_counted"],
                        "exit_counts": [e["count"] for e in cal["exits"]]},
        "test": {"samples": run["samples"], "accuracy": run["accuracy"],
                 "exit_counts": [e["count"] for e in exits],
                 "class_samples": total_c, "class_early": answered, "class_early_correct": right,
                 "class_by_exit": [sum(e["confusion"][c]) for e in exits],
                 "other_classes_early": others},
    }


CHOICES = [
    ("Exits", "the BranchyNet model's own exits, trained for every class; Bonato and Bouganis place and train "
              "new exits for the targeted class. So this measures class-specific thresholds at BranchyNet's "
              "exits, not class-specific exit placement."),
    ("Confidence", "softmax entropy, the runtime's exit rule (a sample leaves when its entropy is strictly "
                   "below its top class's threshold), not top-1 probability."),
    ("Thresholds", "one per exit for the targeted class, the largest at which the class's early answers are "
                   "right at least the target share of the time on the held-out split, exit by exit (a sample "
                   "that left earlier is not counted again); an exit no threshold serves answers nothing."),
    ("Classes", "one targeted class per policy, as CS-EE serves one class; every other class goes to the last "
                "exit."),
]


def render(card: dict) -> str:
    L = [f"# {card['name']}: CS-EE policies for {card['model']}\n",
         "Class-specific early exits (CS-EE, Bonato and Bouganis; the ClassyNet paper's [42]) as a runtime "
         "configuration: for each targeted class a policy in which every early exit answers only that class, "
         f"with a threshold of its own, calibrated with `classynet calibrate --per-class --target {card['target']}` "
         f"on the {card['calibration']['count']:,} held-out images of `{Path(card['calibration']['samples']).name}` "
         f"and served with `classynet run` on {card['test']['samples']:,} images of `{card['test']['dataset']}`. "
         f"Serve one with `cloud-server --model {card['model']} --policy POLICY`.\n",
         "## Where the description leaves room, and what is chosen\n"]
    L += [f"- **{k}**: {v}" for k, v in card["choices"]]
    L.append("")
    L.append("## Per targeted class (test set)\n")
    L.append("| class | policy | thresholds E1.. (nats; off: no early answer) | answered early | precision early | "
             "recall early | other classes early | accuracy | MACs / sample (held-out) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in card["classes"]:
        t = r["test"]
        th = ", ".join("off" if x is None else f"{x:.3f}" for x in r["thresholds"])
        prec = f"{100 * t['class_early_correct'] / t['class_early']:.2f} %" if t["class_early"] else "-"
        rec = f"{100 * t['class_early_correct'] / t['class_samples']:.1f} %" if t["class_samples"] else "-"
        c = r["calibration"]
        macs = (f"{c['macs_per_sample'] / 1e6:.1f} M of {c['whole_model_macs'] / 1e6:.1f} M"
                if c["macs_counted"] else "-")
        L.append(f"| {r['class']} {r['label']} | [{r['policy']}]({r['policy']}) | {th} | {t['class_early']:,} | "
                 f"{prec} | {rec} | {t['other_classes_early']} | {100 * t['accuracy']:.2f} % | {macs} |")
    L.append("")
    L.append("*Answered early*: test images the early exits answered, all as the targeted class; *precision*: "
             "the share of them of that class; *recall*: the class's test images answered early and right; "
             "*other classes early*: answers of other classes before the last exit (always 0: the policy gates "
             "them). MACs per sample are over the held-out split, all classes mixed: CS-EE saves compute only on "
             "its class. The paper's speedup comparison is in reports/paper (part 2).\n")
    notes = [f"- class {r['class']}: " + "; ".join(f"{e}: {n}" for e, n in r["notes"].items())
             for r in card["classes"] if r["notes"]]
    if notes:
        L.append("Calibration notes:\n")
        L += notes
        L.append("")
    L.append("Remake: `scripts/train-zoo cs-ee`.\n")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m classynet_models.cs_ee", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="an exported model with plain early exits (bn)")
    ap.add_argument("--classes", required=True, help="targeted class ids, comma-separated (one policy each)")
    ap.add_argument("--samples", type=Path, required=True, help="the held-out split (a run's validation.json)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the policies and the card")
    ap.add_argument("--name", help="file prefix (default: MODEL-cs-ee)")
    ap.add_argument("--target", default="precision=0.99", help="precision target per class (default %(default)s)")
    ap.add_argument("--dataset", default="fashion-mnist:train", help="dataset the split indexes (default %(default)s)")
    ap.add_argument("--test-dataset", default="fashion-mnist:test", help="dataset served for the card (default %(default)s)")
    ap.add_argument("--test-limit", type=int, help="serve only the first N test images")
    ap.add_argument("--data-dir", type=Path, help="dataset folder (default: the Debian package's)")
    a = ap.parse_args(argv)
    try:
        classes = [int(x) for x in a.classes.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--classes {a.classes!r}: expected comma-separated class ids, e.g. 9,8,6")
    name = a.name or f"{a.model.stem}-cs-ee"
    try:
        card = configure(a.model, classes, a.samples, a.out, name, a.target, a.dataset, a.test_dataset,
                         a.test_limit, a.data_dir)
    except ConfigError as e:
        print(f"classynet_models.cs_ee: {e}", file=sys.stderr)
        return 2
    print(f"[cs-ee] wrote {len(card['classes'])} policies and {a.out / (name + '.card.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
