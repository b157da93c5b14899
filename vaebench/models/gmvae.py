"""Gaussian-mixture VAE (docs/clustering.md#gmvae): p(c) = Uniform(K), p(z|c) = N(m_c,
diag(exp(s_c))) learned; q(z|x, c) is one linear head on [features, one-hot(c)], for every c at
once head(features) + offset_c (Shu's GMVAE conditions through an MLP). Training sums c exactly:

    ELBO = sum_c q(c|x) (E_q(z|x,c)[log p(x|z)] - KL(q(z|x,c) || p(z|c)))
           - KL(q(c|x) || Uniform(K))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaebench.models.base import (
    Backbone,
    GaussianVAE,
    Mixture,
    Posterior,
    VAEOutput,
    reparameterize,
)
from vaebench.models.gumbel import categorical_kl_uniform

PRIOR_SPREAD = 1.0  # sd of the random initial component means: apart from the start


def gaussian_kl_between_parts(
    mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor, prior_logvar: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) of each latent dimension."""
    ratio = (logvar - prior_logvar).exp()
    return 0.5 * (ratio + (mu - prior_mu).pow(2) / prior_logvar.exp() - 1 - logvar + prior_logvar)


def component_kl_parts(out: Posterior) -> torch.Tensor:
    """KL(q(z|x, c) || p(z|c)) of each image, component c and latent dimension (B, K, D); the
    halving inside the sum over dimensions is exact (a power of 2)."""
    mixture = out.mixture
    prior_mu, prior_logvar = mixture.prior_mu.unsqueeze(-3), mixture.prior_logvar.unsqueeze(-3)
    return gaussian_kl_between_parts(mixture.mu, mixture.logvar, prior_mu, prior_logvar)


def mixture_components(head: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """q(z|x, c)'s mean and log-variance for every c: head (B, 2D) + offset (K, 2D)."""
    return head.unsqueeze(-2) + offset.unsqueeze(-3)


def decode_components(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Every component's draw (B, K, D) decoded, component-major (K * B rows)."""
    return decoder(z.transpose(-3, -2).flatten(-3, -2))


def mixture_kl_terms(out: Posterior) -> dict[str, torch.Tensor]:
    per_component = component_kl_parts(out).sum(dim=-1)
    weights = F.softmax(out.category_logits, dim=-1)
    return {
        "kl_z": (weights * per_component).sum((-2, -1)),
        "kl_c": categorical_kl_uniform(out.category_logits),
    }


class GaussianMixtureVAE(GaussianVAE):
    def __init__(self, backbone: Backbone, z_dim: int, categories: int):
        super().__init__(backbone, z_dim)
        self.categories = categories
        self.category_head = nn.Linear(backbone.feature_dim, categories)
        self.component_offset = nn.Parameter(torch.zeros(categories, 2 * z_dim))
        self.prior_mu = nn.Parameter(PRIOR_SPREAD * torch.randn(categories, z_dim))
        self.prior_logvar = nn.Parameter(torch.zeros(categories, z_dim))

    def encode_mixture(self, x: torch.Tensor) -> tuple[torch.Tensor, Mixture]:
        features = self.encoder(x)
        both = mixture_components(self.head(features), self.component_offset)
        mu, logvar = both.chunk(2, dim=-1)
        return self.category_head(features), Mixture(mu, logvar, self.prior_mu, self.prior_logvar)

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        logits, mixture = self.encode_mixture(x)
        weights = F.softmax(logits, dim=1)[:, :, None]
        mean = (weights * mixture.mu).sum(dim=1)
        second = (weights * (mixture.logvar.exp() + mixture.mu.pow(2))).sum(dim=1)
        variance = (second - mean.pow(2)).clamp_min(1e-12)  # the law of total variance
        return Posterior(mean, variance.log(), logits, mixture)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        posterior = self.posterior(x)
        return posterior.mu, posterior.logvar

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> VAEOutput:
        logits, mixture = self.encode_mixture(x)
        z = reparameterize(mixture.mu, mixture.logvar)
        decoded = decode_components(self.decoder, z)
        mu = (F.softmax(logits, dim=1)[:, :, None] * mixture.mu).sum(dim=1)
        logvar = mixture.logvar.mean(dim=1)
        return VAEOutput(mu, logvar, logits, mixture, logits=decoded, z=z)

    kl_terms = staticmethod(mixture_kl_terms)

    def decode_sample(
        self, z: torch.Tensor, c: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The decoder sees z alone: c acts through the prior p(z|c)."""
        return self.decode(z)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits at the mean of the most likely component."""
        logits, mixture = self.encode_mixture(x)
        best = logits.argmax(dim=1)
        return self.decode(mixture.mu[torch.arange(x.shape[0], device=x.device), best])

    def _prior_draws(self, index: torch.Tensor, generator: torch.Generator | None):
        noise = torch.randn(index.shape[0], self.z_dim, generator=generator, device=self.device)
        return self.prior_mu[index] + noise * torch.exp(0.5 * self.prior_logvar[index])

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        index = torch.randint(self.categories, (n,), generator=generator, device=self.device)
        return self.decode(self._prior_draws(index, generator))

    def extra_pictures(self, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, int]]:
        """``components.png``: one row per component c, ten draws of z ~ p(z|c)."""
        index = torch.arange(self.categories, device=self.device).repeat_interleave(10)
        return {"components.png": (self.decode(self._prior_draws(index, generator)), 10)}
