"""Runs one of the fleet benchmarks' short schedules (`scripts/NAME --quick`) against the binaries
in $CLASSYNET_BIN_DIR, in a session of its own so that on a timeout the whole group (the binaries
it started too) is killed; fails with the script's output unless it exits 0."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))


def run_quick(script: str, timeout_s: float) -> str:
    cmd = [sys.executable, str(ROOT / "scripts" / script), "--quick", "--bin-dir", str(BIN)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        raise AssertionError(f"scripts/{script} --quick did not finish within {timeout_s:.0f} s:\n{out}")
    assert p.returncode == 0, f"scripts/{script} --quick exited {p.returncode}:\n{out}"
    return out
