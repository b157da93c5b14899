"""Importance-weighted log-likelihood estimates (IWAE, Burda et al. 2015; docs/metrics.md).

For an image x and K draws z_k ~ q(z|x), L_K(x) = log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)
bounds log p(x) from below, rising with K towards it. A categorical latent is sampled, an exact
one-hot c_k ~ q(c|x) weighted by p(c_k) / q(c_k|x), not summed over; a gmvae draws c_k, then
z_k ~ q(z|x, c_k). log p(x|z) is Bernoulli: a likelihood for binary pixels only. The log-weights
are summed in float32 per image and combined in float64, where K = 5000 terms would lose digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaebench.models.base import LOG_2PI, Posterior, gaussian_log_density


@dataclass
class LatentDraws:
    """``samples`` draws of the latents for each image of a batch, sample-major: row
    ``s * B + i`` is draw ``s`` for image ``i``."""

    z: torch.Tensor
    c: torch.Tensor | None  # one-hot categories, for models with a categorical latent
    log_q: torch.Tensor  # log q(z, c | x) per row
    log_prior: torch.Tensor  # log p(z, c) per row


def draw_latents(posterior: Posterior, samples: int, generator: torch.Generator) -> LatentDraws:
    if posterior.mixture is not None:
        return _draw_from_mixture(posterior, samples, generator)
    lead = [1] * (posterior.mu.dim() - 2)  # a stack's member axis: one member's draws serve all
    mu = posterior.mu.repeat(*lead, samples, 1)
    logvar = posterior.logvar.repeat(*lead, samples, 1)
    noise = torch.randn(mu.shape[-2:], generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + noise * torch.exp(0.5 * logvar)
    log_q = -0.5 * (noise.pow(2) + logvar + LOG_2PI).sum(dim=-1)
    log_prior = -0.5 * (z.pow(2) + LOG_2PI).sum(dim=-1)
    c = None
    if posterior.category_logits is not None:
        _, c, log_q_c, log_p_c = _draw_category(posterior.category_logits, samples, generator)
        log_q, log_prior = log_q + log_q_c, log_prior + log_p_c
    return LatentDraws(z=z, c=c, log_q=log_q, log_prior=log_prior)


def _draw_category(logits: torch.Tensor, samples: int, generator: torch.Generator):
    """An exact draw c ~ q(c|x) per row: its index, one-hot, log q(c|x) and log p(c), uniform."""
    log_probs = F.log_softmax(logits.repeat(samples, 1), dim=1)
    index = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
    c = F.one_hot(index, log_probs.shape[1]).to(logits.dtype)
    return index, c, log_probs.gather(1, index[:, None]).squeeze(1), -math.log(log_probs.shape[1])


def _draw_from_mixture(
    posterior: Posterior, samples: int, generator: torch.Generator
) -> LatentDraws:
    """c ~ q(c|x), then z ~ q(z|x, c); the prior is p(c) p(z|c), p(c) uniform."""
    mixture = posterior.mixture
    index, c, log_q_c, log_p_c = _draw_category(posterior.category_logits, samples, generator)
    rows = torch.arange(index.shape[0], device=index.device)
    mu = mixture.mu.repeat(samples, 1, 1)[rows, index]
    logvar = mixture.logvar.repeat(samples, 1, 1)[rows, index]
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + noise * torch.exp(0.5 * logvar)
    log_q = log_q_c + gaussian_log_density(z, mu, logvar)
    log_prior = gaussian_log_density(z, mixture.prior_mu[index], mixture.prior_logvar[index])
    log_prior = log_prior + log_p_c
    return LatentDraws(z=z, c=c, log_q=log_q, log_prior=log_prior)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    terms = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return -terms.flatten(1).sum(dim=1)


ObservationModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (decoded, x) -> log p


def log_weights(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, samples: int,
    generator: torch.Generator, log_likelihood: ObservationModel = bernoulli_log_likelihood,
) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) for ``samples`` draws per image: (samples, batch)."""
    posterior = model.posterior(x, y)
    draws = draw_latents(posterior, samples, generator)
    labels = y.repeat(samples) if y is not None else None
    logits = model.decode_sample(draws.z, draws.c, labels)
    repeated = x.repeat(samples, *([1] * (x.dim() - 1)))
    weights = log_likelihood(logits, repeated) + draws.log_prior - draws.log_q
    return weights.view(samples, x.shape[0])


@dataclass
class LikelihoodEstimate:
    nll: float  # nats per image: -mean L_K(x)
    standard_error: float  # of that mean over the images
    samples: int  # K
    images: int


@torch.no_grad()
def iwae_log_likelihood(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, samples: int,
    generator: torch.Generator, rows_per_pass: int = 10000,
    log_likelihood: ObservationModel = bernoulli_log_likelihood,
) -> torch.Tensor:
    """L_K(x) per image, float64. At most ``rows_per_pass`` decoder rows (images times draws)
    at once, so K = 5000 fits in memory: one image's draws are taken in chunks."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    model.eval()
    per_pass = max(1, rows_per_pass // samples)
    chunk = max(1, min(samples, rows_per_pass // per_pass))
    estimates = []
    for start in range(0, images.shape[0], per_pass):
        x = images[start : start + per_pass]
        y = labels[start : start + per_pass] if labels is not None else None
        weights = torch.cat([
            log_weights(model, x, y, min(chunk, samples - done), generator, log_likelihood).double()
            for done in range(0, samples, chunk)
        ])
        estimates.append(torch.logsumexp(weights, dim=0) - math.log(samples))
    return torch.cat(estimates)


def estimate_nll(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, samples: int,
    generator: torch.Generator, **options,
) -> LikelihoodEstimate:
    """-mean L_K(x), in nats per image; ``options`` go to :func:`iwae_log_likelihood`."""
    per_image = iwae_log_likelihood(model, images, labels, samples, generator, **options)
    n = per_image.shape[0]
    spread = per_image.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return LikelihoodEstimate(-per_image.mean().item(), spread, samples, n)
