"""Starting and driving the project's binaries (classynet, cloud-server, edge-agent, link-relay),
optionally inside a network namespace, with every call bounded in time."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class EvalError(RuntimeError):
    pass


def ort_library() -> Path:
    """libonnxruntime.so of the venv's onnxruntime wheel (the version the binaries are built for)."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"))
    if not libs:
        raise EvalError(f"no libonnxruntime.so under {capi}; run scripts/setup")
    return libs[0]


@dataclass
class Bins:
    dir: Path

    def path(self, name: str) -> str:
        p = self.dir / name
        if not p.is_file():
            raise EvalError(f"{p} not found: build it first (cargo build --release, which scripts/reproduce-paper runs)")
        return str(p)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("ORT_DYLIB_PATH", str(ort_library()))
        env.setdefault("RUST_LOG", "warn")
        return env


def ns_exec(ns: str | None) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def run_json(cmd: list[str], env: dict, timeout: float, what: str) -> dict:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise EvalError(f"{what} did not finish within {timeout:.0f} s: {' '.join(cmd)}") from e
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-15:])
        raise EvalError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{tail}")
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise EvalError(f"{what} printed no JSON: {p.stdout[:400]!r}") from e


def classynet_run(bins: Bins, model: Path, dataset: str, batch: int, threads: int,
                  policy: Path | None = None, timeout: float = 3600) -> dict:
    cmd = [bins.path("classynet"), "run", "--model", str(model), "--dataset", dataset, "--batch", str(batch),
           "--threads", str(threads), "--json"]
    if policy:
        cmd += ["--policy", str(policy)]
    return run_json(cmd, bins.env(), timeout, f"classynet run of {model.name} on {dataset}")


def classynet_calibrate(bins: Bins, model: Path, dataset: str, samples: Path, target: str, out: Path,
                        policy: Path | None = None, data_dir: Path | None = None, timeout: float = 3600,
                        per_class: bool = False) -> dict:
    """`classynet calibrate` on `samples` of `dataset`, writing the policy to `out`; its JSON report.
    `per_class`: a threshold per class at every exit (CS-EE)."""
    cmd = [bins.path("classynet"), "calibrate", "--model", str(model), "--dataset", dataset, "--samples",
           str(samples), "--target", target, "--batch", "64", "--out", str(out), "--json"]
    if policy:
        cmd += ["--policy", str(policy)]
    if per_class:
        cmd += ["--per-class"]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    out.parent.mkdir(parents=True, exist_ok=True)
    return run_json(cmd, bins.env(), timeout, f"classynet calibrate of {model.name}")


class Service:
    """A long-running binary that prints `... listening on ADDR` once ready; stopped with SIGTERM."""

    def __init__(self, cmd: list[str], env: dict, log: Path, what: str, ready_timeout: float = 120):
        self.what = what
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump():
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + ready_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                self.stop()
                raise EvalError(f"{what} did not report ready within {ready_timeout:.0f} s (log: {log})")
            if line is None:
                code = self.proc.wait()
                raise EvalError(f"{what} exited with {code} before it was ready (log: {log}): {' '.join(cmd)}")
            m = re.search(r"listening on (\S+)", line)
            if m:
                self.addr = m.group(1)
                self.port = int(self.addr.rsplit(":", 1)[1])
                return

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def cloud_server(bins: Bins, model: Path, listen: str, policy: Path | None, threads: int, log: Path,
                 ns: str | None = None) -> Service:
    cmd = ns_exec(ns) + [bins.path("cloud-server"), "--model", str(model), "--listen", listen,
                         "--threads", str(threads), "--max-batch", "64"]
    if not listen.startswith("127."):
        # Inside the experiment's private namespaces, which nothing else can reach.
        cmd.append("--insecure")
    if policy:
        cmd += ["--policy", str(policy)]
    return Service(cmd, bins.env(), log, f"cloud-server ({model.name})")


def link_relay(bins: Bins, upstream: str, delay_ms: float, log: Path, ns: str | None = None) -> Service:
    cmd = ns_exec(ns) + [bins.path("link-relay"), "--listen", "127.0.0.1:0", "--upstream", upstream,
                         "--delay-ms", f"{delay_ms:g}"]
    return Service(cmd, bins.env(), log, f"link-relay to {upstream}")


def edge_classify(bins: Bins, model: Path, partition: str, server: str | None, dataset: str, *, threads: int,
                  concurrency: int, wire: str = "fp32", ns: str | None = None, timeout: float = 3600,
                  extra: list[str] | None = None) -> dict:
    """`edge-agent classify --json`; `extra` are more arguments of the verb (e.g. --limit N).
    Without a server the partition must hold the whole model (every sample answered on the edge)."""
    cmd = ns_exec(ns) + [bins.path("edge-agent"), "--model", str(model), "--partition", partition,
                         *(["--server", server] if server else []), "--threads", str(threads), "--max-batch", "16",
                         "--wire-dtype", wire, "--cloud-timeout-ms", "120000",
                         "classify", "--dataset", dataset, "--concurrency", str(concurrency), "--json",
                         *(extra or [])]
    return run_json(cmd, bins.env(), timeout, f"edge-agent classify ({model.name}, {partition}, {wire})")


def plan(bins: Bins, model: Path, budget: str, formula: str) -> dict:
    """The planner's JSON for `budget`: `chosen` is the partition ("E2") or None when none fits
    (then `error` says why; the command exits 1 but still prints the JSON); `partitions` has every
    partition's costs."""
    cmd = [bins.path("classynet"), "plan", "--model", str(model), "--budget", budget, "--formula", formula, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=bins.env())
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise EvalError(f"classynet plan failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr.strip()}") from e
