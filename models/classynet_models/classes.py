"""Class sets per exit (IC and MC schemes) and the bag-of-classes relabelling (eqs. 1 and 4).

The assignment is one list of class ids per early exit: ``[[9], [8], [6], [1], [7], [0]]`` is
the paper's 7-exit assignment. Under the incremental scheme (``ic``) exit m's set S_m is the
union of the assignments of exits 1..m; under the mutually exclusive scheme (``mc``) it is
exit m's own list. The last exit always has every class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("ic", "mc")


class ConfigError(ValueError):
    """A training configuration that cannot work; the message names the problem."""


@dataclass(frozen=True)
class ExitClasses:
    """S_1..S_M for a model with K classes."""

    num_classes: int
    sets: tuple[tuple[int, ...], ...]

    @property
    def num_exits(self) -> int:
        return len(self.sets)


def class_sets(assignment: list[list[int]], num_exits: int, num_classes: int, scheme: str) -> ExitClasses:
    """Builds S_1..S_M from one class list per early exit (num_exits - 1 lists)."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown class-set scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    if len(assignment) != num_exits - 1:
        raise ConfigError(
            f"the class assignment has {len(assignment)} lists, but a {num_exits}-exit model needs "
            f"{num_exits - 1} (one per early exit; the last exit takes every class)"
        )
    seen: dict[int, int] = {}
    for m, classes in enumerate(assignment, start=1):
        if not classes:
            raise ConfigError(f"exit E{m} is assigned no class")
        for c in classes:
            if not 0 <= c < num_classes:
                raise ConfigError(f"exit E{m} is assigned class {c}, but class ids run 0..{num_classes - 1}")
            if c in seen:
                if scheme == "mc" or seen[c] == m:
                    raise ConfigError(
                        f"class {c} is assigned to both E{seen[c]} and E{m}; "
                        + ("the mc scheme needs disjoint sets" if scheme == "mc" else "assign it once")
                    )
            seen.setdefault(c, m)
    sets: list[tuple[int, ...]] = []
    acc: list[int] = []
    for classes in assignment:
        if scheme == "ic":
            acc.extend(c for c in classes if c not in acc)
            sets.append(tuple(acc))
        else:
            sets.append(tuple(classes))
    sets.append(tuple(range(num_classes)))
    return ExitClasses(num_classes, tuple(sets))


def parse_assignment(text: str) -> list[list[int]]:
    """``"9;8;6;1;7;0"`` or ``"0,1;2,3"``: exits separated by ';', classes by ','."""
    try:
        return [[int(c) for c in part.split(",") if c.strip()] for part in text.split(";")]
    except ValueError as e:
        raise ConfigError(f"class assignment {text!r}: expected integers like '9;8;6' or '0,1;2,3' ({e})") from None


def relabel_table(classes: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """Lookup table original class -> exit label: index in S_m, or |S_m| (the bag) otherwise."""
    table = torch.full((num_classes,), len(classes), dtype=torch.long)
    for i, c in enumerate(classes):
        table[c] = i
    return table
