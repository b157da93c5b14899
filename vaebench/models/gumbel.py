"""Joint continuous and categorical latent (JointVAE, Dupont 2018) with Gumbel-softmax.

c is a Gumbel-softmax draw at temperature tau (straight-through one-hot when ``hard``); the decoder
sees concat(z, c). The categorical KL is to the uniform prior: sum_k q_k log q_k + log K per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaebench.models.base import (
    Backbone,
    GaussianVAE,
    Posterior,
    VAEOutput,
    gaussian_kl,
    reparameterize,
)


def categorical_kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Summed over the batch, in nats (of a stack's logits, one per member)."""
    batch, categories = logits.shape[-2:]
    log_q = F.log_softmax(logits, dim=-1)
    return (log_q.exp() * log_q).sum((-2, -1)) + batch * math.log(categories)


def gumbel_noise(
    shape: tuple[int, ...] | torch.Size, like: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard Gumbel draws, as ``F.gumbel_softmax`` draws them, like ``like``."""
    empty = torch.empty(shape, dtype=like.dtype, device=like.device)
    return -empty.exponential_(generator=generator).log()


def relaxed_category(
    logits: torch.Tensor, gumbels: torch.Tensor, tau: float, hard: bool
) -> torch.Tensor:
    """As ``F.gumbel_softmax`` computes it (``hard``: one-hot forward, soft backward)."""
    soft = ((logits + gumbels) / tau).softmax(dim=-1)
    if not hard:
        return soft
    index = soft.max(dim=-1, keepdim=True)[1]
    return torch.zeros_like(soft).scatter_(-1, index, 1.0) - soft.detach() + soft


def joint_kl_terms(out: Posterior) -> dict[str, torch.Tensor]:
    assert out.category_logits is not None
    return {
        "kl_z": gaussian_kl(out.mu, out.logvar),
        "kl_c": categorical_kl_uniform(out.category_logits),
    }


class TemperatureSchedule:
    """A fixed temperature, or one annealed exponentially from start to end."""

    def __init__(self, tau: float | list[float]):
        values = tau if isinstance(tau, list) else [tau]
        self.start, self.end = float(values[0]), float(values[-1])

    def at(self, step: int, total_steps: int) -> float:
        if self.start == self.end or total_steps <= 1:
            return self.end if total_steps <= 1 else self.start
        fraction = min(step / (total_steps - 1), 1.0)
        return self.start * (self.end / self.start) ** fraction


class JointVAE(GaussianVAE):
    def __init__(self, backbone: Backbone, z_dim: int, categories: int, tau, hard: bool):
        super().__init__(backbone, z_dim)
        self.category_head = nn.Linear(backbone.feature_dim, categories)
        self.categories = categories
        self.schedule = TemperatureSchedule(tau)
        self.tau = self.schedule.start
        self.hard = hard

    def encode_all(self, x: torch.Tensor):
        features = self.encoder(x)
        mu, logvar = self.head(features).chunk(2, dim=-1)
        return mu, logvar, self.category_head(features)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        return self.encode_all(x)[:2]

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        return Posterior(*self.encode_all(x))

    def decode_sample(
        self, z: torch.Tensor, c: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if c is None:
            raise ValueError("a joint VAE decodes z together with a one-hot category c")
        return self.decoder(torch.cat([z, c], dim=1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> VAEOutput:
        mu, logvar, category_logits = self.encode_all(x)
        z = reparameterize(mu, logvar)
        gumbels = gumbel_noise(category_logits.shape, category_logits)
        c = relaxed_category(category_logits, gumbels, self.tau, self.hard)
        return VAEOutput(mu, logvar, category_logits, logits=self.decode_sample(z, c), z=z)

    kl_terms = staticmethod(joint_kl_terms)

    def anneal(self, step: int, total_steps: int) -> None:
        self.tau = self.schedule.at(step, total_steps)

    def annealed_values(self) -> dict[str, float]:
        return {"tau": self.tau}

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits at the posterior mean and the most likely category."""
        mu, _, category_logits = self.encode_all(x)
        c = F.one_hot(category_logits.argmax(dim=1), self.categories).to(mu.dtype)
        return self.decode_sample(mu, c)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.z_dim, generator=generator, device=self.device)
        index = torch.randint(self.categories, (n,), generator=generator, device=self.device)
        c = F.one_hot(index, self.categories).to(z.dtype)
        return self.decode_sample(z, c)
