"""InceptionV3 (Szegedy et al., 2015) with early exits, for small single-channel images.

The network is the original's sequence of modules; each convolution is conv + batch norm + ReLU:

    stem      1a 3x3 (32) · 2a 3x3 (32) · 2b 3x3 (64) · max pool · 3b 1x1 (80) · 4a 3x3 (192)
    5b-5d     InceptionA x3 (35x35 in the original)
    6a        InceptionB, grid reduction
    6b-6e     InceptionC x4 (factorised 7x7)
    7a        InceptionD, grid reduction
    7b-7c     InceptionE x2 (expanded 3x3)
    final     global average pool, dropout, linear

Layers are numbered along the deepest path, as the paper's "48 layers deep" counts them: the
five stem convolutions are layers 1-5, and each module adds its longest branch (A: 3, B: 3,
C: 5, D: 4, E: 3), so 5b-5d end at 8, 11, 14; 6a at 17; 6b-6e at 22, 27, 32, 37; 7a at 41;
7b-7c at 44, 47; the classifier is 48. An exit "after layer L" sits after the stem layer or
the module that contains L (a module cannot be cut inside: its branches run in parallel), so
the paper's 7-exit configuration at layers 2, 5, 13, 17, 24, 36 and 48 exits after 2a, 4a,
5d, 6a, 6c, 6e and the classifier.

Adapted to 28x28 with a reduced stem rather than an upsampled input: upsampling to 299x299
would spend over a hundred times the compute on interpolated pixels. Stem convolutions keep
the resolution (stride 1, padding 1), the first max pool halves it to 14x14, the second is
dropped; the grid reductions then give 6x6 (6a) and 2x2 (7a), the original's proportions
(35 -> 17 -> 8) at a smaller scale. `width` scales every module's channels (rounded to
multiples of 8, at least 8): 1.0 is the original (21.8 M parameters), the zoo trains 0.5 to fit
this project's CPU training budget (see the model card).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .base import EarlyExitNet, ExitHead
from .resnet import FinalHead

INCEPTION_EXITS = {"7exit": [2, 5, 13, 17, 24, 36, 48], "base": [48]}
# Deepest layer of each unit, in order: the five stem convolutions, then the 11 modules.
UNIT_END_LAYERS = [1, 2, 3, 4, 5, 8, 11, 14, 17, 22, 27, 32, 37, 41, 44, 47]
LAST_LAYER = 48


def unit_of_layer(layer: int) -> int:
    """Index (0-based) of the unit whose output an exit after `layer` reads."""
    if layer == LAST_LAYER:
        return len(UNIT_END_LAYERS) - 1
    for i, end in enumerate(UNIT_END_LAYERS):
        if layer <= end:
            return i
    raise ValueError(f"layer {layer} is not in InceptionV3 (layers 1..{LAST_LAYER})")


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int, c):
        super().__init__()
        self.b1 = Conv(cin, c(64), 1)
        self.b5 = nn.Sequential(Conv(cin, c(48), 1), Conv(c(48), c(64), 5, padding=2))
        self.b3 = nn.Sequential(Conv(cin, c(64), 1), Conv(c(64), c(96), 3, padding=1), Conv(c(96), c(96), 3, padding=1))
        self.bp = Conv(cin, pool, 1)
        self.out = c(64) + c(64) + c(96) + pool

    def forward(self, x):
        p = self.bp(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([self.b1(x), self.b5(x), self.b3(x), p], 1)


class InceptionB(nn.Module):
    """Grid reduction 6a."""

    def __init__(self, cin: int, c):
        super().__init__()
        self.b3 = Conv(cin, c(384), 3, stride=2)
        self.b3d = nn.Sequential(Conv(cin, c(64), 1), Conv(c(64), c(96), 3, padding=1), Conv(c(96), c(96), 3, stride=2))
        self.out = c(384) + c(96) + cin

    def forward(self, x):
        return torch.cat([self.b3(x), self.b3d(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, c):
        super().__init__()
        self.b1 = Conv(cin, c(192), 1)
        self.b7 = nn.Sequential(Conv(cin, c7, 1), Conv(c7, c7, (1, 7), padding=(0, 3)),
                                Conv(c7, c(192), (7, 1), padding=(3, 0)))
        self.b7d = nn.Sequential(Conv(cin, c7, 1), Conv(c7, c7, (7, 1), padding=(3, 0)),
                                 Conv(c7, c7, (1, 7), padding=(0, 3)), Conv(c7, c7, (7, 1), padding=(3, 0)),
                                 Conv(c7, c(192), (1, 7), padding=(0, 3)))
        self.bp = Conv(cin, c(192), 1)
        self.out = 4 * c(192)

    def forward(self, x):
        p = self.bp(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([self.b1(x), self.b7(x), self.b7d(x), p], 1)


class InceptionD(nn.Module):
    """Grid reduction 7a."""

    def __init__(self, cin: int, c):
        super().__init__()
        self.b3 = nn.Sequential(Conv(cin, c(192), 1), Conv(c(192), c(320), 3, stride=2))
        self.b7 = nn.Sequential(Conv(cin, c(192), 1), Conv(c(192), c(192), (1, 7), padding=(0, 3)),
                                Conv(c(192), c(192), (7, 1), padding=(3, 0)), Conv(c(192), c(192), 3, stride=2))
        self.out = c(320) + c(192) + cin

    def forward(self, x):
        return torch.cat([self.b3(x), self.b7(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, c):
        super().__init__()
        self.b1 = Conv(cin, c(320), 1)
        self.b3 = Conv(cin, c(384), 1)
        self.b3a = Conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.b3b = Conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.bd = nn.Sequential(Conv(cin, c(448), 1), Conv(c(448), c(384), 3, padding=1))
        self.bda = Conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.bdb = Conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.bp = Conv(cin, c(192), 1)
        self.out = c(320) + 4 * c(384) + c(192)

    def forward(self, x):
        y3 = self.b3(x)
        yd = self.bd(x)
        p = self.bp(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([self.b1(x), self.b3a(y3), self.b3b(y3), self.bda(yd), self.bdb(yd), p], 1)


def inception_v3(config: str, in_channels: int, widths: list[int], head_convs: int = 1,
                 width: float = 0.5) -> EarlyExitNet:
    layers = INCEPTION_EXITS.get(config)
    if layers is None:
        raise ValueError(f"unknown exit configuration {config!r} (known: {', '.join(INCEPTION_EXITS)})")
    if len(widths) != len(layers):
        raise ValueError(f"inceptionv3 {config} has {len(layers)} exits, got {len(widths)} exit widths")
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")

    def c(n: int) -> int:
        return max(8, int(round(n * width / 8)) * 8)

    units: list[nn.Module] = [
        Conv(in_channels, c(32), 3, padding=1),  # 1a (stride 1 at 28x28)
        Conv(c(32), c(32), 3, padding=1),  # 2a
        Conv(c(32), c(64), 3, padding=1),  # 2b
        nn.Sequential(nn.MaxPool2d(3, 2, 1), Conv(c(64), c(80), 1)),  # pool to 14x14, 3b
        Conv(c(80), c(192), 3, padding=1),  # 4a (the second stem pool is dropped)
    ]
    channels = [c(32), c(32), c(64), c(80), c(192)]
    for make in (lambda i: InceptionA(i, c(32), c), lambda i: InceptionA(i, c(64), c),
                 lambda i: InceptionA(i, c(64), c), lambda i: InceptionB(i, c),
                 lambda i: InceptionC(i, c(128), c), lambda i: InceptionC(i, c(160), c),
                 lambda i: InceptionC(i, c(160), c), lambda i: InceptionC(i, c(192), c),
                 lambda i: InceptionD(i, c), lambda i: InceptionE(i, c), lambda i: InceptionE(i, c)):
        m = make(channels[-1])
        units.append(m)
        channels.append(m.out)
    exit_units = [unit_of_layer(layer) for layer in layers]
    segments: list[nn.Module] = []
    heads: list[nn.Module] = []
    start = 0
    for m, (u, k) in enumerate(zip(exit_units, widths)):
        segments.append(nn.Sequential(*units[start:u + 1]))
        last = m == len(exit_units) - 1
        heads.append(nn.Sequential(nn.Dropout(0.2), FinalHead(channels[u], k)) if last
                     else ExitHead(channels[u], k, convs=head_convs))
        start = u + 1
    return EarlyExitNet(segments, heads)
