"""What every model family shares: the forward output, the backbone nets, the Gaussian latent.
Families differ through :class:`GaussianVAE`'s hooks, never by tests of a model's class."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


@dataclass
class Mixture:
    """q(z|x, c) for each image and c, (B, K, D), and the prior p(z|c), (K, D)."""

    mu: torch.Tensor
    logvar: torch.Tensor
    prior_mu: torch.Tensor
    prior_logvar: torch.Tensor


@dataclass
class Posterior:
    """q(z|x) = N(mu, exp(logvar)), and q(c|x) = softmax(category_logits) where there is a c.

    With a ``mixture``, q(z|x) is the mixture of its components under q(c|x), and ``mu`` and
    ``logvar`` are that mixture's mean and (log) variance per dimension."""

    mu: torch.Tensor
    logvar: torch.Tensor
    category_logits: torch.Tensor | None = None
    mixture: Mixture | None = None


@dataclass(kw_only=True)
class VAEOutput(Posterior):
    """A forward pass: the posterior, decoder ``logits`` of its draw ``z``.

    With a ``mixture`` the logits are one decoding per category, category-major (row
    ``k * B + i`` decodes image i's z drawn from q(z|x, c=k)), to be weighted by q(c|x): the
    expectation over c is summed exactly, not sampled.
    """

    logits: torch.Tensor
    z: torch.Tensor


@dataclass
class Backbone:
    encoder: nn.Module
    feature_dim: int
    decoder: nn.Module


def dense_stack(widths: list[int]) -> list[nn.Module]:
    pairs = zip(widths, widths[1:], strict=False)
    return [layer for a, b in pairs for layer in (nn.Linear(a, b), nn.ReLU())]


def gaussian_kl_parts(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of each image and latent dimension, in nats."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the batch and dimensions, in nats: of
    (B, D) a number, of a stack's (K, B, D) one per member."""
    return gaussian_kl_parts(mu, logvar).sum((-2, -1))


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last (latent) axis."""
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + LOG_2PI).sum(dim=-1)


def per_draw(t: torch.Tensor, samples: int) -> torch.Tensor:
    """(..., B, D) repeated for ``samples`` draws per image, sample-major: row s * B + i."""
    return t.repeat(*([1] * (t.dim() - 2)), samples, 1)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """``noise``: a stack's members draw theirs from their own generators; with S times the
    images' rows, S draws per image (sample-major)."""
    noise = torch.randn_like(mu) if noise is None else noise
    samples = noise.shape[-2] // mu.shape[-2]
    if samples > 1:
        mu, logvar = per_draw(mu, samples), per_draw(logvar, samples)
    return mu + noise * torch.exp(0.5 * logvar)


class GaussianVAE(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))) (one linear head gives both), p(z) = N(0, I), the
    decoder gives Bernoulli logits."""

    uses_labels = False  # whether the model sees the label (then its clusters are not scored)
    categories: int | None = None  # size of a discrete latent, if the family has one

    def __init__(self, backbone: Backbone, z_dim: int):
        super().__init__()
        self.encoder = backbone.encoder
        self.head = nn.Linear(backbone.feature_dim, 2 * z_dim)
        self.decoder = backbone.decoder
        self.z_dim = z_dim

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        return self.head(self.encoder(x)).chunk(2, dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        return Posterior(*self.encode(x, y))

    def decode_sample(
        self, z: torch.Tensor, c: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.decode(z)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, samples: int = 1
    ) -> VAEOutput:
        """``samples`` draws of z per image (the iwae objective), decoded sample-major."""
        mu, logvar = self.encode(x, y)
        rows = (samples * mu.shape[0], mu.shape[1])
        noise = mu.new_empty(rows).normal_() if samples > 1 else None
        z = reparameterize(mu, logvar, noise)
        return VAEOutput(logits=self.decode_sample(z, None, y), mu=mu, logvar=logvar, z=z)

    @staticmethod
    def kl_terms(out: Posterior) -> dict[str, torch.Tensor]:
        """Summed over the batch, in nats (of a stack's output, per member)."""
        return {"kl_z": gaussian_kl(out.mu, out.logvar)}

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits at the posterior mean."""
        mu, _ = self.encode(x, y)
        return self.decode_sample(mu, None, y)

    def anneal(self, step: int, total_steps: int) -> None:
        """Called before every training step; families with schedules override it."""

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.z_dim, generator=generator, device=self.device)
        return self.decode(z)

    def annealed_values(self) -> dict[str, float]:
        """Hook: scheduled values to log with each epoch's metrics (e.g. a temperature)."""
        return {}

    def extra_scores(self, classifier: Callable[[], nn.Module]) -> dict[str, float]:
        """Hook: scores beyond the common ones; ``classifier()`` loads the digit classifier."""
        return {}

    def extra_pictures(self, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, int]]:
        """Hook: more pictures, file name -> (decoder logits of the images, images per row)."""
        return {}
