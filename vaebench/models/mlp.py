"""Fully connected backbone; defaults (784-400-20, ReLU) match pytorch/examples' VAE."""

from __future__ import annotations

import math

from torch import nn

from vaebench.models.base import Backbone, dense_stack
from vaebench.spec.config import ModelConfig


def mlp_backbone(
    config: ModelConfig, image_shape: tuple[int, int, int], latent_dim: int
) -> Backbone:
    pixels = math.prod(image_shape)
    encoder = nn.Sequential(nn.Flatten(), *dense_stack([pixels, *config.hidden]))
    decoder = nn.Sequential(
        *dense_stack([latent_dim, *reversed(config.hidden)]), nn.Linear(config.hidden[0], pixels),
        nn.Unflatten(1, image_shape),
    )
    return Backbone(encoder, config.hidden[-1], decoder)
