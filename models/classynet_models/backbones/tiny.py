"""A tiny 3-exit CNN (about 20k parameters) for fast tests and demos.

Segment 1: conv 3x3 (8) + BN + ReLU + max pool; segment 2: conv 3x3 (16) + BN + ReLU + max pool;
segment 3: conv 3x3 (32) + BN + ReLU. Exits use ``ExitHead`` with 16 channels; the last exit is
global pooling + linear.
"""
from __future__ import annotations

from torch import nn

from .base import EarlyExitNet, ExitHead
from .resnet import FinalHead

TINY_EXITS = {"3exit": [1, 2, 3], "7exit": [1, 2, 3, 4, 5, 6, 7], "base": [3]}


def _block(cin: int, cout: int, pool: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def tiny(config: str, in_channels: int, widths: list[int], head_convs: int = 1) -> EarlyExitNet:
    n = len(TINY_EXITS[config])
    if len(widths) != n:
        raise ValueError(f"tiny {config} has {n} exits, got {len(widths)} widths")
    chans = [8, 16, 32, 32, 32, 32, 32][:n] if n > 1 else [32]
    segments, heads, cin = [], [], in_channels
    for m, c in enumerate(chans):
        if n == 1:
            segments.append(nn.Sequential(_block(cin, 8, True), _block(8, 16, True), _block(16, 32, False)))
        else:
            segments.append(_block(cin, c, pool=m < 2))
        last = m == n - 1
        heads.append(FinalHead(c, widths[m]) if last else ExitHead(c, widths[m], width=16, convs=head_convs))
        cin = c
    return EarlyExitNet(segments, heads)
