"""Fully connected VAE; defaults (784-400-20, ReLU) match pytorch/examples' VAE."""

from __future__ import annotations

import math

from torch import nn

from vaebench.config import ModelConfig
from vaebench.models.base import GaussianVAE


def _stack(widths: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return layers


def build_mlp(config: ModelConfig, image_shape: tuple[int, int, int]) -> GaussianVAE:
    pixels = math.prod(image_shape)
    encoder = nn.Sequential(nn.Flatten(), *_stack([pixels, *config.hidden]))
    decoder = nn.Sequential(
        *_stack([config.z_dim, *reversed(config.hidden)]),
        nn.Linear(config.hidden[0], pixels),
        nn.Unflatten(1, image_shape),
    )
    return GaussianVAE(encoder, config.hidden[-1], decoder, config.z_dim)
