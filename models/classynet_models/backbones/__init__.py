"""Backbones with early exits. Each entry builds an ``EarlyExitNet`` for an exit configuration;
the training and export code use nothing else, so AlexNet or InceptionV3 are added here alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .alexnet import ALEXNET_EXITS, alexnet
from .base import EarlyExitNet, ExitHead
from .inception import INCEPTION_EXITS, inception_v3
from .resnet import EXIT_LAYERS, resnet
from .tiny import TINY_EXITS, tiny


@dataclass(frozen=True)
class Backbone:
    exits: dict[str, list[int]]
    make: Callable[[str, int, list[int], int], EarlyExitNet]
    # How the network differs from its paper's (the model card repeats it).
    adaptation: str = ""

    def exit_layers(self, config: str) -> list[int]:
        if config not in self.exits:
            from ..classes import ConfigError

            raise ConfigError(f"unknown exit configuration {config!r} (known: {', '.join(self.exits)})")
        return self.exits[config]

    def build(self, config: str, in_channels: int, widths: list[int], head_convs: int = 1) -> EarlyExitNet:
        """`head_convs`: conv layers in every early exit's head (see ``ExitHead``)."""
        self.exit_layers(config)
        return self.make(config, in_channels, widths, head_convs)


BACKBONES: dict[str, Backbone] = {
    "resnet110": Backbone(EXIT_LAYERS, lambda c, i, w, h: resnet(110, c, i, w, h)),
    "resnet20": Backbone(EXIT_LAYERS, lambda c, i, w, h: resnet(20, c, i, w, h)),
    "tiny": Backbone(TINY_EXITS, tiny),
    "alexnet": Backbone(
        ALEXNET_EXITS, alexnet,
        "AlexNet adapted to 28x28 single-channel images: the first convolution is 5x5 with stride 1 "
        "(an 11x11 stride-4 filter would leave a 5x5 map after one layer); channel widths, overlapping 3/2 "
        "pools and the 4096-wide classifier are the original's (23.5 M parameters). Exits after layer 1 "
        "and layer 2 (each after its pool), as the paper places them."),
    # Half the original's channels: this project trains on CPUs (see backbones/inception.py).
    "inceptionv3": Backbone(
        INCEPTION_EXITS, lambda c, i, w, h: inception_v3(c, i, w, h, width=0.5),
        "InceptionV3 adapted to 28x28 single-channel images with a reduced stem, not an upsampled input "
        "(upsampling to 299x299 would spend over a hundred times the compute on interpolated pixels): stem "
        "convolutions keep the resolution, the first max pool halves it, the second is dropped, so the grid "
        "is 14x14, 6x6 and 2x2 where the original's is 35, 17 and 8. Every module's channels are halved "
        "(5.9 M parameters instead of 21.8 M) so that a run fits this project's CPU training budget. The "
        "paper's exits at layers 2, 5, 13, 17, 24, 36 and 48 (counted along the deepest path) sit after "
        "2a, 4a, 5d, 6a, 6c, 6e and the classifier: a module cannot be cut between its parallel branches."),
}


def build(name: str, config: str, in_channels: int, widths: list[int], head_convs: int = 1) -> EarlyExitNet:
    return BACKBONES[name].build(config, in_channels, widths, head_convs)


__all__ = ["BACKBONES", "Backbone", "EarlyExitNet", "ExitHead", "build"]
