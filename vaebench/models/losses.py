"""Reconstruction and KL terms, the beta-weighted and capacity objectives, and the ELBO.

Every term is summed over pixels, latent dimensions and the batch (callers divide by the number of
images), in nats; ``mse``'s "reconstruction" is a sum of squared errors, as in the notebooks this
suite replaces, so its ELBO is not a log-likelihood bound. A stack's tensors carry a leading
member axis, and a batch sum is then one value per member (K,).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaebench.models.base import gaussian_log_density, per_draw
from vaebench.spec.config import LossConfig

IMAGE_DIMS = 3  # (C, H, W): what a batch sum adds up beside the batch axis


def pixel_costs(logits: torch.Tensor, x: torch.Tensor, kind: str, reduction: str):
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction=reduction)
    if kind == "mse":
        return F.mse_loss(torch.sigmoid(logits), x, reduction=reduction)
    raise ValueError(f"unknown reconstruction loss {kind!r}")


def reconstruction(
    logits: torch.Tensor, x: torch.Tensor, kind: str | Sequence[str],
    weights: torch.Tensor | None = None, first_kind: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed over the batch: ``bce`` on logits or ``mse`` on sigmoid. A stack's ``kind`` is one
    per member: with both kinds both are computed and each member takes its own (``first_kind``:
    :func:`first_kind_members`, made once by a caller that steps many times)."""
    kinds = [kind] if isinstance(kind, str) else list(kind)

    def cost(one: str) -> torch.Tensor:
        if weights is not None:
            return expected_reconstruction(logits, x, weights, one)
        if logits.dim() == IMAGE_DIMS + 1:  # a run alone: the batch's sum
            return pixel_costs(logits, x, one, "sum")
        return pixel_costs(logits, x, one, "none").flatten(-IMAGE_DIMS - 1).sum(-1)

    costs = {one: cost(one) for one in dict.fromkeys(kinds)}
    if len(costs) == 1:
        return next(iter(costs.values()))
    if first_kind is None:
        first_kind = first_kind_members(kinds, logits.device)
    first = costs.pop(kinds[0])
    return torch.where(first_kind, first, next(iter(costs.values())))


def first_kind_members(kinds: Sequence[str], device: torch.device) -> torch.Tensor:
    return torch.tensor([kind == kinds[0] for kind in kinds], device=device)


@dataclass
class LossTerms:
    """Batch sums of the parts of the objective, the category logits (B, K) if any, and with S
    draws of z per image (the iwae objective) the log-weights log p(x, z_s) - log q(z_s|x),
    (..., S, B); ``recon`` is then the draws' mean."""

    recon: torch.Tensor
    kl: dict[str, torch.Tensor]
    category_logits: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None

    @property
    def negative_elbo(self) -> torch.Tensor:
        """The beta = 1 bound, reported whatever objective a run trains with."""
        return self.recon + sum(self.kl.values(), torch.zeros((), device=self.recon.device))


def expected_reconstruction(
    logits: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, kind: str
) -> torch.Tensor:
    """The cost averaged over a discrete latent exactly: ``logits`` hold one decoding per
    category (category-major, K * B rows), ``weights`` (B, K) are q(c|x)."""
    lead = weights.dim() - 2  # 1 for a stack's member axis
    batch, categories = weights.shape[-2:]
    if logits.shape[lead:] != (categories * batch, *x.shape[lead + 1 :]):
        raise ValueError(
            f"decodings {tuple(logits.shape)} are not {categories} per image of {tuple(x.shape)}"
        )
    repeated = x.unsqueeze(lead).expand(*x.shape[:lead], categories, *x.shape[lead:])
    terms = pixel_costs(logits, repeated.reshape(logits.shape), kind, "none")
    per_row = terms.flatten(lead + 1).sum(dim=-1).view(*x.shape[:lead], categories, batch)
    return (weights.transpose(-2, -1) * per_row).sum((-2, -1))


def loss_terms(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, recon: str,
    samples: int = 1,
) -> LossTerms:
    out = model(x, y, samples=samples) if samples > 1 else model(x, y)
    return terms_of(model.kl_terms, out, x, recon)


def terms_of(
    kl_terms: Callable[..., dict[str, torch.Tensor]], out, x: torch.Tensor,
    recon: str | Sequence[str], first_kind: torch.Tensor | None = None,
) -> LossTerms:
    samples = out.z.shape[-2] // out.mu.shape[-2]
    if samples > 1:
        return importance_terms(kl_terms, out, x, samples)
    weights = F.softmax(out.category_logits, dim=-1) if out.mixture is not None else None
    cost = reconstruction(out.logits, x, recon, weights, first_kind)
    return LossTerms(recon=cost, kl=kl_terms(out), category_logits=out.category_logits)


def importance_terms(
    kl_terms: Callable[..., dict[str, torch.Tensor]], out, x: torch.Tensor, samples: int
) -> LossTerms:
    """A Gaussian z drawn ``samples`` times per image (sample-major rows), Bernoulli pixels."""
    lead = x.shape[: x.dim() - IMAGE_DIMS - 1]  # a stack's member axis, or none
    repeated = x.unsqueeze(len(lead)).expand(*lead, samples, *x.shape[len(lead):])
    log_px = -pixel_costs(out.logits, repeated.reshape(out.logits.shape), "bce", "none")
    log_px = log_px.flatten(-IMAGE_DIMS).sum(-1)
    log_q = gaussian_log_density(out.z, per_draw(out.mu, samples), per_draw(out.logvar, samples))
    log_prior = gaussian_log_density(out.z, torch.zeros_like(out.z), torch.zeros_like(out.z))
    draws = (*lead, samples, x.shape[len(lead)])
    log_weights = (log_px + log_prior - log_q).view(draws)
    recon = -log_px.view(draws).mean(-2).sum(-1)
    return LossTerms(recon=recon, kl=kl_terms(out), log_weights=log_weights)


def draws_per_image(config: LossConfig) -> int:
    """How many z a training step draws per image: ``iwae_k`` for the iwae objective."""
    return config.iwae_k if config.objective == "iwae" else 1


def importance_weighted_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """L_S per image from log-weights (..., S, B): log (1/S) sum_s exp(log_weights)."""
    return torch.logsumexp(log_weights, dim=-2) - math.log(log_weights.shape[-2])


def batch_marginal_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(q(c) || Uniform(K)) for q(c) the batch's mean of q(c|x), times the batch size.

    The per-image term of the ELBO averages to I(x; c) + KL(q(c) || U) over the data; this
    keeps the second part alone: the categories are kept in balanced use, and c is not
    charged for the information it carries about x.
    """
    batch, categories = logits.shape[-2:]  # (B, K), or a stack's (members, B, K): per member
    log_mean = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=-2) - math.log(batch)
    return batch * ((log_mean.exp() * log_mean).sum(-1) + math.log(categories))


def capacity(maximum: float, step: int, steps: int) -> float:
    return maximum * min(step / steps, 1.0)


class Objective:
    """The training loss of one run, or of each member of a stack (a batch sum; the trainer
    divides by the batch size).

    ``elbo``: recon + beta * KL_z + beta_c * KL_c (KL_c per image, or of the batch's marginal q(c)
    with ``kl_c: batch_marginal``; ``capacity`` ignores ``kl_c``). ``capacity`` (JointVAE): recon +
    gamma * |KL_z - C_z(t)| + gamma * |KL_c - C_c(t)|, with KLs and capacities per image and each C
    rising linearly from 0 towards its ``capacity_*`` over ``capacity_steps``. C_c is then capped
    at ln K, the largest KL a K-way categorical can have from uniform, as JointVAE's released code
    does: its MNIST setting (C_c towards 5 nats over 25,000 steps, K = 10) holds C_c at ln 10 from
    step 11,513 on.
    """

    def __init__(
        self, config: LossConfig, categories: int | None = None,
        beta: float | torch.Tensor | None = None,
    ):
        """``beta``: a stack's members' KL weights (K,), the one loss setting members may
        differ in (:data:`vaebench.stacking.plan.MEMBER_KEYS`); else ``config.beta``."""
        self.config = config
        max_c = math.log(categories) if categories else 0.0
        wanted_c = config.capacity_c if config.capacity_c is not None else max_c
        self.maximum = {"kl_z": config.capacity_z, "kl_c": wanted_c}
        self.ceiling = {"kl_z": math.inf, "kl_c": max_c}
        self.weight = {"kl_z": config.beta if beta is None else beta, "kl_c": config.beta_c}

    def target(self, name: str, step: int) -> float:
        """C(t) per image, in nats."""
        ramp = capacity(self.maximum[name], step, self.config.capacity_steps)
        return min(ramp, self.ceiling[name])

    def __call__(self, terms: LossTerms, batch_size: int, step: int) -> torch.Tensor:
        if self.config.objective == "iwae":
            if terms.log_weights is None:  # one draw per image: its log-weight is its ELBO
                return terms.negative_elbo
            return -importance_weighted_bound(terms.log_weights).sum(-1)
        loss = terms.recon
        if self.config.objective == "elbo":
            kls = terms.kl  # the ELBO's, or with loss.kl_c: batch_marginal the batch's KL of c
            if self.config.kl_c != "per_image" and "kl_c" in kls:
                assert terms.category_logits is not None
                kls = {**kls, "kl_c": batch_marginal_kl(terms.category_logits)}
            for name, kl in kls.items():
                loss = loss + self.weight[name] * kl
            return loss
        # JointVAE's capacities hold the ELBO's own (per-image) KL terms at their targets
        for name, kl in terms.kl.items():
            target = batch_size * self.target(name, step)
            loss = loss + self.config.gamma * (kl - target).abs()
        return loss
