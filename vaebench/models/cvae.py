"""Conditional VAE: the decoder sees one-hot(label) beside z; optionally the encoder too."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vaebench.models.base import Backbone, GaussianVAE

NUM_CLASSES = 10  # every MNIST-family dataset has ten classes


def with_label(values: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """``values`` (features or z) with the one-hot label on the last axis (a stack's: y (K, B))."""
    if y is None:
        raise ValueError("a conditional VAE needs labels")
    return torch.cat([values, F.one_hot(y, NUM_CLASSES).to(values.dtype)], dim=-1)


class ConditionalVAE(GaussianVAE):
    uses_labels = True

    def __init__(self, backbone: Backbone, z_dim: int, condition_encoder: bool):
        super().__init__(backbone, z_dim)
        self.condition_encoder = condition_encoder
        if condition_encoder:  # the label joins the encoder's features before the head
            self.head = nn.Linear(backbone.feature_dim + NUM_CLASSES, 2 * z_dim)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        features = self.encoder(x)
        features = with_label(features, y) if self.condition_encoder else features
        return self.head(features).chunk(2, dim=-1)

    def decode_label(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.decoder(with_label(z, y))

    def decode_sample(
        self, z: torch.Tensor, c: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.decode_label(z, y)  # forward and reconstruct decode z with the label too

    def sample_prior(
        self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder logits for ``n`` prior draws of z, labelled 0..9 in turn unless given."""
        if labels is None:
            labels = torch.arange(n, device=self.device) % NUM_CLASSES
        z = torch.randn(n, self.z_dim, generator=generator, device=self.device)
        return self.decode_label(z, labels)

    def extra_scores(self, classifier: Callable[[], nn.Module]) -> dict[str, float]:
        return {"conditional_accuracy": conditional_accuracy(self, classifier())}

    def extra_pictures(self, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, int]]:
        """``digits.png``: one row per digit, the same ten draws of z in every row."""
        z = torch.randn(NUM_CLASSES, self.z_dim, generator=generator, device=self.device)
        rows = [
            self.decode_label(z, torch.full((NUM_CLASSES,), digit, device=self.device))
            for digit in range(NUM_CLASSES)
        ]
        return {"digits.png": (torch.cat(rows), NUM_CLASSES)}


@torch.no_grad()
def conditional_accuracy(vae: ConditionalVAE, classifier: nn.Module, per_class: int = 100) -> float:
    """Fraction of generated images (``per_class`` per digit) the classifier labels as asked."""
    generator = torch.Generator(device=vae.device).manual_seed(0)
    labels = torch.arange(NUM_CLASSES, device=vae.device).repeat_interleave(per_class)
    images = torch.sigmoid(vae.sample_prior(len(labels), generator=generator, labels=labels))
    predictions = classifier(images).argmax(dim=1)
    return (predictions == labels).float().mean().item()
