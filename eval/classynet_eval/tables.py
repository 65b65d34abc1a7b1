"""Markdown tables for the report, and the number formats every table shares."""
from __future__ import annotations

from typing import Sequence


class TableError(ValueError):
    pass


def _cell(v) -> str:
    if v is None:
        return "–"
    # A pipe inside a cell would split it into two columns.
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table. `align` has one letter per column: l, r or c (default:
    the first column left, the others right, as numbers read best)."""
    n = len(headers)
    if n == 0:
        raise TableError("a table needs at least one column")
    align = align or ("l" + "r" * (n - 1))
    if len(align) != n or set(align) - set("lrc"):
        raise TableError(f"align needs one of l/r/c per column ({n}), found {align!r}")
    for i, r in enumerate(rows):
        if len(r) != n:
            raise TableError(f"row {i + 1} has {len(r)} cells, the header has {n}: {list(r)}")
    rule = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join(rule[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pct(x: float | None, digits: int = 2) -> str | None:
    return None if x is None else f"{100 * x:.{digits}f} %"


def ms(seconds: float | None) -> str | None:
    return None if seconds is None else f"{1000 * seconds:,.0f}"


def times(x: float | None, digits: int = 2) -> str | None:
    return None if x is None else f"{x:.{digits}f}×"


def partition_of(budget: dict, model: str) -> str:
    """The partition `model` runs at one budget of results["partitions"] (BN + gating and CS-EE
    are BN's file; results from before `by_model` have one partition for all)."""
    k = "bn" if model in ("bn+gate", "cs-ee") else model
    return budget.get("by_model", {}).get(k, {}).get("partition", budget["partition"])
