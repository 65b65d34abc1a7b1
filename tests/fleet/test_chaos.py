"""The chaos benchmark's short schedule (scripts/chaos --quick): cloud kills, silent link stalls, a
policy change behind the stall and a black-hole cloud, under load from four edges. Passes when
every assertion the script prints passes."""
from quickrun import run_quick

# The quick schedule takes about a minute; the rest is room for a slow machine.
TIMEOUT_S = 240


def test_quick_chaos_run_passes():
    # Shown with -s or -rP: the figures of the run.
    print(run_quick("chaos", TIMEOUT_S))
