"""Turns the results of `reproduce.py` into README.md and PNG plots."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .tables import markdown, partition_of, pct, times  # noqa: E402

LABELS = {"base": "Baseline", "bn": "BN", "bn+gate": "BN + gating", "cs-ee": "CS-EE", "cn": "CN", "cn+c": "CN+C"}
EARLY_ALL = ["bn", "bn+gate", "cs-ee", "cn", "cn+c"]
COLORS = {"base": "#555555", "bn": "#1f77b4", "bn+gate": "#17becf", "cs-ee": "#2ca02c", "cn": "#ff7f0e",
          "cn+c": "#d62728"}
# The models of the network tables, in their column order.
NET_ALL = ("bn", "cn", "cn+c", "bn+gate", "cs-ee")


def early(res: dict) -> list[str]:
    """The models with early exits that this run has (CS-EE only where it could be calibrated)."""
    return [k for k in EARLY_ALL if k in res["efficiency"]]


def net_models(res: dict) -> list[str]:
    return [k for k in NET_ALL if k in res["meta"]["models"]]


def verdict(ok: bool) -> str:
    return "**reproduced**" if ok else "**not reproduced**"


# ---------------------------------------------------------------------------------------------
# 1. Exit efficiency


def efficiency_rows(res: dict) -> tuple[list, dict]:
    eff, assign, classes = res["efficiency"], res["meta"]["assignment"], res["meta"]["classes"]
    rows, stats = [], {}
    for k in early(res):
        exits = eff[k]["exits"]
        for e, c in enumerate(assign):
            if k == "cs-ee" and e > 0:
                continue  # part 1 runs CS-EE targeted at the exit-1 class only
            conf = np.array(exits[e]["confusion"])
            total_c = sum(int(np.array(x["confusion"])[c].sum()) for x in exits)
            hit = int(conf[c, c])
            predicted_c = int(conf[:, c].sum())
            at_exit = int(exits[e]["count"])
            by_exit = sum(int(np.array(exits[j]["confusion"])[c].sum()) for j in range(e + 1))
            st = {"recall": hit / max(total_c, 1), "precision": hit / predicted_c if predicted_c else None,
                  "share_of_exit": int(conf[c].sum()) / at_exit if at_exit else None, "correct_at_exit": hit,
                  "by_exit": by_exit, "class_total": total_c, "exit_count": at_exit}
            stats[(k, c)] = st
            rows.append([LABELS[k], f"{c} {classes[c]}", f"E{e + 1}", at_exit, hit, pct(st["recall"], 1),
                         pct(st["precision"], 1), pct(st["share_of_exit"], 1), by_exit])
    return rows, stats


def plot_distribution(res: dict, path: Path) -> None:
    eff, classes = res["efficiency"], res["meta"]["classes"]
    keys = early(res)
    cols = (len(keys) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(6 * cols, 8), sharey=True, squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    cmap = plt.get_cmap("tab10")
    for ax, k in zip(axes.flat, keys):
        exits = eff[k]["exits"]
        by_label = np.array([np.array(e["confusion"]).sum(axis=1) for e in exits])  # exits x classes
        bottom = np.zeros(len(exits))
        for c in range(by_label.shape[1]):
            ax.bar([e["name"] for e in exits], by_label[:, c], bottom=bottom, color=cmap(c),
                   label=f"{c} {classes[c]}")
            bottom += by_label[:, c]
        ax.set_title(f"{LABELS[k]}: samples leaving at each exit, by true class")
        ax.set_ylabel("samples")
    axes.flat[0].legend(fontsize=8, ncol=2)
    fig.suptitle("Exit efficiency, ResNet-110 7-exit on the Fashion-MNIST test set (paper Fig. 6)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 2. Speedup


def speedup_table(res: dict) -> tuple[list, dict, dict]:
    """The per-class rows, and per model the best (wall, MACs) speedup over the classes and
    that of the exit-1 class."""
    sp, classes = res["speedup"], res["meta"]["classes"]
    rows, best, first = [], {k: (0.0, 0.0) for k in early(res)}, {}
    for key in sorted(sp, key=lambda c: sp[c]["exit"]):
        row = sp[key]
        base = row["models"]["base"]
        b_wall = base["seconds"] / base["samples"]
        cells = [f"{row['class']} {classes[row['class']]}", f"E{row['exit']}", f"{1000 * b_wall:.2f} ms",
                 pct(base["accuracy"], 1)]
        for k in early(res):
            m = row["models"][k]
            wall = b_wall / (m["seconds"] / m["samples"])
            mac = base["mean_macs"] / m["mean_macs"]
            best[k] = (max(best[k][0], wall), max(best[k][1], mac))
            if row["exit"] == 1:
                first[k] = (wall, mac)
            d = 100 * (m["accuracy"] - base["accuracy"])
            cells.append(f"{wall:.2f}× / {mac:.2f}× ({d:+.1f})")
        rows.append(cells)
    return rows, best, first


def plot_speedup(res: dict, path: Path) -> None:
    sp, classes = res["speedup"], res["meta"]["classes"]
    keys = sorted(sp, key=lambda c: sp[c]["exit"])
    x = np.arange(len(keys))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    keys_m = early(res)
    width = 0.8 / len(keys_m)
    for ax, what in zip(axes, ("wall", "macs")):
        for i, k in enumerate(keys_m):
            vals = []
            for c in keys:
                b, m = sp[c]["models"]["base"], sp[c]["models"][k]
                vals.append((b["seconds"] / b["samples"]) / (m["seconds"] / m["samples"]) if what == "wall"
                            else b["mean_macs"] / m["mean_macs"])
            ax.bar(x + (i - (len(keys_m) - 1) / 2) * width, vals, width, label=LABELS[k], color=COLORS[k])
        ax.set_xticks(x, [f"E{sp[c]['exit']}: {classes[sp[c]['class']]}" for c in keys], rotation=20)
        ax.set_title("wall time, batch 1" if what == "wall" else "multiply-accumulates (from the graph)")
        ax.axhline(1, color="black", lw=0.8)
    axes[0].set_ylabel("speedup over the Baseline's full pass (×)")
    axes[0].legend()
    fig.suptitle("Priority-class speedup (paper Table II, ResNet-110: CS-EE 5.77×, CN 7.51×, CN+C 9.41×)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 3. Composition


def crossover(shares: list[float], a: list[float], b: list[float]) -> float | None:
    """First share where a < b (linear interpolation between sweep points), None if never."""
    d = np.array(a) - np.array(b)
    for i in range(len(d)):
        if d[i] < 0:
            if i == 0:
                return shares[0]
            return shares[i - 1] + (shares[i] - shares[i - 1]) * d[i - 1] / (d[i - 1] - d[i])
    return None


def plot_composition(res: dict, path: Path) -> None:
    comp = res["composition"]
    shares = [100 * p["share"] for p in comp]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for k in ["base"] + early(res):
        axes[0].plot(shares, [p["models"][k]["seconds"] for p in comp], "o-", label=LABELS[k], color=COLORS[k])
        axes[1].plot(shares, [p["models"][k]["mean_macs"] / 1e6 for p in comp], "o-", label=LABELS[k],
                     color=COLORS[k])
    n = comp[0]["models"]["base"]["samples"]
    axes[0].set_title(f"total time for {n:,} samples (batch 16)")
    axes[0].set_ylabel("seconds")
    axes[1].set_title("mean MACs per sample")
    axes[1].set_ylabel("million MACs")
    for ax in axes:
        ax.set_xlabel(f"share of the exit-1 class ({res['meta']['classes'][res['meta']['assignment'][0]]}), %")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Latency versus composition of the test data (paper Fig. 9)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 5. Network


def net(res: dict, link: str, model: str, part: str, data: str, wire: str = "fp32") -> dict | None:
    """One network run; `part` is a partition ("E2") or the adaptive split within it ("auto:E2")."""
    return res.get("network", {}).get("runs", {}).get(f"net-{link}-{model}-{part.replace(':', '-')}-{data}-{wire}")


def budgets(res: dict) -> list[str]:
    """Budgets smallest first, as run (results.json stores its keys sorted as text)."""
    return [b for b in res["meta"]["settings"]["budgets"] if b in res["partitions"]]


ADAPTIVE_NOTE = ("Adaptive split (beyond the paper): `--partition auto:Ek` holds the same head Ek and chooses per "
                 "batch after which of its exits to forward, from measured compute, link and cloud times and the "
                 "recent exit shares. Time · accuracy · time against the static cell above · batches forwarded "
                 "at each cut (exploration included):\n")


def _budget_rows(res: dict, cell) -> list:
    """One row per budget: the budget, BN's partition, then `cell(model, own partition, data,
    marked)` for every model and test set (`marked`: the model runs at a partition of its own)."""
    rows = []
    for b in budgets(res):
        p = res["partitions"][b]
        part = p["partition"]
        cells = [b, part + ("" if p["fits"] else " *")]
        for k in net_models(res):
            own = partition_of(p, k)
            for data in ("uniform", "biased"):
                cells.append(cell(k, own, data, own != part))
        rows.append(cells)
    return rows


def pruning_rows(res: dict) -> list:
    """Table IV's pruning columns: one row per budget and method."""
    paper = res["meta"]["paper"].get("pruning", {})
    rows = []
    for b in budgets(res):
        for m in ("sensitivity", "hrank"):
            r = res.get("pruning", {}).get(b, {}).get(m)
            if r is None:
                continue
            pa = paper.get(m, {}).get(b)
            ref = "-" if pa is None else f"{pa[0]:.2f} % · {pa[1]:,} ms"
            red = paper.get("reduction", {}).get(b)
            if "missing" in r:
                rows.append([b, m, "-", f"- (paper {red:.2f} %)" if red is not None else "-", "not run: " + r["missing"],
                             "-", ref])
                continue
            rows.append([b, m, f"{r['params']:,}" + ("" if r["fits"] else " (over budget)"),
                         f"{100 * r['reduction']:.2f} %" + (f" (paper {red:.2f} %)" if red is not None else ""),
                         f"{100 * r['accuracy']:.2f} %" + (f" ({100 * r['pruned_accuracy']:.1f} % before fine-tuning)"
                                                           if r.get("pruned_accuracy") is not None else ""),
                         f"{r['seconds']:.2f} s", ref])
    return rows


def pruning_section(res: dict, w) -> None:
    pr = res.get("pruning")
    if not pr:
        return
    s = res["meta"]["settings"]
    w("### Pruning baselines: the whole model on the edge (paper Table IV, Sensitivity and HRank)\n")
    w("The ResNet-110 base pruned to each budget by the paper's formula (at most budget / (4 B × 16) parameters, "
      "filters removed, not zeroed; `classynet-train prune`, models/classynet_models/prune.py), fine-tuned briefly "
      "and run whole by `edge-agent classify` with no cloud, on the uniform set of the budget tables "
      f"({s['net_samples']:,} samples, one ONNX Runtime thread, 16 requests in flight). Where the base fits the "
      "budget it runs unpruned, as in the paper. Parameters as the runtime counts them (`classynet plan`). The "
      "paper's figures are CIFAR-10 on a TX2, so its times are set beside ours only for their trend:\n")
    w(markdown(["budget", "method", "parameters", "reduction", "accuracy", "time", "paper (accuracy · time)"],
               pruning_rows(res), align="lllllll"))
    first, last = budgets(res)[0], budgets(res)[-1]
    small = [pr.get(first, {}).get(m) for m in ("sensitivity", "hrank")]
    small = [r for r in small if r and "missing" not in r]
    big = [r for r in (pr.get(last, {}).get(m) for m in ("sensitivity", "hrank")) if r and "missing" not in r]
    if small and big:
        drop = max(b["accuracy"] for b in big) - max(r["accuracy"] for r in small)
        faster = min(b["seconds"] for b in big) / min(r["seconds"] for r in small)
        w(f"**Finding: pruning to the smallest budget costs much accuracy while the time falls** (paper: 90.21 % → "
          f"8.13 % and 15.27 % at 470 kB, 37× faster): {verdict(drop >= 0.10)}: from {last} to {first} the best "
          f"pruned accuracy falls by {100 * drop:.1f} points and the run is {faster:.1f}× faster. "
          + ("Fashion-MNIST is easier than CIFAR-10: a network of a few thousand parameters still separates many "
             "of its classes, so the collapse is smaller than the paper's. " if drop < 0.5 else "")
          + "A ClassyNet at the same budget keeps the full model's accuracy, because the cloud finishes what the "
          "edge's exits do not answer (the tables above).\n")


def budget_table(res: dict, link: str) -> list:
    def cell(k, own, data, marked):
        r = net(res, link, k, own, data)
        return None if r is None else (f"{r['seconds']:.2f} s · {100 * r['accuracy']:.1f} %"
                                       + (f" · {r['answered']['degraded']} degraded" if r["answered"]["degraded"]
                                          else "")
                                       + (f" (at {own} †)" if marked else ""))
    return _budget_rows(res, cell)


def adaptive_table(res: dict, link: str) -> list:
    """The adaptive column: `--partition auto:Ek` (the head the budget gives, the cut chosen per
    batch) against the static partition Ek of the same model, set and link."""
    def cell(k, own, data, marked):
        fixed, auto = net(res, link, k, own, data), net(res, link, k, f"auto:{own}", data)
        if auto is None:
            return None
        cuts = auto.get("forwards_by_cut") or {}
        used = ", ".join(f"{c} {n}" for c, n in sorted(cuts.items(), key=lambda x: int(x[0][1:])))
        return (f"{auto['seconds']:.2f} s · {100 * auto['accuracy']:.1f} %"
                + (f" · {auto['seconds'] / fixed['seconds']:.2f}× static" if fixed else "")
                + (f" · cuts {used}" if used else "")
                + (f" (within {own} †)" if marked else ""))
    return _budget_rows(res, cell)


def plot_budgets(res: dict, path: Path) -> None:
    parts = res["partitions"]
    order = budgets(res)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, data in zip(axes, ("uniform", "biased")):
        for k in net_models(res):
            for link, style in (("shaped", "o-"), ("loopback", "x:")):
                ys = [net(res, link, k, partition_of(parts[b], k), data) for b in order]
                if all(y is None for y in ys):
                    continue
                ax.plot(order, [y["seconds"] if y else np.nan for y in ys], style, color=COLORS[k],
                        label=f"{LABELS[k]} ({link})")
        ax.set_title(f"{data} test set")
        ax.set_xlabel("edge memory budget (partition picked by the planner)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("total time, seconds (log)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Split inference under memory budgets (paper Table IV)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def write(out: Path, res: dict) -> Path:
    EARLY = early(res)  # noqa: N806 (the early-exit models of this run, in column order)
    NET = net_models(res)  # noqa: N806
    meta, s = res["meta"], res["meta"]["settings"]
    classes, assign = meta["classes"], meta["assignment"]
    target = assign[0]
    L: list[str] = []
    w = L.append
    quick = " (QUICK smoke run: sample counts far too small for conclusions)" if s["quick"] else ""
    w(f"# ClassyNet paper, reproduced through this runtime{quick}\n")
    w("Generated by `scripts/reproduce-paper`" + (" --quick" if s["quick"] else "") +
      f" on {meta['started']} in {meta['minutes']:.1f} minutes, commit `{meta['commit']}`. "
      "Every number below was measured by the project's binaries (`classynet run`, `edge-agent classify` "
      "against `cloud-server`) on the zoo models (ResNet-110, 7 exits, trained 6 epochs on Fashion-MNIST; "
      "see `models/zoo/README.md`) and the Fashion-MNIST test set. The paper used CIFAR-10, 1000 "
      "epochs, a Jetson TX2 and a GPU workstation, so absolute numbers differ; the findings are what is "
      "checked. Raw JSON of every run: [`runs/`](runs/), all results with model hashes, settings and the "
      "machine: [`results.json`](results.json).\n")
    m = meta["machine"]
    w(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}, ONNX Runtime "
      f"{m['onnxruntime']}. Seed {meta['seed']}. Priority classes by exit (the paper's assignment): " +
      ", ".join(f"E{i + 1} {c} {classes[c]}" for i, c in enumerate(assign)) + "; E7 the rest. With the IC "
      "design exit k may answer the classes of exits 1..k.\n")
    w(markdown(["model", "file", "sha256 (first 16)", "policy"],
               [[LABELS[k], f"`{v['file']}`", f"`{v['sha256'][:16]}`", f"`{v['policy']}`" if v["policy"] else None]
                for k, v in meta["models"].items()], align="llll"))
    w("`BN + gating` is beyond the paper: the BranchyNet model with its plain exits restricted by a runtime "
      "policy ([`policies/bn-gated.json`](policies/bn-gated.json)) to the same priority classes, no retraining.\n")
    cs = (res.get("calibration") or {}).get("models", {}).get("cs-ee", {})
    if "cs-ee" in EARLY:
        w("`CS-EE` is the paper's comparison [42] (Bonato and Bouganis, class-specific early exits) as this runtime "
          "serves it: the same BranchyNet model, every early exit answering only one targeted class, with an entropy "
          "threshold of its own for that class at each exit, chosen on the held-out images for precision "
          f"(`classynet calibrate --per-class --target {cs.get('target', 'precision=0.99')}` from a policy gating the "
          "exits to that class; [`policies/cs-ee-CLASS.toml`](policies/)). CS-EE targets one class at a time: part "
          "2 serves each priority class with the policy that targets it, the other parts the exit-1 class's. "
          "Bonato and Bouganis also choose where to attach the exits and train them for the class; here the exits "
          "are BranchyNet's, trained for every class, so this CS-EE measures class-specific thresholds, not "
          "class-specific exit placement.\n")
    elif cs.get("skipped"):
        w(f"`CS-EE`: {cs['skipped']}.\n")
    cal = res.get("calibration")
    if cal and cal.get("skipped"):
        w(f"Thresholds: not calibrated ({cal['skipped']}).\n")
    elif cal:
        done = {k: v for k, v in cal["models"].items() if "thresholds" in v}
        w(f"Thresholds: every model with early exits calibrated with `classynet calibrate --target {cal['target']}` "
          f"on the {next(iter(done.values()))['samples'] if done else 0} held-out training images of "
          f"`{cal['split']}` before anything was measured, so the models are compared at the same precision: " +
          "; ".join(f"{LABELS[k]}{' (its class)' if k == 'cs-ee' else ''} ["
                    + ", ".join("off" if t is None else f"{t:.3g}" for t in v["thresholds"]) + "]"
                    for k, v in done.items()) +
          "".join(f"; {LABELS[k]}: {v['skipped']}" for k, v in cal["models"].items() if "skipped" in v) + ".\n")

    # 1
    rows, st = efficiency_rows(res)
    n_eff = res["efficiency"]["bn"]["samples"]
    w("## 1. Exit efficiency (paper Figs. 6–8)\n")
    w(f"{n_eff:,} test samples, batch 16, the models' default thresholds. ![exit distribution](exit-distribution.png)\n")
    w("Per priority class: *at exit* = all samples the exit answered; *correct* = samples of the class "
      "answered correctly there; *recall* = that over all samples of the class; *precision* = correct over the "
      "exit's answers of that class; *share of exit* = the exit's answers whose true class is the priority "
      "class; *by its exit* = samples of the class answered at or before its exit.\n")
    w(markdown(["model", "class", "exit", "at exit", "correct", "recall", "precision", "share of exit",
                "by its exit"], rows))
    e1c, e1b = st[("cn+c", target)], st[("bn", target)]
    prec_ok = (e1c["precision"] or 0) >= 0.95
    more = sum(st[("cn+c", c)]["correct_at_exit"] > st[("bn", c)]["correct_at_exit"] for c in assign)
    w(f"**Finding: CN+C exits carry almost only their classes (E1 precision for class {target} ≥ 95 %)**: "
      f"{verdict(prec_ok)}: E1 precision {pct(e1c['precision'], 1)}, and {pct(e1c['share_of_exit'], 1)} of E1's "
      f"answers are class {target} (BN's E1: {pct(e1b['share_of_exit'], 1)}).\n")
    w(f"**Finding: CN+C answers more of each class at its exit than BN**: "
      f"{verdict(more == len(assign))} for {more} of {len(assign)} classes. Class {target} at E1: CN+C "
      f"{e1c['correct_at_exit']} vs BN {e1b['correct_at_exit']} of {e1c['class_total']}. " +
      "; ".join(f"{classes[c]} at E{i + 1}: {st[('cn+c', c)]['correct_at_exit']} vs {st[('bn', c)]['correct_at_exit']}"
                for i, c in enumerate(assign[1:], start=1)) + ". "
      + ("" if more == len(assign) else
         "Where BN answers more, it is because its class-agnostic exits take every confident sample, "
         "priority class or not: BN's exits answer far more samples in total (see *at exit*), most of "
         "them of other classes.") + "\n")

    # 2
    rows, best, first = speedup_table(res)
    sp0 = next(iter(res["speedup"].values()))
    w("## 2. Priority-class speedup (paper Table II)\n")
    w(f"Each priority class's test images ({sp0['models']['base']['samples']:,} per class) run one at a time "
      f"(batch 1, {s['threads_latency']} ONNX Runtime thread) through every model. Cell: speedup of the mean "
      "time per sample over the Baseline's full pass, measured / the same counted in multiply-accumulates from "
      "the graph (deterministic: each sample costs the MACs of the backbone up to its exit plus every enabled "
      "exit branch on the way), and in brackets the change of the class's accuracy against the Baseline, in "
      "points. ![speedup](speedup.png)\n")
    w(markdown(["class", "its exit", "Baseline time / sample", "Baseline acc"] + [LABELS[k] for k in EARLY], rows))
    paper_sp = {"cs-ee": "5.77×", "cn": "7.51×", "cn+c": "9.41×"}
    w(markdown(["", "paper (ResNet-110, CIFAR-10)", "here, best class: wall", "here, best class: MACs",
                "here, exit-1 class: wall", "here, exit-1 class: MACs"],
               [[LABELS[k], paper_sp.get(k, "–"), times(best[k][0]), times(best[k][1]),
                 times(first.get(k, (None, None))[0]), times(first.get(k, (None, None))[1])]
                for k in ("cs-ee", "cn", "cn+c", "bn", "bn+gate") if k in best]))
    ok = best["cn+c"][0] >= 0.8 * 9.41 and best["cn"][0] >= 0.8 * 7.51
    w(f"**Finding: up to 7.51× (CN) and 9.41× (CN+C) faster for the priority class**: {verdict(ok)} "
      f"(within 20 %): here up to {best['cn'][0]:.2f}× and {best['cn+c'][0]:.2f}× in wall time, "
      f"{best['cn'][1]:.2f}× and {best['cn+c'][1]:.2f}× in MACs. The ceiling is the cost ratio of E1 to the "
      f"full pass: {meta['models']['cn+c']['exit_macs'][0] / 1e6:.1f} M of "
      f"{meta['models']['base']['exit_macs'][0] / 1e6:.1f} M MACs "
      f"({meta['models']['base']['exit_macs'][0] / meta['models']['cn+c']['exit_macs'][0]:.1f}×).\n")
    if "cs-ee" in first and "cn+c" in first:
        (cw, cm), (ew, em) = first["cn+c"], first["cs-ee"]
        ok = cw > ew and cm > em
        top = max(best, key=lambda k: best[k][1])
        # The class CS-EE speeds up most, and the exit most of its samples leave at.
        easy = max(res["speedup"].values(), key=lambda r: r["models"]["base"]["mean_macs"] / r["models"]["cs-ee"]["mean_macs"])
        counts = easy["models"]["cs-ee"]["exit_counts"]
        easy_exit = max(range(len(counts)), key=lambda i: counts[i]) + 1
        w(f"**Finding: CN+C is faster than CS-EE for the top-priority class** (paper: 9.41× against 5.77×, "
          f"{9.41 / 5.77:.2f}× apart): {verdict(ok)}: for class {target} ({classes[target]}), which both send "
          f"out first, CN+C {cw:.2f}× in wall time and {cm:.2f}× in MACs, CS-EE {ew:.2f}× and {em:.2f}× "
          f"({cw / ew:.2f}× and {cm / em:.2f}× apart). CS-EE's thresholds decide only *when* a sample of its class "
          "may leave; its exits were trained for every class, so they are no surer of it than BranchyNet's, while "
          "CN+C's cost matrix trains its exits to be sure of it early. Over all priority classes CS-EE reaches "
          f"up to {best['cs-ee'][0]:.2f}× ({best['cs-ee'][1]:.2f}× in MACs)"
          + (f", the best of all models here ({LABELS[top]} leads in MACs)" if top != "cs-ee" else
             ", the most of any model")
          + f": targeting one class at a time, it lets {classes[easy['class']]} (class {easy['class']}) leave "
          f"mostly at E{easy_exit}, where the paper's assignment gives that class to E{easy['exit']} in CN and CN+C. "
          "That is the trade the paper names: CS-EE serves one class, ClassyNet several at once in a chosen "
          "order.\n")
    w("What sets these speedups is where each class's samples leave. Share of each priority class answered "
      "at its own exit or earlier (same runs):\n")
    rows = []
    for key in sorted(res["speedup"], key=lambda c: res["speedup"][c]["exit"]):
        row = res["speedup"][key]
        e = row["exit"]
        cells = [f"{row['class']} {classes[row['class']]}", f"E{e}"]
        for k in EARLY:
            m = row["models"][k]
            cells.append(pct(sum(m["exit_counts"][:e]) / m["samples"], 1))
        rows.append(cells)
    w(markdown(["class", "its exit"] + [LABELS[k] for k in EARLY], rows))
    w("BN's exits are class-agnostic, so on Fashion-MNIST, whose easy classes (Trouser, Bag, Sneaker, Ankle boot) "
      "are recognised early by any exit, BN also answers many priority samples early, often earlier than their "
      "assigned exit. CN and CN+C only reach the paper's speedups where they send nearly all of a class out at "
      "its exit, which 6 epochs of training achieve for few classes.\n")

    # 3
    comp = res["composition"]
    shares = [p["share"] for p in comp]
    sec = {k: [p["models"][k]["seconds"] for p in comp] for k in ["base"] + EARLY}
    mac = {k: [p["models"][k]["mean_macs"] for p in comp] for k in ["base"] + EARLY}
    n_comp = comp[0]["models"]["base"]["samples"]
    w("## 3. Latency versus composition (paper Fig. 9)\n")
    w(f"{n_comp:,} test samples per point; the share of class {target} ({classes[target]}, the exit-1 class) "
      "goes from {0:.0f} % to {1:.0f} %. Sampling (seed {2}): exactly round(share × n) images of the class and "
      "the rest spread evenly over the other classes, each class drawn from seeded permutations of its test "
      "images laid end to end (an image repeats only after all of its class were used; 10 % of 10,000 is exactly "
      "the test set), then shuffled; see `eval/classynet_eval/composition.py`. Batch 16, {3} ONNX Runtime "
      "threads. Per-sample = total / n. ![composition](composition.png)\n".format(
          100 * shares[0], 100 * shares[-1], meta["seed"], s["threads_throughput"]))
    # The Baseline's work does not depend on the composition, so a point where it ran much
    # slower than its median shows the (shared) machine was busy then: flagged, and left out of
    # the wall-time crossover.
    base_median = float(np.median(sec["base"]))
    disturbed = [i for i, t in enumerate(sec["base"]) if t > 1.2 * base_median]
    rows = []
    for i, p in enumerate(comp):
        rows.append([f"{100 * p['share']:.0f} %" + (" †" if i in disturbed else "")]
                    + [f"{sec[k][i]:.2f} s · {1000 * sec[k][i] / n_comp:.3f} ms" for k in ["base"] + EARLY]
                    + [f"{mac['cn'][i] / mac['bn'][i]:.2f}"])
    w(markdown(["class share"] + [LABELS[k] for k in ["base"] + EARLY] + ["CN/BN MACs"], rows))
    if disturbed:
        w("† Disturbed: the Baseline, whose work does not depend on the composition, took " +
          ", ".join(f"{sec['base'][i]:.1f} s at {100 * shares[i]:.0f} %" for i in disturbed) +
          f" against a median of {base_median:.1f} s, so the machine was busy during that point; its wall times "
          "are left out of the crossover below (the MAC column is exact regardless).\n")
    keep = [i for i in range(len(shares)) if i not in disturbed]
    shares_w = [shares[i] for i in keep]
    x_wall = crossover(shares_w, [sec["cn"][i] for i in keep], [sec["bn"][i] for i in keep])
    x_mac = crossover(shares, mac["cn"], mac["bn"])
    r90 = sec["cn"][-1] / sec["bn"][-1]
    r10 = (sec["bn"][0] / sec["base"][0], sec["cn"][0] / sec["base"][0])
    ok = x_wall is not None and x_wall <= 0.7 and r90 <= 0.8
    w(f"**Finding: CN overtakes BN once the priority class is about half the traffic, and is well ahead at 90 %** "
      f"(paper: near 50 %, CN at 40 % of BN at 90 %): {verdict(ok)}. Here CN overtakes BN at "
      f"{'never' if x_wall is None else f'{100 * x_wall:.0f} %'} in wall time "
      f"({'never' if x_mac is None else f'{100 * x_mac:.0f} %'} in MACs); at {100 * shares[-1]:.0f} % CN takes "
      f"{100 * r90:.0f} % of BN's time. At {100 * shares[0]:.0f} % BN takes {100 * r10[0]:.0f} % and CN "
      f"{100 * r10[1]:.0f} % of the Baseline's time (paper: 42 % and 85 %).\n")
    # Where the crossover must lie, from per-class costs measured on the whole test set.
    def class_macs(k: str) -> tuple[float, float]:
        exits, cost = res["efficiency"][k]["exits"], meta["models"][k]["exit_macs"]
        per_label = np.array([np.array(e["confusion"]).sum(axis=1) for e in exits])  # exits x classes
        t = per_label[:, target] @ np.array(cost) / max(per_label[:, target].sum(), 1)
        others = np.delete(per_label, target, axis=1).sum(axis=1)
        return float(t), float(others @ np.array(cost) / max(others.sum(), 1))
    (t_cn, o_cn), (t_bn, o_bn) = class_macs("cn"), class_macs("bn")
    gap_o, gap_t = o_cn - o_bn, t_bn - t_cn
    star = gap_o / (gap_o + gap_t) if gap_t > 0 and gap_o + gap_t > 0 else None
    w(f"Why, in MACs per sample on the whole test set: a class-{target} sample costs {t_cn / 1e6:.1f} M under CN "
      f"and {t_bn / 1e6:.1f} M under BN; any other sample {o_cn / 1e6:.1f} M under CN and {o_bn / 1e6:.1f} M "
      "under BN (CN holds other classes back for later exits). CN is cheaper than BN only once the share of class "
      f"{target} exceeds (other-class gap) / (other-class gap + class-{target} gap) = "
      + (f"**{100 * star:.0f} %**" if star is not None and star < 1 else "never (CN does not save on the class)")
      + ". The paper's BN left most of its priority class for later exits (320 of 1,000 at E1); here BN's E1 "
      f"already answers {pct(st[('bn', target)]['by_exit'] / max(st[('bn', target)]['class_total'], 1), 1)} of "
      f"class {target}, CN's {pct(st[('cn', target)]['by_exit'] / max(st[('cn', target)]['class_total'], 1), 1)}.\n")

    # 4
    w("## 4. Accuracy (paper Table III)\n")
    eff, fin = res["efficiency"], res["final_exit"]
    rows = []
    for k, name in (("base", "resnet110-7exit-base"), ("bn", "resnet110-7exit-bn"), ("cn", "resnet110-7exit-cn"),
                    ("cn+c", "resnet110-7exit-cnc"), ("bn+gate", "resnet110-7exit-bn + gating policy"),
                    ("cs-ee", "resnet110-7exit-bn + CS-EE policy (exit-1 class)"), ("tiny", "tiny-3exit-cn")):
        if k not in eff:
            continue
        acc_early = eff[k]["accuracy"]
        final = fin[k]["accuracy"] if k in fin else (eff[k]["accuracy"] if k == "base" else fin["bn"]["accuracy"])
        answered_early = sum(e["count"] for e in eff[k]["exits"][:-1])
        rows.append([name, pct(final), pct(acc_early), f"{100 * (acc_early - eff['base']['accuracy']):+.2f}"
                     if k != "tiny" else None, f"{answered_early:,}"])
    w(f"{eff['base']['samples']:,} test samples. *Final exit*: every early exit turned off by policy; *with "
      "early exits*: the default thresholds. Paper (ResNet-110, CIFAR-10): Baseline 90.21 %, 7-exit BN 89.92 %, "
      "CN 89.34 %; every model within 1 point of the Baseline.\n")
    w(markdown(["model", "final exit", "with early exits", "Δ vs Baseline (points)", "answered before the last exit"],
               rows))
    worst = min(eff[k]["accuracy"] for k in ("bn", "cn", "cn+c")) - eff["base"]["accuracy"]
    w(f"**Finding: early-exit models stay within 1 point of the Baseline**: {verdict(worst >= -0.01)}: "
      + (f"the largest drop is {100 * -worst:.2f} points. " if worst < 0 else "none of BN, CN, CN+C is below it. ")
      + "The zoo was trained 6 epochs on a 2-core CPU, not 1000 on "
      "GPUs; the cards in `models/zoo/` give the training details.\n")

    # 5
    parts = res["partitions"]
    w("## 5. Memory budgets over a network (paper Tables IV and V)\n")
    w("The planner (`classynet plan --formula paper`, the paper's params × 4 B × batch 16) picks the deepest "
      "partition whose size fits the budget. `edge-agent classify` then runs the head on the edge and sends the "
      "survivors of each batch to `cloud-server` (edge and cloud one ONNX Runtime thread each; a closed loop of 16 "
      f"requests in flight, the paper's batch of 16; {s['net_samples']:,} samples per run: the uniform set has "
      f"{s['net_samples'] // 10:,} per class, the biased one 90 % class {target}).\n")
    rows = []
    for b in budgets(res):
        p = parts[b]
        pf = next(x for x in p["paper_formula"]["partitions"] if x["name"] == p["partition"])
        rows.append([b, p["partition"] + ("" if p["fits"] else " *"), f"{pf['paper_formula_bytes'] / 1e6:.2f} MB",
                     p["runtime_formula"]["chosen"] or "none fits",
                     p["paper_formula"]["explanation"] or p["paper_formula"]["error"]])
    w(markdown(["budget", "partition run", "its size (paper formula)", "runtime formula would pick", "planner"],
               rows, align="lllll"))
    own = sorted({(b, k, partition_of(p, k)) for b, p in parts.items() for k in ("cn", "cn+c")
                  if partition_of(p, k) != p["partition"]})
    if own:
        w("† " + "; ".join(f"at {b}, {LABELS[k]} runs {e} ({parts[b]['by_model'][k]['paper_formula_bytes'] / 1e6:.2f} MB"
                           " by the paper's formula)" for b, k, e in own)
          + ": its exit heads hold more parameters than BranchyNet's (the model's card gives their conv layers), "
          "so the deepest partition that fits is shallower. Each model runs at its own pick; the table's "
          "partition is BranchyNet's.\n")
    if any(not p["fits"] for p in parts.values()):  # noqa: SIM110
        w("\\* No partition fits this budget; the smallest (E1) is run, over budget. The zoo's ResNet-110 has "
          "heavier exit branches than the paper's (E2 holds 51,365 parameters here, 37,728 in the paper), so the "
          "paper's budgets map one exit shallower. The runtime's own measure (weights + peak activations) is "
          "stricter still: batch-16 activations alone take 2.41 MB.\n")
    skipped = res.get("network", {}).get("skipped")
    link = res.get("network", {}).get("link")
    headers = ["budget", "partition"] + [f"{LABELS[k]} {d}" for k in NET for d in ("uniform", "biased")]
    w("### Over an emulated edge–cloud link\n")
    if skipped:
        w(f"Not run: {skipped}.\n")
    else:
        mm = link["measured"]
        w(f"Two network namespaces (`{link['edge_ns']}` {link['edge_ip']}, `{link['cloud_ns']}` {link['cloud_ip']}) "
          f"joined by a veth pair. Rate: `tbf` at {link['rate_mbit']:g} Mbit/s on each end's egress. One-way delay "
          f"{link['one_way_delay_ms']:g} ms each way, made by **{link['delay_by']}**" +
          (" (this kernel has no `netem` qdisc: `link-relay`, this project's relay in the edge namespace, "
           "holds every chunk of bytes, in each direction, for the one-way delay before passing it on, in order "
           "and with bounded buffers; the edge connects to it on 127.0.0.1)" if link["delay_by"] == "relay" else "")
          + ". The default models the paper's ~200 ms per batch exchange: a full batch of 16 cut at E1 is "
          "16 × 46.6 kB = 745 kB in FP32, 149 ms at 40 Mbit/s, plus a 50 ms round trip.\n")
        w("Link check (a probe across the same path, before the runs):\n")
        w(markdown(["", "configured", "measured"],
                   [["round-trip time", f"{mm['configured_rtt_ms']:.1f} ms",
                     f"{mm['rtt_ms_median']:.1f} ms median ({mm['rtt_ms_min']:.1f}–{mm['rtt_ms_max']:.1f})"],
                    ["throughput edge → cloud", f"{mm['configured_mbit_s']:g} Mbit/s", f"{mm['up_mbit_s']:.1f} Mbit/s"],
                    ["throughput cloud → edge", f"{mm['configured_mbit_s']:g} Mbit/s",
                     f"{mm['down_mbit_s']:.1f} Mbit/s"],
                    ["bytes delivered", f"{mm['bytes']:,} each way",
                     f"{mm['up_bytes_received']:,} / {mm['down_bytes_received']:,}"]]))
        w("Total time for the set · accuracy (`BN + gating` is beyond the paper; the paper's Table IV has no "
          "CS-EE column, so CS-EE's cells have no figure to set beside them):\n")
        w(markdown(headers, budget_table(res, "shaped")))
        w(ADAPTIVE_NOTE)
        w(markdown(headers, adaptive_table(res, "shaped")))
        first = budgets(res)[0]
        p0 = parts[first]["partition"]
        bnb = net(res, "shaped", "bn", p0, "biased")
        cnb = net(res, "shaped", "cn+c", partition_of(parts[first], "cn+c"), "biased")
        if bnb and cnb:
            ratio = bnb["seconds"] / cnb["seconds"]
            c0 = partition_of(parts[first], "cn+c")
            cuts = p0 if c0 == p0 else f"BN at {p0}, CN+C at {c0}"
            w(f"**Finding: at the smallest budget with biased traffic CN+C beats BN by several times** (paper: "
              f"61,283 vs 8,412 ms, 7.3×): {verdict(ratio >= 3)}: at {first} ({cuts}) BN takes {bnb['seconds']:.2f} s "
              f"and CN+C {cnb['seconds']:.2f} s, {ratio:.1f}×. BN sends {bnb['answered']['cloud']:,} of "
              f"{bnb['samples']:,} samples to the cloud, CN+C {cnb['answered']['cloud']:,}: what decides the "
              "time at a low cut is how much crosses the link. "
              + ("" if ratio >= 3 else
                 f"BN's E1 already answers {pct(st[('bn', target)]['by_exit'] / max(st[('bn', target)]['class_total'], 1), 1)} "
                 f"of class {target} (CN+C's: "
                 f"{pct(st[('cn+c', target)]['by_exit'] / max(st[('cn+c', target)]['class_total'], 1), 1)}), so "
                 "biased traffic keeps as much of BN's work on the edge as of CN+C's; in the paper BN's E1 "
                 "answered 32 % of its priority class.") + "\n")
        w("### INT8 against FP32 on the wire (beyond the paper), same link\n")
        rows = []
        for b in budgets(res):
            p = parts[b]
            for d in ("uniform", "biased"):
                cells = [b, p["partition"], d]
                for k in NET:
                    own = partition_of(p, k)
                    f32, i8 = net(res, "shaped", k, own, d), net(res, "shaped", k, own, d, "int8")
                    cells.append(None if not (f32 and i8) else
                                 f"{f32['seconds']:.2f} → {i8['seconds']:.2f} s ({f32['seconds'] / i8['seconds']:.2f}×), "
                                 f"{100 * (i8['accuracy'] - f32['accuracy']):+.2f} pts"
                                 + ("" if own == p["partition"] else f" (at {own} †)"))
                rows.append(cells)
        w(markdown(["budget", "partition", "set"] + [LABELS[k] for k in NET], rows))
    w("### On loopback (no shaping)\n")
    w(markdown(headers, budget_table(res, "loopback")))
    w(ADAPTIVE_NOTE)
    w(markdown(headers, adaptive_table(res, "loopback")))
    w("![budgets](budgets.png)\n")
    pruning_section(res, w)

    # What differs
    w("## How this differs from the paper\n")
    w("- Data and training: Fashion-MNIST, not CIFAR-10; 6 epochs on a CPU, not 1000 on GPUs; one run per "
      "model, not an average of ten.\n"
      "- Devices: one shared x86 machine plays edge and cloud (one ONNX Runtime thread each in part 5), not a "
      "Jetson TX2 and a workstation; the link is emulated as described above.\n"
      "- The network runs use " f"{s['net_samples']:,}" " samples each, not 10,000, to fit the whole "
      "reproduction in well under an hour on a 2-core machine (`--net-samples 10000` runs the paper's size).\n"
      "- CS-EE is the BranchyNet model with class-specific thresholds (see above), not Bonato and Bouganis's own "
      "exit placement and training; the pruning baselines are fine-tuned for one epoch, not to convergence.\n")
    w("Regenerate: `scripts/reproduce-paper` (about " f"{meta['minutes']:.0f}" " minutes here; needs root for "
      "the namespaces, otherwise part 5 runs on loopback only and says so).\n")

    plot_distribution(res, out / "exit-distribution.png")
    plot_speedup(res, out / "speedup.png")
    plot_composition(res, out / "composition.png")
    plot_budgets(res, out / "budgets.png")
    path = out / "README.md"
    path.write_text("\n".join(L))
    return path
