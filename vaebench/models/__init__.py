"""Model families by name. A new family is one module with a builder, registered here.

A builder takes the run's :class:`~vaebench.config.ModelConfig` and the image
shape ``(C, H, W)`` and returns a module with ``forward(x) -> VAEOutput``,
``kl(out)`` (summed over the batch) and ``sample_prior(n)``; the trainer needs
nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vaebench.config import ModelConfig
from vaebench.models.conv import build_conv
from vaebench.models.mlp import build_mlp

ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {"mlp": build_mlp, "conv": build_conv}


def build_model(config: ModelConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    return MODELS[config.arch](config, image_shape)
