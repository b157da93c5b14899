"""Fully connected backbone; defaults (784-400-20, ReLU) match pytorch/examples' VAE."""

from __future__ import annotations

import math

from torch import nn

from vaebench.config import ModelConfig
from vaebench.models.base import Backbone


def _stack(widths: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return layers


def mlp_backbone(
    config: ModelConfig, image_shape: tuple[int, int, int], latent_dim: int
) -> Backbone:
    """Encoder pixels -> hidden widths; decoder ``latent_dim`` -> reversed widths -> pixels."""
    pixels = math.prod(image_shape)
    encoder = nn.Sequential(nn.Flatten(), *_stack([pixels, *config.hidden]))
    decoder = nn.Sequential(
        *_stack([latent_dim, *reversed(config.hidden)]),
        nn.Linear(config.hidden[0], pixels),
        nn.Unflatten(1, image_shape),
    )
    return Backbone(encoder, config.hidden[-1], decoder)
