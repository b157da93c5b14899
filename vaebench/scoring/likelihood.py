"""Importance-weighted log-likelihood estimates (IWAE, Burda et al. 2015).

For an image x and K draws z_k ~ q(z|x),

    L_K(x) = log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)

is a lower bound on log p(x) that rises with K towards it; L_1 is a one-sample ELBO estimate (its
expectation is the ELBO). Models with a categorical latent (``gumbel``) draw the category too, as
an exact one-hot c_k ~ q(c|x) with the weight p(c_k) / q(c_k|x) and p(c) uniform: the estimate
samples the categorical, it does not sum over it. A Gaussian-mixture VAE (``gmvae``) draws
c_k ~ q(c|x), then z_k ~ q(z|x, c_k), weighted by p(c_k) p(z_k|c_k) / (q(c_k|x) q(z_k|x, c_k)).
For a ``cvae`` every term is conditioned on the label, so the estimate bounds log p(x|y), not
log p(x).

log p(x|z) is the Bernoulli log-likelihood of the decoder's logits, which is a
likelihood only for binary pixels (``data.binarize: dynamic|static``).

Draws come from the caller's generator, so every run of a split sees the same noise; the
log-weights are summed in float32 per image and combined with logsumexp in float64, where K = 5000
terms would otherwise lose digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaebench.models.base import Posterior

LOG_2PI = math.log(2 * math.pi)


@dataclass
class LatentDraws:
    """``samples`` draws of the latents for each image of a batch, sample-major: row
    ``s * B + i`` is draw ``s`` for image ``i``."""

    z: torch.Tensor
    c: torch.Tensor | None  # one-hot categories, for models with a categorical latent
    log_q: torch.Tensor  # log q(z, c | x) per row
    log_prior: torch.Tensor  # log p(z, c) per row


def draw_latents(posterior: Posterior, samples: int, generator: torch.Generator) -> LatentDraws:
    """Draw z (and an exact one-hot c) from the posterior with ``generator``."""
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
        log_probs = F.log_softmax(posterior.category_logits.repeat(samples, 1), dim=1)
        index = torch.multinomial(log_probs.exp(), 1, generator=generator)
        c = F.one_hot(index.squeeze(1), log_probs.shape[1]).to(mu.dtype)
        log_q = log_q + log_probs.gather(1, index).squeeze(1)
        log_prior = log_prior - math.log(log_probs.shape[1])
    return LatentDraws(z=z, c=c, log_q=log_q, log_prior=log_prior)


def _gaussian_log_density(z, mu, logvar) -> torch.Tensor:
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + LOG_2PI).sum(dim=1)


def _draw_from_mixture(
    posterior: Posterior, samples: int, generator: torch.Generator
) -> LatentDraws:
    """c ~ q(c|x), then z ~ q(z|x, c); the prior is p(c) p(z|c), p(c) uniform."""
    mixture = posterior.mixture
    log_probs = F.log_softmax(posterior.category_logits.repeat(samples, 1), dim=1)
    index = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
    rows = torch.arange(index.shape[0], device=index.device)
    mu = mixture.mu.repeat(samples, 1, 1)[rows, index]
    logvar = mixture.logvar.repeat(samples, 1, 1)[rows, index]
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + noise * torch.exp(0.5 * logvar)
    categories = log_probs.shape[1]
    log_q = log_probs.gather(1, index[:, None]).squeeze(1) + _gaussian_log_density(z, mu, logvar)
    log_prior = _gaussian_log_density(
        z, mixture.prior_mu[index], mixture.prior_logvar[index]
    ) - math.log(categories)
    c = F.one_hot(index, categories).to(mu.dtype)
    return LatentDraws(z=z, c=c, log_q=log_q, log_prior=log_prior)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) per row, summed over pixels, for Bernoulli pixels given as logits."""
    terms = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return -terms.flatten(1).sum(dim=1)


ObservationModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (decoded, x) -> log p


def log_weights(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    samples: int,
    generator: torch.Generator,
    log_likelihood: ObservationModel = bernoulli_log_likelihood,
) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) for ``samples`` draws per image: shape (samples, batch).

    ``log_likelihood`` maps the decoder's output and x to log p(x|z) per row
    (Bernoulli pixels by default).
    """
    posterior = model.posterior(x, y)
    draws = draw_latents(posterior, samples, generator)
    labels = y.repeat(samples) if y is not None else None
    logits = model.decode_sample(draws.z, draws.c, labels)
    repeated = x.repeat(samples, *([1] * (x.dim() - 1)))
    weights = log_likelihood(logits, repeated) + draws.log_prior - draws.log_q
    return weights.view(samples, x.shape[0])


@dataclass
class LikelihoodEstimate:
    """The estimate of -log p(x) per image averaged over a split, and its spread."""

    nll: float  # nats per image: -mean L_K(x)
    standard_error: float  # of that mean over the images
    samples: int  # K
    images: int


@torch.no_grad()
def iwae_log_likelihood(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    samples: int,
    generator: torch.Generator,
    rows_per_pass: int = 10000,
    log_likelihood: ObservationModel = bernoulli_log_likelihood,
) -> torch.Tensor:
    """L_K(x) for every image, float64, shape (N,).

    At most ``rows_per_pass`` decoder rows are evaluated at once (images times
    draws), so K = 5000 fits in memory: a pass takes ``rows_per_pass // K``
    images (at least one) and, for one image, the draws in chunks.
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    model.eval()
    per_pass = max(1, rows_per_pass // samples)
    chunk = max(1, min(samples, rows_per_pass // per_pass))
    estimates = []
    for start in range(0, images.shape[0], per_pass):
        x = images[start : start + per_pass]
        y = labels[start : start + per_pass] if labels is not None else None
        parts = []
        for done in range(0, samples, chunk):
            count = min(chunk, samples - done)
            weights = log_weights(model, x, y, count, generator, log_likelihood)
            parts.append(weights.double())
        weights = torch.cat(parts)
        estimates.append(torch.logsumexp(weights, dim=0) - math.log(samples))
    return torch.cat(estimates)


def estimate_nll(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    samples: int,
    generator: torch.Generator,
    **options,
) -> LikelihoodEstimate:
    """The split's negative log-likelihood estimate -mean L_K(x), in nats per image;
    ``options`` (``rows_per_pass``, ``log_likelihood``) go to :func:`iwae_log_likelihood`."""
    per_image = iwae_log_likelihood(model, images, labels, samples, generator, **options)
    n = per_image.shape[0]
    spread = per_image.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return LikelihoodEstimate(-per_image.mean().item(), spread, samples, n)
