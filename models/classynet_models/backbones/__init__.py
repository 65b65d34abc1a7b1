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
    "alexnet": Backbone(ALEXNET_EXITS, alexnet),
    # Half the original's channels: this project trains on CPUs (see backbones/inception.py).
    "inceptionv3": Backbone(INCEPTION_EXITS, lambda c, i, w, h: inception_v3(c, i, w, h, width=0.5)),
}


def build(name: str, config: str, in_channels: int, widths: list[int], head_convs: int = 1) -> EarlyExitNet:
    return BACKBONES[name].build(config, in_channels, widths, head_convs)


__all__ = ["BACKBONES", "Backbone", "EarlyExitNet", "ExitHead", "build"]
