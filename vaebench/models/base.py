"""The Gaussian-latent VAE that every family builds from an encoder and a decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VAEOutput:
    """What a forward pass returns: decoder logits and the posterior's parameters."""

    logits: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


class GaussianVAE(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))), p(z) = N(0, I), decoder gives Bernoulli logits.

    ``encoder`` maps images to features of size ``feature_dim``; one linear head
    gives mu and log-variance together. ``decoder`` maps z to logits shaped like
    the images.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, decoder: nn.Module, z_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, 2 * z_dim)
        self.decoder = decoder
        self.z_dim = z_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return VAEOutput(logits=self.decode(z), mu=mu, logvar=logvar, z=z)

    def kl(self, out: VAEOutput) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) summed over the batch, in nats."""
        return -0.5 * torch.sum(1 + out.logvar - out.mu.pow(2) - out.logvar.exp())

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoder logits for ``n`` draws from the prior."""
        device = self.head.weight.device
        z = torch.randn(n, self.z_dim, generator=generator, device=device)
        return self.decode(z)
