"""ResNet for small images (He et al., CIFAR variant) with early exits.

ResNet-110 is a 3x3 stem convolution, three stages of 18 basic residual units (16, 32 and 64
channels; the first unit of stages 2 and 3 halves the resolution), global average pooling and a
linear classifier.

Layer numbering follows the paper: layer 1 is the stem convolution, residual unit u (1..54)
holds layers 2u and 2u+1, and layer 110 is the final classifier. An exit "after layer L" sits
after the residual unit that contains layer L, because a unit cannot be cut in the middle:

    7exit: layers 4, 18, 36, 54, 72, 90, 110 -> after units 2, 9, 18, 27, 36, 45, final
    3exit: layers 18, 72, 110                 -> after units 9, 36, final

Early exit heads (see ``ExitHead``) are: conv 3x3 stride 2 to 32 channels, batch norm, ReLU,
global average pooling, linear. For a stage with C channels and an exit with k logits that is
9*C*32 + 2*32 (BN) + 32*k + k parameters: 4,800 + 33k for a 16-channel stage, 18,624 + 33k for a
64-channel stage. The last exit is the network's own pooling + linear classifier (64k + k).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .base import EarlyExitNet, ExitHead

EXIT_LAYERS = {
    "3exit": [18, 72, 110],
    "7exit": [4, 18, 36, 54, 72, 90, 110],
    "base": [110],
}


def layer_to_unit(layer: int, units: int) -> int:
    """Residual unit (1-based) that ends the block containing paper layer `layer`.

    The last layer (2 * units + 2, the classifier) maps to the last unit.
    """
    last = 2 * units + 2
    if layer == last:
        return units
    if not 2 <= layer <= 2 * units + 1:
        raise ValueError(f"layer {layer} is not inside a residual unit (layers 2..{2 * units + 1}, or {last})")
    return layer // 2


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class FinalHead(nn.Module):
    """The network's own classifier: global average pooling and a linear layer."""

    def __init__(self, channels: int, k: int):
        super().__init__()
        self.fc = nn.Linear(channels, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet(depth: int, exits: str, in_channels: int, widths: list[int], head_convs: int = 1) -> EarlyExitNet:
    """A CIFAR-style ResNet of `depth` = 6n + 2 layers with the named exit configuration.

    `widths` gives the number of logits of each exit (|S_m| + 1 for a bag exit, K for a plain
    one), one per exit of the configuration.
    """
    if (depth - 2) % 6:
        raise ValueError(f"depth {depth} is not 6n + 2")
    n = (depth - 2) // 6
    units = 3 * n
    layers = EXIT_LAYERS.get(exits)
    if layers is None:
        raise ValueError(f"unknown exit configuration {exits!r} (known: {', '.join(EXIT_LAYERS)})")
    if depth != 110:
        # Other depths keep the exits at the same relative depth.
        layers = [max(2, round(layer * (2 * units + 2) / 110)) for layer in layers]
    if len(widths) != len(layers):
        raise ValueError(f"exit configuration {exits} has {len(layers)} exits, got {len(widths)} exit widths")
    exit_units = [layer_to_unit(layer, units) for layer in layers]
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    blocks: list[nn.Module] = []
    channels: list[int] = []
    cin = 16
    for stage, cout in enumerate([16, 32, 64]):
        for i in range(n):
            blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
            channels.append(cout)
            cin = cout
    # Segment m runs units exit_units[m-1]+1 .. exit_units[m].
    segments: list[nn.Module] = []
    heads: list[nn.Module] = []
    start = 0
    for m, (u, k) in enumerate(zip(exit_units, widths)):
        seq = blocks[start:u]
        if m == 0:
            seq = [stem, *seq]
        segments.append(nn.Sequential(*seq))
        last = m == len(exit_units) - 1
        heads.append(FinalHead(channels[u - 1], k) if last else ExitHead(channels[u - 1], k, convs=head_convs))
        start = u
    return EarlyExitNet(segments, heads)
