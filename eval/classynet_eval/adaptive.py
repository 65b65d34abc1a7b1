"""Benchmark of `edge-agent --partition auto` against every static partition (scripts/bench-adaptive).

For each link (loopback; then rate-shaped links between two network namespaces, tbf for the rate
and link-relay for the delay, as in the paper reproduction) and each traffic mix (uniform: 10 % of
the priority class; biased: 90 %), every static partition E1..E(M-1) and `auto` classify the same
samples, REPEATS times interleaved (E1, E2, ..., auto, E1, ...), and the median times are compared:
the target is auto within 5 % of the best static partition. Then, on a shaped link whose rate
changes in the middle of the run (`tc qdisc change` once half of the samples are answered, seen
on the edge's metrics), each run's two halves are timed; the target is auto within 5 % of the best
static partition of each half.

Every run uses the same wire (INT8 and zstd), one edge thread, batches of 16, 16 requests in
flight, and the model's own exit policy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from . import netlink
from .binaries import Bins, EvalError, cloud_server, ns_exec
from .composition import composition, write_npz
from .reproduce import FASHION_DIR, fashion_test

LINKS = {"loopback": None, "40mbit-25ms": (40.0, 25.0), "5mbit-50ms": (5.0, 50.0)}
WIRE = ["--wire-compression", "zstd"]


def meta(model: Path) -> dict:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    return json.loads({p.key: p.value for p in m.metadata_props}["classynet"])


def median(v: list[float]) -> float:
    return statistics.median(v)


def run_set(bins, model, parts, addr, dataset, ns, repeats, log) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {p: [] for p in parts}
    for r in range(repeats):
        for p in parts:
            out = _classify(bins, model, p, addr, dataset, ns)
            if out["answered"]["degraded"]:
                raise EvalError(f"{p}: {out['answered']['degraded']} samples answered degraded")
            times[p].append(out["seconds"])
            cuts = out.get("forwards_by_cut", {})
            log(f"    repeat {r + 1} {p:>4}: {out['seconds']:7.2f} s, accuracy {100 * out['accuracy']:.2f} %"
                + (f", batches per cut {json.dumps({k: v['batches'] for k, v in cuts.items()})}" if p == "auto" else ""))
    return times


def _edge_cmd(bins, model, partition, addr, dataset, metrics: str | None = None) -> list[str]:
    cmd = [bins.path("edge-agent"), "--model", str(model), "--partition", partition, "--server", addr,
           "--threads", "1", "--max-batch", "16", "--wire-dtype", "int8", *WIRE, "--cloud-timeout-ms", "120000"]
    if metrics:
        cmd += ["--metrics-listen", metrics]
    return cmd + ["classify", "--dataset", dataset, "--concurrency", "16", "--json"]


def _classify(bins, model, partition, addr, dataset, ns) -> dict:
    p = subprocess.run(ns_exec(ns) + _edge_cmd(bins, model, partition, addr, dataset), capture_output=True,
                       text=True, timeout=1800, env=bins.env())
    if p.returncode != 0:
        raise EvalError(f"edge-agent --partition {partition} failed: {p.stderr[-800:]}")
    return json.loads(p.stdout)


def answered(port: int) -> float:
    """Samples the edge has answered (its metrics), polled from inside its namespace."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("classynet_samples_answered_total{"))


def watch(port: int, half: int) -> None:
    """Run inside the edge namespace: prints `half` once `half` samples are answered."""
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        try:
            if answered(port) >= half:
                print("half", flush=True)
                return
        except OSError:
            pass
        time.sleep(0.05)


def change_run(bins, model, part, addr, dataset, n, link, rate_after, metrics_port, log) -> tuple[float, float]:
    """One run whose link rate changes when half of its n samples are answered: (first half s, second half s)."""
    # The rate the run starts with.
    link.set_rate(link.rate_mbit)
    env = bins.env()
    edge = subprocess.Popen(ns_exec(netlink.EDGE_NS) + _edge_cmd(bins, model, part, addr, dataset,
                                                                 f"127.0.0.1:{metrics_port}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watcher = subprocess.Popen(ns_exec(netlink.EDGE_NS) + [sys.executable, "-m", "classynet_eval.adaptive", "watch",
                                                           "--port", str(metrics_port), "--half", str(n // 2)],
                               stdout=subprocess.PIPE, text=True, env=env)
    switched: list[float] = []

    def on_half():
        if watcher.stdout and watcher.stdout.readline().strip() == "half":
            switched.append(time.monotonic())
            link.set_rate(rate_after)

    th = threading.Thread(target=on_half, daemon=True)
    th.start()
    out, err = edge.communicate(timeout=1800)
    end = time.monotonic()
    watcher.kill()
    th.join(timeout=5)
    if edge.returncode != 0:
        raise EvalError(f"edge-agent {part} failed: {err[-800:]}")
    r = json.loads(out)
    if r["answered"]["degraded"] or not switched:
        raise EvalError(f"{part}: degraded {r['answered']['degraded']}, switched {bool(switched)}")
    # The process's own start (model load, warm-up, policy) is before classify's clock starts.
    start = end - r["seconds"]
    first, second = switched[0] - start, end - switched[0]
    cuts = r.get("forwards_by_cut", {})
    log(f"    {part:>4}: first half {first:6.2f} s, second half {second:6.2f} s"
        + (f", batches per cut {json.dumps({k: v['batches'] for k, v in cuts.items()})}" if part == "auto" else ""))
    return first, second


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench-adaptive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("watch")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--half", type=int, required=True)
    ap.add_argument("--model", type=Path, default=Path("models/zoo/resnet110-7exit-cnc.onnx"))
    ap.add_argument("--bin-dir", type=Path, default=Path("target/release"))
    ap.add_argument("--data-dir", type=Path, default=FASHION_DIR)
    ap.add_argument("--samples", type=int, default=1000, help="samples per run (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default: %(default)s)")
    ap.add_argument("--links", default=",".join(LINKS), help="links to run, '' for none (default: %(default)s)")
    ap.add_argument("--no-change", action="store_true", help="skip the mid-run rate change")
    ap.add_argument("--out", type=Path, default=Path("reports/bench-adaptive.json"))
    a = ap.parse_args(argv)
    if a.cmd == "watch":
        watch(a.port, a.half)
        return 0

    bins = Bins(a.bin_dir)
    work = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip())
    m = meta(a.model)
    exits = len(m["exits"])
    target = m["exits"][0]["classes"][0]
    parts = [f"E{k}" for k in range(1, exits)] + ["auto"]
    images, labels = fashion_test(a.data_dir)
    sets = {name: "npz:" + str(write_npz(work / f"{name}.npz", images, labels,
                                         composition(labels, target, share, a.samples, 0)))
            for name, share in (("uniform", 0.1), ("biased", 0.9))}

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict = {"model": str(a.model), "samples": a.samples, "repeats": a.repeats, "links": {}}
    log(f"model {a.model} · {a.samples} samples per run (priority class {target}: 10 % uniform, 90 % biased) · "
        f"INT8 + zstd · {a.repeats} interleaved repeats")
    verdicts = []
    for name in [n for n in a.links.split(",") if n]:
        shape = LINKS[name]
        ln = netlink.Link(*shape, log_dir=work) if shape else None
        try:
            if ln:
                ln.__enter__()
            ns = netlink.CLOUD_NS if ln else None
            listen = f"{netlink.CLOUD_IP}:0" if ln else "127.0.0.1:0"
            with cloud_server(bins, a.model, listen, None, 1, work / f"cloud-{name}.log", ns=ns) as cloud:
                ep = ln.endpoint(bins, cloud.port, name) if ln else None
                addr = ep.addr if ep else cloud.addr
                try:
                    for data, ds in sets.items():
                        log(f"{name}, {data} traffic:")
                        t = run_set(bins, a.model, parts, addr, ds, netlink.EDGE_NS if ln else None, a.repeats, log)
                        med = {p: median(v) for p, v in t.items()}
                        best = min((p for p in parts if p != "auto"), key=lambda p: med[p])
                        ratio = med["auto"] / med[best]
                        ok = ratio <= 1.05
                        verdicts.append(ok)
                        results["links"].setdefault(name, {})[data] = {"seconds": t, "median": med, "best_static": best,
                                                                       "auto_over_best": ratio, "met": ok}
                        log("  medians: " + ", ".join(f"{p} {med[p]:.2f} s" for p in parts))
                        log(f"  auto / best static ({best}): {ratio:.3f} · target <= 1.05: {'met' if ok else 'NOT met'}")
                finally:
                    if ep:
                        ep.__exit__(None, None, None)
        finally:
            if ln:
                ln.__exit__(None, None, None)

    if not a.no_change:
        before, after = LINKS["40mbit-25ms"][0], LINKS["5mbit-50ms"][0]
        log(f"rate change mid-run: {before:g} Mbit/s, then {after:g} Mbit/s once half the samples are answered "
            f"(25 ms each way), biased traffic, {a.samples * 2} samples:")
        big = "npz:" + str(write_npz(work / "change.npz", images, labels,
                                     composition(labels, target, 0.9, a.samples * 2, 1)))
        with netlink.Link(before, 25.0, log_dir=work) as ln:
            with cloud_server(bins, a.model, f"{netlink.CLOUD_IP}:0", None, 1, work / "cloud-change.log",
                              ns=netlink.CLOUD_NS) as cloud:
                with ln.endpoint(bins, cloud.port, "change") as ep:
                    halves = {p: [] for p in parts}
                    for r in range(a.repeats):
                        for p in parts:
                            halves[p].append(change_run(bins, a.model, p, ep.addr, big, a.samples * 2, ln, after,
                                                        19300 + r, log))
        first = {p: median([h[0] for h in v]) for p, v in halves.items()}
        second = {p: median([h[1] for h in v]) for p, v in halves.items()}
        statics = [p for p in parts if p != "auto"]
        b1, b2 = min(statics, key=lambda p: first[p]), min(statics, key=lambda p: second[p])
        r1, r2 = first["auto"] / first[b1], second["auto"] / second[b2]
        ok = r1 <= 1.05 and r2 <= 1.05
        verdicts.append(ok)
        results["change"] = {"first": first, "second": second, "best_first": b1, "best_second": b2,
                             "auto_over_best_first": r1, "auto_over_best_second": r2, "met": ok}
        log(f"  first half: auto / best static ({b1}) {r1:.3f}; second half: auto / best static ({b2}) {r2:.3f} · "
            f"target <= 1.05 each: {'met' if ok else 'NOT met'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    log(f"{sum(verdicts)} of {len(verdicts)} cases within 5 % of the best static partition; figures in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
