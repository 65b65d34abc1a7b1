"""The chaos benchmark's short schedule (scripts/chaos --quick) against the binaries in
$CLASSYNET_BIN_DIR: cloud kills, silent link stalls, a policy change behind the stall and a
black-hole cloud, under load from four edges. Passes when every assertion the script prints
passes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))
# The quick schedule takes about a minute; the rest is room for a slow machine.
TIMEOUT_S = 240


def test_quick_chaos_run_passes():
    cmd = [sys.executable, str(ROOT / "scripts" / "chaos"), "--quick", "--bin-dir", str(BIN)]
    # Its own session, so that on a timeout the whole group (the binaries too) can be killed.
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        raise AssertionError(f"scripts/chaos --quick did not finish within {TIMEOUT_S} s:\n{out}")
    assert p.returncode == 0, f"scripts/chaos --quick exited {p.returncode}:\n{out}"
    # Shown with -s or -rP: the figures of the run.
    print(out)
