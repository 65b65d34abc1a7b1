"""The early-exit network shape every backbone builds: segments and exit heads.

Segment m maps the previous cut (or the input) to cut m; head m maps cut m to exit m's logits.
The training code and the exporter only see this structure, so a new backbone (AlexNet,
InceptionV3, ...) is a function that returns an ``EarlyExitNet``.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class ExitHead(nn.Module):
    """Early exit branch: conv 3x3 stride 2 to 32 channels, BN, ReLU, global pool, linear.

    `convs` > 1 adds conv 3x3 stride 2 layers (doubling the width each, with BN and ReLU) before
    the pool: an exit early in the network sees small receptive fields, and global pooling of
    them keeps little of an object's shape, which separating, say, an ankle boot from a sneaker
    needs. Each extra layer costs about as many MACs as the first (a quarter of the positions).
    """

    def __init__(self, channels: int, k: int, width: int = 32, convs: int = 1):
        super().__init__()
        if convs < 1:
            raise ValueError(f"an exit head needs at least one conv layer, got {convs}")
        self.conv = nn.Conv2d(channels, width, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        # Kept apart from conv/bn so that one-conv heads keep their parameter names (and the
        # checkpoints written before the option load as they are).
        extra: list[nn.Module] = []
        for _ in range(convs - 1):
            extra += [nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()]
            width *= 2
        self.extra = nn.Sequential(*extra)
        self.fc = nn.Linear(width, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.extra(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class EarlyExitNet(nn.Module):
    def __init__(self, segments: list[nn.Module], heads: list[nn.Module]):
        super().__init__()
        if len(segments) != len(heads) or not segments:
            raise ValueError("an early-exit network needs one head per segment")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor, with_cuts: bool = False):
        """Logits of every exit, in order; with `with_cuts`, also the cut tensors (all but last)."""
        logits, cuts = [], []
        for m, (seg, head) in enumerate(zip(self.segments, self.heads)):
            x = seg(x)
            logits.append(head(x))
            if m + 1 < len(self.heads):
                cuts.append(x)
        return (logits, cuts) if with_cuts else logits
