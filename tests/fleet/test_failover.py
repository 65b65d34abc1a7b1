"""The failover benchmark's short schedule (scripts/failover --quick) against the binaries in
$CLASSYNET_BIN_DIR: three cloud-server replicas and four edge-agents given all three, under load
while replicas are SIGKILLed and restarted, the shared policy file changes, and one replica comes
back with another model. Passes when every assertion the script prints passes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CLASSYNET_BIN_DIR", ROOT / "target" / "debug"))
# The quick schedule takes about a minute and a half; the rest is room for a slow machine.
TIMEOUT_S = 300


def test_quick_failover_run_passes():
    cmd = [sys.executable, str(ROOT / "scripts" / "failover"), "--quick", "--bin-dir", str(BIN)]
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
        raise AssertionError(f"scripts/failover --quick did not finish within {TIMEOUT_S} s:\n{out}")
    assert p.returncode == 0, f"scripts/failover --quick exited {p.returncode}:\n{out}"
    print(out)
