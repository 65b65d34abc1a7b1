"""The failover benchmark's short schedule (scripts/failover --quick): three cloud-server replicas
and four edge-agents given all three, under load while replicas are SIGKILLed and restarted, the
shared policy file changes, and one replica comes back with another model. Passes when every
assertion the script prints passes."""
from quickrun import run_quick

# The quick schedule takes about a minute and a half; the rest is room for a slow machine.
TIMEOUT_S = 300


def test_quick_failover_run_passes():
    # Shown with -s or -rP: the figures of the run.
    print(run_quick("failover", TIMEOUT_S))
