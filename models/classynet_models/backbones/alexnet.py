"""AlexNet (Krizhevsky et al., 2012) with early exits, for small single-channel images.

Five convolutional layers and three fully connected ones, numbered 1..8 as in the paper:

    layer 1  conv 5x5, 64, ReLU, max pool 3/2      (the original: 11x11 stride 4 on 224x224)
    layer 2  conv 5x5, 192, ReLU, max pool 3/2
    layer 3  conv 3x3, 384, ReLU
    layer 4  conv 3x3, 256, ReLU
    layer 5  conv 3x3, 256, ReLU, max pool 3/2
    layer 6  dropout, linear 256*2*2 -> 4096, ReLU
    layer 7  dropout, linear 4096 -> 4096, ReLU
    layer 8  linear 4096 -> K

Adapted to 28x28: the first convolution is 5x5 with stride 1 (an 11x11 stride-4 filter would
leave a 5x5 map after one layer), every pool keeps AlexNet's overlapping 3/2 shape, so the maps
are 13x13 after layer 1, 6x6 after layer 2 and 2x2 after layer 5. The channel widths and the
4096-wide classifier are the original's: 23.5 M parameters, 94 MB in FP32, most of them in
layers 6 and 7.

The paper's 3-exit configuration adds a branch after layer 1 and one after layer 2; a branch
sits after a layer's pool. Each early branch is an ``ExitHead``; the last exit is layers 6-8.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import EarlyExitNet, ExitHead

ALEXNET_EXITS = {"3exit": [1, 2, 8], "base": [8]}


def _conv(cin: int, cout: int, k: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, 1, k // 2), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(3, 2))
    return layers


class Classifier(nn.Module):
    """Layers 6-8: the fully connected classifier over the flattened 2x2 map of layer 5."""

    def __init__(self, features: int, k: int, hidden: int = 4096, dropout: float = 0.5):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, k),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def alexnet(config: str, in_channels: int, widths: list[int], head_convs: int = 1) -> EarlyExitNet:
    layers = ALEXNET_EXITS.get(config)
    if layers is None:
        raise ValueError(f"unknown exit configuration {config!r} (known: {', '.join(ALEXNET_EXITS)})")
    if len(widths) != len(layers):
        raise ValueError(f"alexnet {config} has {len(layers)} exits, got {len(widths)} exit widths")
    convs = [
        _conv(in_channels, 64, 5, pool=True),
        _conv(64, 192, 5, pool=True),
        _conv(192, 384, 3, pool=False),
        _conv(384, 256, 3, pool=False),
        _conv(256, 256, 3, pool=True),
    ]
    channels = [64, 192, 384, 256, 256]
    segments: list[nn.Module] = []
    heads: list[nn.Module] = []
    start = 0
    for m, (layer, k) in enumerate(zip(layers, widths)):
        last = m == len(layers) - 1
        end = 5 if last else layer  # the classifier (layers 6-8) is the last exit's head
        segments.append(nn.Sequential(*[x for block in convs[start:end] for x in block]))
        heads.append(Classifier(256 * 2 * 2, k) if last else ExitHead(channels[end - 1], k, convs=head_convs))
        start = end
    return EarlyExitNet(segments, heads)
