"""`scripts/reproduce-paper`: the ClassyNet paper's evaluation (section VI) run through this
project's binaries on the zoo models and the Fashion-MNIST test set, written to a report folder
(README.md with every table, PNG plots, the raw JSON of every run).

Parts, as numbered in the report:
  1. exit efficiency (Figs. 6-8): per-exit class distribution, recall and precision per priority class;
  2. priority-class speedup (Table II): wall time at batch 1 and MACs counted from the graph;
  3. latency versus composition (Fig. 9): the exit-1 class's share from 10 % to 90 %;
  4. accuracy (Table III) of every zoo model;
  5. memory budgets over a network (Tables IV-V): edge-agent and cloud-server in two network
     namespaces over a shaped veth link, and on loopback;
  6. beyond the paper: BranchyNet with runtime class gating, and the INT8 wire.

CS-EE (Bonato and Bouganis, the paper's [42]) is the BN model served with class-specific exits:
every early exit answers only the one targeted class, each with its own entropy threshold
calibrated for precision (`classynet calibrate --per-class`); one such policy per targeted class.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from classynet_models import idx

from . import netlink
from .binaries import Bins, EvalError, classynet_calibrate, classynet_run, cloud_server, edge_classify, plan
from .composition import composition, write_npz
from .macs import model_exit_costs
from .tables import partition_of

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "zoo"
# The training images the zoo's models held out (the trainer's validation.json of their runs).
VALIDATION = ZOO / "validation.json"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
PAPER_ASSIGNMENT = [9, 8, 6, 1, 7, 0]  # classes prioritised at exits E1..E6 (paper, section VI-A)
BUDGETS = ["470kB", "2.31MB", "5.54MB", "28.5MB", "112MB"]
# The paper's figures this report is set beside (ResNet-110, CIFAR-10).
PAPER = {
    "speedup": {"cn": 7.51, "cn+c": 9.41, "cs-ee": 5.77},
    "accuracy": {"base": 90.21, "bn": 89.92, "cn": 89.34},
    "fig9": "BN at 10 %: about 2,500 ms (42 % of Baseline); CN about 4,800 ms (85 %); CN overtakes BN near 50 %; "
            "at 90 % CN is about 1,000 ms, 40 % of BN",
    # Table IV's pruning columns: (accuracy %, time ms) per budget, and the reductions of section VI-B.
    "pruning": {"sensitivity": {"470kB": (8.13, 352), "2.31MB": (25.57, 968), "5.54MB": (63.37, 1525),
                                "28.5MB": (82.13, 4180), "112MB": (90.21, 13090)},
                "hrank": {"470kB": (15.27, 378), "2.31MB": (28.71, 1084), "5.54MB": (66.16, 1754),
                          "28.5MB": (85.34, 4812), "112MB": (90.21, 13090)},
                "reduction": {"470kB": 99.59, "2.31MB": 97.94, "5.54MB": 95.05, "28.5MB": 74.55, "112MB": 0.0}},
    "table4_470k": {"bn_uniform": 59182, "bn_biased": 61283, "cn_biased": 16084, "cnc_uniform": 73919,
                    "cnc_biased": 8412},
}


@dataclass
class Settings:
    quick: bool
    seed: int = 0
    efficiency_samples: int | None = None  # None: the whole test set
    speedup_per_class: int | None = None  # None: every test image of the class
    composition_samples: int = 10_000
    shares: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    budgets: list[str] = field(default_factory=lambda: list(BUDGETS))
    net_samples: int = 2_000
    rate_mbit: float = 40.0
    delay_ms: float = 25.0
    delay_by: str = "auto"
    probe_bytes: int = 8 << 20
    threads_latency: int = 1
    threads_throughput: int = 2
    network: bool = True
    # Every model with early exits is calibrated to this target on the zoo's validation split
    # (models/zoo/validation.json) before anything is measured; "none" runs the typed thresholds.
    calibrate: str = "precision=0.99"
    # Held-out images calibration uses: None, all of the split; the quick run takes the first
    # 1,000 (the eleven calibrations of the full split would take most of its time).
    calibration_samples: int | None = None

    @staticmethod
    def make(quick: bool) -> "Settings":
        if not quick:
            return Settings(quick=False)
        return Settings(quick=True, efficiency_samples=400, speedup_per_class=30, composition_samples=400,
                        shares=[0.1, 0.5, 0.9], budgets=["470kB", "112MB"], net_samples=160, rate_mbit=100.0,
                        delay_ms=5.0, probe_bytes=1 << 20, calibration_samples=1000)


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def step(self, what: str):
        self.done += 1
        t = time.monotonic()
        label = f"[{self.done}/{self.total}] {what}"
        print(label + " ...", end="", file=sys.stderr, flush=True)

        def finish(note: str = ""):
            print(f" {time.monotonic() - t:.1f} s{note}  (elapsed {time.monotonic() - self.start:.0f} s)",
                  file=sys.stderr, flush=True)
        return finish


def say(msg: str) -> None:
    print(f"[reproduce-paper] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Inputs


def read_idx(path: Path) -> np.ndarray:
    try:
        return idx.read_idx(path)
    except idx.IdxError as e:
        raise EvalError(str(e)) from None


def fashion_test(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    files = [data_dir / "t10k-images-idx3-ubyte.gz", data_dir / "t10k-labels-idx1-ubyte.gz"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise EvalError(f"Fashion-MNIST test set not found ({', '.join(missing)}): install the Debian package "
                        "dataset-fashion-mnist (scripts/setup does) or pass --data-dir")
    return read_idx(files[0]), read_idx(files[1]).astype(np.int64)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import onnxruntime
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


def commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+local-changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Variant:
    """A model as served: a zoo file plus an optional runtime policy."""
    key: str
    label: str
    file: Path
    policy: Path | None = None


def gating_policy(path: Path, class_sets: list[list[int]]) -> Path:
    """BranchyNet's plain exits restricted by policy to the class sets CN was trained with,
    thresholds unchanged."""
    policy = {"version": 1, "exits": [{"name": f"E{k + 1}", "classes": c} for k, c in enumerate(class_sets)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy, indent=1) + "\n")
    return path


def cs_ee_start(path: Path, early_exits: int, target: int) -> Path:
    """The starting policy of CS-EE for one targeted class: every early exit gated to that class
    (calibration then gives it a threshold of its own at each exit, or keeps it from leaving)."""
    policy = {"version": 1, "exits": [{"name": f"E{k + 1}", "classes": [target]} for k in range(early_exits)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy, indent=1) + "\n")
    return path


def exit_enabled(meta_exits: list[dict]) -> list[bool]:
    return [e.get("threshold") is not None for e in meta_exits]


# ---------------------------------------------------------------------------------------------
# The experiments


class Study:
    def __init__(self, s: Settings, bins: Bins, out: Path, data_dir: Path, work: Path):
        self.s, self.bins, self.out, self.work = s, bins, out, work
        self.runs = out / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.images, self.labels = fashion_test(data_dir)
        cnc = json.loads(_meta(ZOO / "resnet110-7exit-cnc.onnx"))
        self.classes = cnc["classes"]
        # The class newly assigned at each early exit; with the IC scheme exit k answers the classes
        # of exits 1..k (the metadata's class sets are cumulative).
        self.assignment = [a[0] for a in cnc["training"]["assignment"]]
        self.class_sets = [e["classes"] for e in cnc["exits"][:-1]]
        if self.assignment != PAPER_ASSIGNMENT:
            say(f"note: the zoo's cn+c assignment {self.assignment} differs from the paper's {PAPER_ASSIGNMENT}")
        self.target = self.assignment[0]
        gate = gating_policy(out / "policies" / "bn-gated.json", self.class_sets)
        self.variants = {
            "base": Variant("base", "Baseline", ZOO / "resnet110-7exit-base.onnx"),
            "bn": Variant("bn", "BN", ZOO / "resnet110-7exit-bn.onnx"),
            "bn+gate": Variant("bn+gate", "BN + class gating", ZOO / "resnet110-7exit-bn.onnx", gate),
            # Class-specific exits for the exit-1 class; part 2 uses one policy per priority class.
            "cs-ee": Variant("cs-ee", "CS-EE", ZOO / "resnet110-7exit-bn.onnx"),
            "cn": Variant("cn", "CN", ZOO / "resnet110-7exit-cn.onnx"),
            "cn+c": Variant("cn+c", "CN+C", ZOO / "resnet110-7exit-cnc.onnx"),
        }
        self.costs = {}
        for k, v in self.variants.items():
            meta = json.loads(_meta(v.file))
            self.costs[k] = model_exit_costs(v.file, exit_enabled(meta["exits"]))
        # CS-EE targets one class at a time: its policy (and MACs) per targeted class.
        self.cs_ee: dict[int, Path] = {}
        self.results: dict = {}
        self.data_dir = data_dir

    def calibrate(self) -> dict:
        """Calibrates every model with early exits (and BN's gated variant, with its gating) to
        one target on the zoo's validation split, so that BranchyNet and ClassyNet are compared
        at the same precision rather than at thresholds someone typed. A model trained without
        the split keeps its typed thresholds, and the report says so."""
        split = str(VALIDATION.relative_to(ROOT)) if VALIDATION.is_relative_to(ROOT) else str(VALIDATION)
        info: dict = {"target": self.s.calibrate, "split": split, "models": {}}
        self.results["calibration"] = info
        if self.s.calibrate == "none":
            info["skipped"] = "--calibrate none: every model runs its typed thresholds"
            self._drop_cs_ee(info, info["skipped"])
            return info
        if not VALIDATION.is_file():
            info["skipped"] = (f"{split} is missing: the zoo predates the validation split, "
                               "so every model runs its typed thresholds")
            say(f"calibration skipped: {info['skipped']}")
            self._drop_cs_ee(info, info["skipped"])
            return info
        self.split = VALIDATION
        if self.s.calibration_samples:
            doc = json.loads(VALIDATION.read_text())
            indices = doc["indices"] if isinstance(doc, dict) else doc
            self.work.mkdir(parents=True, exist_ok=True)
            self.split = self.work / "validation-subset.json"
            self.split.write_text(json.dumps({"indices": indices[: self.s.calibration_samples]}))
        for k, v in list(self.variants.items()):
            training = json.loads(_meta(v.file)).get("training", {})
            if k == "base":
                continue
            if training.get("validation") in (None, "0"):
                info["models"][k] = {"skipped": "trained on the whole training split: typed thresholds kept"}
                if k == "cs-ee":
                    self._drop_cs_ee(info, "BN was trained on the whole training split")
                continue
            if k == "cs-ee":
                info["models"][k] = self._calibrate_cs_ee(v)
                continue
            policy = self.out / "policies" / f"{k}-calibrated.toml"
            r = classynet_calibrate(self.bins, v.file, "fashion-mnist:train", self.split, self.s.calibrate, policy,
                                    v.policy, self.data_dir)
            v.policy = policy
            thresholds = [e["threshold"] for e in r["exits"][:-1]]
            # A disabled exit's branch is not run: the MACs follow the calibrated policy.
            self.costs[k] = model_exit_costs(v.file, [t is not None for t in thresholds] + [True])
            info["models"][k] = {"thresholds": thresholds, "samples": r["samples"], "accuracy": r["accuracy"],
                                 "exit_counts": [e["count"] for e in r["exits"]],
                                 "notes": [e["note"] for e in r["exits"] if e.get("note")]}
            say(f"calibrated {v.label}: thresholds {thresholds}")
        return info

    def _drop_cs_ee(self, info: dict, why: str) -> None:
        """CS-EE's thresholds are measured per class on held-out data; without it there is no
        CS-EE to serve, and the report says why."""
        self.variants.pop("cs-ee", None)
        self.costs.pop("cs-ee", None)
        info["models"]["cs-ee"] = {"skipped": f"not run: its per-class thresholds need the validation split ({why})"}

    def _calibrate_cs_ee(self, v: Variant) -> dict:
        """One CS-EE policy per priority class: the early exits gated to that class, each with
        its own threshold for it at the precision target (an accuracy-drop target has no
        per-class meaning: CS-EE then uses precision=0.99)."""
        n_early = len(json.loads(_meta(v.file))["exits"]) - 1
        target = self.s.calibrate if self.s.calibrate.startswith("precision") else "precision=0.99"
        per_class = {}
        for c in self.assignment:
            start = cs_ee_start(self.out / "policies" / f"cs-ee-{c}-start.json", n_early, c)
            policy = self.out / "policies" / f"cs-ee-{c}.toml"
            r = classynet_calibrate(self.bins, v.file, "fashion-mnist:train", self.split, target, policy,
                                    start, self.data_dir, per_class=True)
            self.cs_ee[c] = policy
            self.costs[f"cs-ee:{c}"] = model_exit_costs(v.file, [e["enabled"] for e in r["exits"]])
            thresholds = [e["class_thresholds"].get(str(c)) for e in r["exits"][:-1]]
            per_class[str(c)] = {"thresholds": thresholds, "samples": r["samples"], "accuracy": r["accuracy"],
                                 "exit_counts": [e["count"] for e in r["exits"]],
                                 "notes": [e["note"] for e in r["exits"] if e.get("note")]}
            say(f"calibrated CS-EE for class {c}: its thresholds {thresholds}")
        v.policy = self.cs_ee[self.target]
        self.costs["cs-ee"] = self.costs[f"cs-ee:{self.target}"]
        return {**per_class[str(self.target)], "target": target, "per_class": per_class}

    def save(self, name: str, obj: dict) -> dict:
        (self.runs / f"{name}.json").write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        return obj

    def dataset(self, name: str, share: float | None, n: int | None, only: int | None = None) -> str:
        if only is not None:
            idx = np.flatnonzero(self.labels == only)
            idx = idx[:n] if n else idx
        elif share is None:
            idx = np.arange(len(self.labels))[:n] if n else np.arange(len(self.labels))
        else:
            idx = composition(self.labels, self.target, share, n, self.s.seed)
        return "npz:" + str(write_npz(self.work / f"{name}.npz", self.images, self.labels, idx))

    def mean_macs(self, key: str, run: dict) -> float:
        counts = [e["count"] for e in run["exits"]]
        return sum(c * m for c, m in zip(counts, self.costs[key])) / max(sum(counts), 1)

    # 1 and 4 -------------------------------------------------------------------------------
    def efficiency(self, prog: Progress) -> None:
        ds = self.dataset("test", None, self.s.efficiency_samples)
        out = {}
        for k, v in self.variants.items():
            done = prog.step(f"exit efficiency / accuracy: {v.label} on the test set")
            r = classynet_run(self.bins, v.file, ds, 16, self.s.threads_throughput, v.policy)
            out[k] = self.save(f"efficiency-{k}", r)
            done(f"  accuracy {100 * r['accuracy']:.2f} %")
        tiny = ZOO / "tiny-3exit-cn.onnx"
        done = prog.step("accuracy: tiny-3exit-cn")
        out["tiny"] = self.save("efficiency-tiny", classynet_run(self.bins, tiny, ds, 16, self.s.threads_throughput))
        done()
        # Final-exit accuracy: the same models with every early exit turned off by policy.
        final = {}
        for k, f in (("bn", self.variants["bn"].file), ("cn", self.variants["cn"].file),
                     ("cn+c", self.variants["cn+c"].file), ("tiny", tiny)):
            n_exits = len(json.loads(_meta(f))["exits"])
            pol = self.work / f"final-only-{n_exits}.json"
            pol.write_text(json.dumps({"version": 1, "exits": [{"name": f"E{i + 1}", "disabled": True}
                                                               for i in range(n_exits - 1)]}))
            done = prog.step(f"accuracy: {k} with early exits off")
            final[k] = self.save(f"final-exit-{k}", classynet_run(self.bins, f, ds, 16, self.s.threads_throughput,
                                                                  pol))
            done()
        self.results["efficiency"] = out
        self.results["final_exit"] = final

    # 2 -------------------------------------------------------------------------------------
    def speedup(self, prog: Progress) -> None:
        out = {}
        for exit_i, c in enumerate(self.assignment):
            ds = self.dataset(f"class-{c}", None, self.s.speedup_per_class, only=c)
            row = {}
            for k, v in self.variants.items():
                done = prog.step(f"speedup: class {c} ({self.classes[c]}) through {v.label}, batch 1")
                # CS-EE serves each priority class with the policy that targets it.
                policy, cost_key = v.policy, k
                if k == "cs-ee" and c in self.cs_ee:
                    policy, cost_key = self.cs_ee[c], f"cs-ee:{c}"
                r = classynet_run(self.bins, v.file, ds, 1, self.s.threads_latency, policy)
                row[k] = {"seconds": r["seconds"], "samples": r["samples"], "accuracy": r["accuracy"],
                          "mean_macs": self.mean_macs(cost_key, r), "exit_counts": [e["count"] for e in r["exits"]]}
                self.save(f"speedup-class{c}-{k}", r)
                done()
            out[str(c)] = {"class": c, "exit": exit_i + 1, "models": row}
        self.results["speedup"] = out

    # 3 -------------------------------------------------------------------------------------
    def composition_sweep(self, prog: Progress) -> None:
        out = []
        for share in self.s.shares:
            ds = self.dataset(f"share-{round(share * 100)}", share, self.s.composition_samples)
            point = {"share": share, "models": {}}
            for k, v in self.variants.items():
                done = prog.step(f"composition: {round(100 * share)} % class {self.target}, {v.label}")
                r = classynet_run(self.bins, v.file, ds, 16, self.s.threads_throughput, v.policy)
                self.save(f"composition-{round(share * 100)}-{k}", r)
                point["models"][k] = {"seconds": r["seconds"], "samples": r["samples"], "accuracy": r["accuracy"],
                                      "mean_macs": self.mean_macs(k, r)}
                done()
            out.append(point)
        self.results["composition"] = out

    # 5 and 6 -------------------------------------------------------------------------------
    def partitions(self) -> dict:
        picks = {}
        for b in self.s.budgets:
            picks[b] = {}
            for k in ("bn", "cn", "cn+c"):
                paper = plan(self.bins, self.variants[k].file, b, "paper")
                runtime = plan(self.bins, self.variants[k].file, b, "runtime")
                chosen = paper["chosen"] or paper["partitions"][0]["name"]
                picks[b][k] = {"run": chosen, "fits": paper["chosen"] is not None, "paper": paper,
                               "runtime": {"chosen": runtime["chosen"], "error": runtime["error"],
                                           "explanation": runtime["explanation"]}}
        # The row of a budget is BranchyNet's pick. A model whose exit heads are larger (the zoo's
        # cn+c has two-conv heads) may fit a shallower cut at the same budget: it runs at its own
        # pick, kept in `by_model`, and the report marks the cell.
        self.results["partitions"] = {b: {"partition": p["bn"]["run"], "fits": p["bn"]["fits"],
                                          "paper_formula": p["bn"]["paper"], "runtime_formula": p["bn"]["runtime"],
                                          "by_model": {k: {"partition": v["run"], "fits": v["fits"],
                                                           "paper_formula_bytes": _formula_bytes(v["paper"], v["run"])}
                                                       for k, v in p.items()}}
                                      for b, p in picks.items()}
        return self.results["partitions"]

    # 5, the pruning baselines ---------------------------------------------------------------
    def pruned_model(self, method: str, budget: str) -> tuple[Path | None, str]:
        """The zoo's `method` pruning of the base for `budget`, or the base itself where it fits
        the budget by the paper's formula (the paper's 0 % reduction at 112 MB)."""
        base = self.variants["base"].file
        if plan(self.bins, base, budget, "paper")["chosen"] is not None:
            return base, "the base fits: nothing pruned"
        f = ZOO / f"resnet110-prune-{method}-{budget}.onnx"
        if f.is_file():
            return f, ""
        return None, f"{f.relative_to(ROOT)} is missing: BUDGETS={budget} scripts/train-zoo prune-{method} makes it"

    def pruning(self, prog: Progress) -> None:
        """Table IV's Sensitivity and HRank columns: each pruned model run whole on the edge
        (`edge-agent classify`, no cloud) on the uniform set the budget table uses."""
        ds = self.dataset("net-uniform", 0.1, self.s.net_samples)
        out = {}
        for b in self.s.budgets:
            out[b] = {}
            for method in ("sensitivity", "hrank"):
                f, note = self.pruned_model(method, b)
                if f is None:
                    out[b][method] = {"missing": note}
                    say(f"pruning: {note}")
                    continue
                done = prog.step(f"pruning: {method} for {b} on the edge alone ({f.name})")
                meta = json.loads(_meta(f))
                formula = plan(self.bins, f, b, "paper")
                r = edge_classify(self.bins, f, "E1", None, ds, threads=1, concurrency=16)
                self.save(f"pruning-{method}-{b}", r)
                pr = meta.get("training", {}).get("pruning") or {}
                out[b][method] = {"file": str(f.relative_to(ROOT)), "note": note, "seconds": r["seconds"],
                                  "accuracy": r["accuracy"], "samples": r["samples"],
                                  "answered": r["answered"], "params": formula["partitions"][0]["params"],
                                  "paper_formula_bytes": formula["partitions"][0]["paper_formula_bytes"],
                                  "fits": formula["chosen"] is not None,
                                  "base_params": pr.get("base_params"), "reduction": pr.get("reduction", 0.0),
                                  "finetune_epochs": pr.get("finetune_epochs", 0),
                                  "pruned_accuracy": pr.get("pruned_accuracy")}
                done(f", accuracy {100 * r['accuracy']:.2f} %, {formula['partitions'][0]['params']:,} parameters")
        self.results["pruning"] = out

    def network_jobs(self, links: list[str]) -> list[tuple]:
        jobs = []
        for link in links:
            for model in [m for m in ("bn", "bn+gate", "cs-ee", "cn", "cn+c") if m in self.variants]:
                wires = ["fp32", "int8"] if link == "shaped" else ["fp32"]
                parts = sorted({partition_of(p, model) for p in self.results["partitions"].values()},
                               key=lambda e: int(e[1:]))
                for part in parts:
                    for data in ("uniform", "biased"):
                        for wire in wires:
                            jobs.append((link, model, part, data, wire))
                        # The adaptive split within the same head: the edge chooses per batch after
                        # which of its exits to forward (FP32, like the static column it is set against).
                        jobs.append((link, model, f"auto:{part}", data, "fp32"))
        return jobs

    def network(self, prog: Progress, links: list[str], jobs: list[tuple]) -> None:
        sets = {"uniform": self.dataset("net-uniform", 0.1, self.s.net_samples),
                "biased": self.dataset("net-biased", 0.9, self.s.net_samples)}
        res = self.results.setdefault("network", {"runs": {}})
        for link in links:
            if link == "shaped":
                with netlink.Link(self.s.rate_mbit, self.s.delay_ms, self.s.delay_by, self.work) as ln:
                    done = prog.step(f"link check: {self.s.rate_mbit:g} Mbit/s, {self.s.delay_ms:g} ms one way "
                                     f"({ln.used})")
                    check = netlink.validate(ln, self.bins, self.s.probe_bytes)
                    res["link"] = {**ln.describe(), "measured": check}
                    self.save("link-check", res["link"])
                    done(f"  RTT {check['rtt_ms_median']:.1f} ms, up {check['up_mbit_s']:.1f} / down "
                         f"{check['down_mbit_s']:.1f} Mbit/s")
                    self._network_link(prog, link, [j for j in jobs if j[0] == link], sets, ln)
            else:
                self._network_link(prog, link, [j for j in jobs if j[0] == link], sets, None)

    def _network_link(self, prog, link, jobs, sets, ln) -> None:
        res = self.results["network"]["runs"]
        for model in dict.fromkeys(j[1] for j in jobs):
            v = self.variants[model]
            ns = netlink.CLOUD_NS if ln else None
            listen = f"{netlink.CLOUD_IP}:0" if ln else "127.0.0.1:0"
            with cloud_server(self.bins, v.file, listen, v.policy, 1, self.work / f"cloud-{link}-{model}.log",
                              ns=ns) as cloud:
                ep = ln.endpoint(self.bins, cloud.port, model) if ln else None
                addr = ep.addr if ep else cloud.addr
                try:
                    for (_, _, part, data, wire) in [j for j in jobs if j[1] == model]:
                        name = f"net-{link}-{model}-{part.replace(':', '-')}-{data}-{wire}"
                        done = prog.step(f"{link} link: {v.label} at {part}, {data} set, {wire}")
                        r = edge_classify(self.bins, v.file, part, addr, sets[data], threads=1, concurrency=16,
                                          wire=wire, ns=netlink.EDGE_NS if ln else None)
                        self.save(name, r)
                        res[name] = {"seconds": r["seconds"], "accuracy": r["accuracy"], "answered": r["answered"],
                                     "wire_bytes_per_sample": r["wire_bytes_per_sample"], "samples": r["samples"],
                                     "policy_version": r["policy_version"], "latency_ms": r["latency_ms"],
                                     "forwards_by_cut": {c: x["batches"] for c, x in
                                                         r.get("forwards_by_cut", {}).items()}}
                        done(f", accuracy {100 * r['accuracy']:.2f} %, "
                             f"edge {r['answered']['edge']} / cloud {r['answered']['cloud']}")
                finally:
                    if ep:
                        ep.__exit__(None, None, None)


def _formula_bytes(plan: dict, name: str) -> int:
    return next(x["paper_formula_bytes"] for x in plan["partitions"] if x["name"] == name)


def _meta(path: Path) -> str:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "classynet":
            return p.value
    raise EvalError(f"{path} has no classynet metadata")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/reproduce-paper", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke-sized run: a few hundred samples, two budgets, a short link delay")
    ap.add_argument("--out", type=Path, help="report folder (default: reports/paper; with --quick reports/paper-quick, so "
                    "a smoke run never overwrites the committed report)")
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release",
                    help="where classynet, edge-agent, cloud-server and link-relay are (default: %(default)s)")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CLASSYNET_DATA_DIR", FASHION_DIR)),
                    help="Fashion-MNIST folder (default: the Debian package's, %(default)s)")
    ap.add_argument("--net-samples", type=int, help="samples per network run (default 2000; quick: 160)")
    ap.add_argument("--rate-mbit", type=float, help="link rate each way in Mbit/s (default 40; quick: 100)")
    ap.add_argument("--delay-ms", type=float, help="one-way link delay in ms (default 25; quick: 5)")
    ap.add_argument("--link-delay", choices=["auto", "netem", "relay"], default="auto",
                    help="how the delay is made: netem where the kernel has it (auto), or link-relay")
    ap.add_argument("--no-network", action="store_true", help="skip part 5 (the namespaces need root)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every sampled test set (default 0)")
    ap.add_argument("--calibrate", default="precision=0.99",
                    help="calibrate every model with early exits to this `classynet calibrate --target` on the "
                         "zoo's validation split before measuring (default precision=0.99), or none")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite README.md and the plots from the report folder's results.json, running nothing")
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = ROOT / "reports" / ("paper-quick" if a.quick else "paper")
    if a.render_only:
        from . import report
        results = a.out / "results.json"
        if not results.is_file():
            ap.error(f"--render-only needs {results} from an earlier run")
        report.write(a.out, json.loads(results.read_text()))
        say(f"report rewritten from {results}")
        return 0

    s = Settings.make(a.quick)
    s.seed = a.seed
    s.calibrate = a.calibrate.strip()
    s.delay_by = a.link_delay
    for name in ("net_samples", "rate_mbit", "delay_ms"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    if s.net_samples <= 0 or s.rate_mbit <= 0 or s.delay_ms < 0:
        ap.error("--net-samples and --rate-mbit must be positive and --delay-ms at least 0")

    from . import report  # matplotlib is imported only when a report is written

    bins = Bins(a.bin_dir)
    for b in ("classynet", "edge-agent", "cloud-server", "link-relay"):
        bins.path(b)
    out = a.out.resolve()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"classynet-reproduce-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    if out.exists():
        for old in list((out / "runs").glob("*.json")) + list(out.glob("*.png")):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)

    skip_net = "skipped with --no-network" if a.no_network else netlink.unavailable()
    links = ["loopback"] if skip_net else ["loopback", "shaped"]
    if skip_net:
        say(f"the shaped-link experiment is skipped: {skip_net}")

    try:
        return _run(s, bins, out, a.data_dir, work, links, skip_net)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)  # the sampled test sets: regenerated from the seed


def _run(s: Settings, bins: Bins, out: Path, data_dir: Path, work: Path, links: list[str], skip_net) -> int:
    from . import report

    study = Study(s, bins, out, data_dir, work)
    study.calibrate()
    study.partitions()
    jobs = study.network_jobs(links)
    n_models = len(study.variants)
    n_pruned = sum(study.pruned_model(m, b)[0] is not None for b in s.budgets for m in ("sensitivity", "hrank"))
    total = ((n_models + 1 + 4) + 6 * n_models + len(s.shares) * n_models + len(jobs) + (0 if skip_net else 1)
             + n_pruned)
    prog = Progress(total)
    say(f"{'quick' if s.quick else 'full'} run: {total} steps, report in {out}")
    started = time.time()
    study.efficiency(prog)
    study.speedup(prog)
    study.composition_sweep(prog)
    study.pruning(prog)
    study.network(prog, links, jobs)
    study.results["network"]["skipped"] = skip_net
    meta = {"settings": asdict(s), "machine": machine(), "commit": commit(), "seed": s.seed,
            "models": {k: {"file": str(v.file.relative_to(ROOT)), "sha256": sha256(v.file),
                           "policy": str(v.policy.relative_to(out)) if v.policy else None,
                           "exit_macs": study.costs[k]} for k, v in study.variants.items()},
            "assignment": study.assignment, "classes": study.classes,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "minutes": (time.time() - started) / 60, "paper": PAPER}
    study.results["meta"] = meta
    (out / "results.json").write_text(json.dumps(study.results, indent=1, sort_keys=True, default=str) + "\n")
    report.write(out, study.results)
    say(f"report written: {out / 'README.md'} ({meta['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EvalError as e:
        print(f"scripts/reproduce-paper: {e}", file=sys.stderr)
        sys.exit(1)
