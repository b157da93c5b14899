"""Reconstruction terms, the KL weight, and the ELBO.

Conventions: every term is summed over pixels and latent dimensions and over
the batch; callers divide by the number of images. Values are in nats (for
``mse`` the "reconstruction" is a sum of squared errors, as in the notebooks
this suite replaces, so its ELBO is not a log-likelihood bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaebench.config import LossConfig


def reconstruction(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Reconstruction cost summed over the batch: ``bce`` on logits or ``mse`` on sigmoid."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    if kind == "mse":
        return F.mse_loss(torch.sigmoid(logits), x, reduction="sum")
    raise ValueError(f"unknown reconstruction loss {kind!r}")


@dataclass
class LossTerms:
    """Batch sums of the parts of the objective."""

    recon: torch.Tensor
    kl: torch.Tensor

    def objective(self, beta: float) -> torch.Tensor:
        """The training loss: reconstruction + beta * KL (a negative beta-ELBO)."""
        return self.recon + beta * self.kl

    @property
    def negative_elbo(self) -> torch.Tensor:
        """The beta = 1 bound, reported whatever beta a run trains with."""
        return self.recon + self.kl


def loss_terms(model: torch.nn.Module, x: torch.Tensor, config: LossConfig) -> LossTerms:
    out = model(x)
    return LossTerms(recon=reconstruction(out.logits, x, config.recon), kl=model.kl(out))
