"""Convolutional VAE: 4x4 stride-2 convolutions halve the side, transposed ones double it,
``output_padding`` restoring odd sizes (28 -> 14 -> 7 -> 3 and back); batch norm after every
layer but the decoder's last; ``dense`` widths between the conv features and the latent."""

from __future__ import annotations

from torch import nn

from vaebench.models.base import Backbone, dense_stack
from vaebench.spec.config import ModelConfig


def _block(layer: nn.Module, channels: int, batch_norm: bool) -> list[nn.Module]:
    return [layer, *([nn.BatchNorm2d(channels)] if batch_norm else []), nn.ReLU()]


def conv_backbone(
    config: ModelConfig, image_shape: tuple[int, int, int], latent_dim: int
) -> Backbone:
    in_channels, height, width = image_shape
    if height != width:
        raise ValueError("the conv VAE expects square images")
    sizes = [height]
    for _ in config.channels:
        sizes.append((sizes[-1] - 2) // 2 + 1)  # conv k=4, s=2, p=1
    if sizes[-1] < 1:
        raise ValueError(
            f"{len(config.channels)} conv layers shrink {height}x{width} images to nothing"
        )

    encoder: list[nn.Module] = []
    for c_in, c_out in zip([in_channels, *config.channels], config.channels, strict=False):
        encoder += _block(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), c_out, config.batch_norm)
    last, side = config.channels[-1], sizes[-1]
    conv_features = last * side * side
    encoder += [nn.Flatten(), *dense_stack([conv_features, *config.dense])]
    feature_dim = config.dense[-1] if config.dense else conv_features

    decoder: list[nn.Module] = [
        *dense_stack([latent_dim, *reversed(config.dense), conv_features]),
        nn.Unflatten(1, (last, side, side)),
    ]
    ups = list(reversed(config.channels))
    layers = zip(ups, reversed(sizes[1:]), reversed(sizes[:-1]), strict=True)
    for i, (c_in, size_in, size_out) in enumerate(layers):
        final = i == len(ups) - 1
        c_out = in_channels if final else ups[i + 1]
        layer = nn.ConvTranspose2d(
            c_in, c_out, 4, stride=2, padding=1, output_padding=size_out - 2 * size_in
        )
        decoder += [layer] if final else _block(layer, c_out, config.batch_norm)
    return Backbone(nn.Sequential(*encoder), feature_dim, nn.Sequential(*decoder))
