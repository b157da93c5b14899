"""Posterior-collapse diagnostics from an evaluation pass's posteriors: active units, the KL of
each latent dimension, and the mutual information I(x; z) estimated on a mini-batch as in He et
al. 2019 ("Lagging inference networks and posterior collapse", their ``calc_mi``); what each
means for each family: docs/metrics.md#posterior-collapse.

Each is written once over an optional leading member axis (a stack's (K, N, D)), on the
device: the validation pass reads them back with its sums, in one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaebench.models.base import (
    LOG_2PI,
    Mixture,
    Posterior,
    gaussian_kl_parts,
    gaussian_log_density,
)
from vaebench.models.gmvae import component_kl_parts

ACTIVE_UNIT_THRESHOLD = 0.01
MI_DRAWS_PER_PASS = 16  # draws scored against every image's posterior at once (memory-bound)


@dataclass(frozen=True)
class KLPerDimension:
    """The KL of each latent dimension in nats per image, as a pass over ``split`` measured
    it (plain data: it crosses to the process that finishes the run); their sum is the split's
    ``kl_z`` (``kl`` where z is the only latent)."""

    split: str
    nats: tuple[float, ...]


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> torch.Tensor:
    """Latent dimensions whose variance of E[z|x] over the images (axis -2) exceeds
    ``threshold``: of (N, D) a count, of a stack's (K, N, D) one per member. The variance in
    two passes, as numpy's: ``Tensor.var`` took five times as long on a CPU."""
    variance = (mu - mu.mean(dim=-2, keepdim=True)).pow(2).mean(dim=-2)
    return (variance > threshold).sum(dim=-1)


def kl_per_dimension(posterior: Posterior) -> torch.Tensor:
    """The KL of each latent dimension summed over the batch, (..., D) nats: KL(q(z_d|x) ||
    N(0, 1)) in closed form; under a mixture prior (gmvae) E_q(c|x) KL(q(z_d|x, c) || p(z_d|c)),
    the parts of the family's ``kl_z`` (whose diagonal Gaussians split it by dimension)."""
    if posterior.mixture is None:
        return gaussian_kl_parts(posterior.mu, posterior.logvar).sum(dim=-2)
    weights = F.softmax(posterior.category_logits, dim=-1).unsqueeze(-1)
    return (weights * component_kl_parts(posterior)).sum(dim=(-3, -2))


def _joined(tensors: list[torch.Tensor | None], axis: int) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors, dim=axis)


def cat_posteriors(parts: list[Posterior]) -> Posterior:
    """The parts' images in order (the image axis: -2 of ``mu``, ``logvar`` and the category
    logits, -3 of a mixture's components), a mixture's prior copied from the first part: the
    posteriors of a pass, as the model was then."""
    first = parts[0].mixture
    mixture = None if first is None else Mixture(
        _joined([p.mixture.mu for p in parts], -3), _joined([p.mixture.logvar for p in parts], -3),
        first.prior_mu.detach().clone(), first.prior_logvar.detach().clone(),
    )
    return Posterior(
        _joined([p.mu for p in parts], -2), _joined([p.logvar for p in parts], -2),
        _joined([p.category_logits for p in parts], -2), mixture,
    )


def take_images(posterior: Posterior, index: torch.Tensor) -> Posterior:
    """The posteriors of the images at ``index`` (axes as in :func:`cat_posteriors`)."""

    def take(t: torch.Tensor | None, axis: int) -> torch.Tensor | None:
        return None if t is None else t.index_select(axis, index)

    mixture = posterior.mixture
    if mixture is not None:
        mixture = Mixture(take(mixture.mu, -3), take(mixture.logvar, -3), mixture.prior_mu,
                          mixture.prior_logvar)
    return Posterior(take(posterior.mu, -2), take(posterior.logvar, -2),
                     take(posterior.category_logits, -2), mixture)


def _mixture_log_density(z: torch.Tensor, posterior: Posterior) -> torch.Tensor:
    """log sum_c q(c|x) N(z; mu_c, var_c) of draws ``z`` that broadcast with the images'."""
    mixture = posterior.mixture
    components = gaussian_log_density(z.unsqueeze(-2), mixture.mu, mixture.logvar)
    return (F.log_softmax(posterior.category_logits, dim=-1) + components).logsumexp(dim=-1)


def _log_q_of_every_image(z: torch.Tensor, posterior: Posterior) -> torch.Tensor:
    """log q(z_r | x_m) of draws (..., R, D) under each of the M images' posteriors: (..., R, M)."""
    if posterior.mixture is None:
        return gaussian_log_density(z.unsqueeze(-2), posterior.mu.unsqueeze(-3),
                                    posterior.logvar.unsqueeze(-3))
    return _mixture_log_density(z.unsqueeze(-2), posterior)


def mutual_information(z: torch.Tensor, posterior: Posterior) -> torch.Tensor:
    """I(x; z) in nats over M images, from one draw z_i ~ q(z|x_i) each (..., M, D):
    E_x[E_q(z|x) log q(z|x)] - E_x E_q(z|x) log q(z), with q(z) the mini-batch's aggregate
    posterior, log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log M, so the estimate is at most
    log M. The first term is -H(q(z|x)) in closed form for a Gaussian, log q(z_i|x_i) for a
    mixture (no closed form)."""
    if posterior.mixture is None:
        negative_entropy = (-0.5 * (LOG_2PI + 1 + posterior.logvar)).sum(dim=-1).mean(dim=-1)
    else:
        negative_entropy = _mixture_log_density(z, posterior).mean(dim=-1)
    images = z.shape[-2]
    log_aggregate = torch.cat([
        _log_q_of_every_image(z[..., start : start + MI_DRAWS_PER_PASS, :], posterior)
        .logsumexp(dim=-1)
        for start in range(0, images, MI_DRAWS_PER_PASS)
    ], dim=-1) - math.log(images)
    return negative_entropy - log_aggregate.mean(dim=-1)
