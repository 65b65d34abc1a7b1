"""The body of scripts/bench-split (see there): interleaved repeats and the wire table. `int8/128`
is INT8 with 128 codes per range (`--wire-int8-levels 128`)."""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = os.environ["MODEL"]
BIN = Path(os.environ["BIN"])
REPEATS = int(os.environ.get("REPEATS", "5"))
LIMIT = os.environ.get("LIMIT")
ENV = {**os.environ, "RUST_LOG": "warn"}


def exits_of(model: str) -> int:
    import onnx

    m = onnx.load(model, load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return len(json.loads(meta["classynet"])["exits"])


class Cloud:
    def __init__(self, policy: str | None, threads: int):
        args = [str(BIN / "cloud-server"), "--model", MODEL, "--listen", "127.0.0.1:0", "--threads", str(threads)]
        if policy:
            args += ["--policy", policy]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.time() + 120
        self.addr = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.match(r"cloud-server listening on (\S+)", line)
            if m:
                self.addr = m.group(1)
                break
        if not self.addr:
            self.proc.kill()
            sys.exit(f"cloud-server did not start: {self.proc.stderr.read()}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def classify(addr: str, *flags: str) -> dict:
    args = [str(BIN / "edge-agent"), "--threads", "1", "--server", addr, "--model", MODEL, *flags, "classify", "--json"]
    if LIMIT:
        args += ["--limit", LIMIT]
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=ENV)
    return json.loads(out.stdout)


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def verdict(values: list[float], target: float) -> str:
    if min(values) >= target:
        return f"met (every repeat >= {target})"
    if statistics.median(values) >= target:
        return f"median met, but the spread crosses {target}"
    if max(values) >= target:
        return f"NOT met (median below {target}; the spread crosses it)"
    return f"NOT met (every repeat below {target})"


def main():
    n_exits = exits_of(MODEL)
    print(f"model {MODEL} · Fashion-MNIST test set{f' (first {LIMIT})' if LIMIT else ''} · loopback · {REPEATS} interleaved repeats")
    with tempfile.TemporaryDirectory() as tmp:
        off = Path(tmp) / "off.toml"
        off.write_text("version = 1\n" + "".join(f'[[exits]]\nname = "E{i}"\ndisabled = true\n' for i in range(1, n_exits)))
        off_json = Path(tmp) / "off.json"
        off_json.write_text(json.dumps({"version": 1, "exits": [{"name": f"E{i}", "disabled": True} for i in range(1, n_exits)]}))

        # 1. Throughput, interleaved: classynet run, then split, REPEATS times.
        cloud = Cloud(str(off), 2)
        ratios, runs, splits = [], [], []
        try:
            for _ in range(REPEATS):  # REPEATS=0 skips the throughput part
                args = [str(BIN / "classynet"), "--threads", "2", "run", "--model", MODEL, "--policy", str(off_json), "--batch", "16", "--json"]
                if LIMIT:
                    args += ["--limit", LIMIT]
                run = json.loads(subprocess.run(args, check=True, capture_output=True, text=True, env=ENV).stdout)["samples_per_second"]
                split = classify(cloud.addr, "--partition", "E1", "--wire-compression", "none")["samples_per_second"]
                runs.append(run)
                splits.append(split)
                ratios.append(split / run)
        finally:
            cloud.stop()
        if ratios:
            print(f"exits off, cut E1: classynet run (2 threads) {spread(runs)} samples/s; edge (1 thread) + cloud (2 threads) {spread(splits)} samples/s")
            print(f"  ratio split / run: {spread(ratios)} · target >= 0.92: {verdict(ratios, 0.92)}")

    # 2. The wire at E1 under the model's policy.
    cloud = Cloud(None, 1)
    try:
        rows = []
        for dtype in ["fp32", "fp16", "int8", "int8/128"]:
            for comp in ["none", "zstd", "gzip"]:
                wire = ["--wire-dtype", "int8", "--wire-int8-levels", "128"] if dtype == "int8/128" else ["--wire-dtype", dtype]
                d = classify(cloud.addr, "--partition", "E1", *wire, "--wire-compression", comp)
                w = d["wire"]
                if d["answered"]["degraded"]:
                    sys.exit(f"{dtype} {comp}: {d['answered']['degraded']} samples answered degraded; the figures would not measure the wire")
                rows.append((dtype, comp, w["tensor_bytes_per_forwarded_sample"], w["sent_bytes_per_forwarded_sample"], d["accuracy"]))
    finally:
        cloud.stop()
    base_sent, base_acc = rows[0][3], rows[0][4]
    print("wire at E1 (per forwarded sample; 'sent' includes gRPC framing and the quantisation parameters):")
    print(f"  {'dtype':8} {'compression':11} {'tensor B':>9} {'sent B':>9} {'vs fp32':>8} {'accuracy':>9} {'Δ point':>8}")
    for dtype, comp, tensor, sent, acc in rows:
        print(f"  {dtype:8} {comp:11} {tensor:9.0f} {sent:9.0f} {base_sent / sent:7.2f}x {100 * acc:8.2f}% {100 * (acc - base_acc):+8.2f}")
    for dtype in ("int8", "int8/128"):
        r = next(r for r in rows if r[0] == dtype and r[1] == "zstd")
        fewer, lost = base_sent / r[3], 100 * (base_acc - r[4])
        ok = fewer >= 6 and lost <= 0.3
        print(f"  target {dtype} + zstd >= 6x fewer bytes for <= 0.3 point: {fewer:.2f}x, {lost:+.2f} point lost: "
              f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
