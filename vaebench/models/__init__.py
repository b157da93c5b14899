"""Model families by name: a new family is one module with a builder, registered in
:data:`MODELS`; what the trainer needs of a model is in docs/architecture.md."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vaebench.models.base import Backbone, GaussianVAE
from vaebench.models.conv import conv_backbone
from vaebench.models.cvae import NUM_CLASSES, ConditionalVAE
from vaebench.models.gmvae import GaussianMixtureVAE
from vaebench.models.gumbel import JointVAE
from vaebench.models.mlp import mlp_backbone
from vaebench.spec.config import ModelConfig

Shape = tuple[int, int, int]
ModelBuilder = Callable[[ModelConfig, Shape], nn.Module]

BACKBONES: dict[str, Callable[[ModelConfig, Shape, int], Backbone]] = {
    "mlp": mlp_backbone, "conv": conv_backbone,
}


def build_gaussian(config: ModelConfig, image_shape: Shape) -> GaussianVAE:
    return GaussianVAE(BACKBONES[config.arch](config, image_shape, config.z_dim), config.z_dim)


def build_gumbel(config: ModelConfig, image_shape: Shape) -> JointVAE:
    backbone = BACKBONES[config.backbone](config, image_shape, config.z_dim + config.categories)
    return JointVAE(backbone, config.z_dim, config.categories, config.tau, config.hard)


def build_gmvae(config: ModelConfig, image_shape: Shape) -> GaussianMixtureVAE:
    backbone = BACKBONES[config.backbone](config, image_shape, config.z_dim)
    return GaussianMixtureVAE(backbone, config.z_dim, config.categories)


def build_cvae(config: ModelConfig, image_shape: Shape) -> ConditionalVAE:
    backbone = BACKBONES[config.backbone](config, image_shape, config.z_dim + NUM_CLASSES)
    return ConditionalVAE(backbone, config.z_dim, config.condition_encoder)


MODELS: dict[str, ModelBuilder] = {
    "mlp": build_gaussian, "conv": build_gaussian, "gumbel": build_gumbel, "cvae": build_cvae,
    "gmvae": build_gmvae,
}


def build_model(config: ModelConfig, image_shape: Shape) -> nn.Module:
    return MODELS[config.arch](config, image_shape)


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """On the CPU a model with convolutions keeps its weights channels-last, oneDNN's fastest:
    ``python -m vaebench bench --layout`` measured the ``conv`` VAE's validation pass at 0.63
    of its time with contiguous weights and a training epoch at 0.99 (2-core CPU). The
    arithmetic is the same up to float rounding (the sums inside run in another order)."""
    if device.type == "cpu" and convolutional(model):
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def convolutional(model: nn.Module) -> bool:
    """Whether ``model`` has convolutions of its own (a stack's are grouped, not these)."""
    return any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in model.modules())
