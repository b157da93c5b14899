"""The validation and test passes of a stack's members in one pass over the split.

:func:`vaebench.scoring.evaluation.evaluate` of a Gaussian VAE draws its latents from the split's
own generator, so every member alone would see the same images and the same standard
normal draws: one draw serves all K members, which then match their runs alone up to the
rounding of the batched products. This module imports neither mlflow nor optuna.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vaebench.data import Split
from vaebench.models.base import gaussian_kl, reparameterize
from vaebench.models.losses import reconstruction
from vaebench.scoring.evaluation import Evaluation, eval_generator
from vaebench.spec.config import RunConfig
from vaebench.stacking.model import StackedGaussianVAE


@torch.no_grad()
def evaluate_stack(
    stack: StackedGaussianVAE, split: Split, split_name: str, configs: Sequence[RunConfig]
) -> list[Evaluation]:
    """Each member's :class:`Evaluation` of ``split`` (member k's config ``configs[k]``), as
    ``evaluate`` gives it alone."""
    if stack.categories:
        raise ValueError(
            "joint and mixture VAEs' members draw their categories: evaluate each alone"
        )
    config = configs[0]  # the evaluation settings are the stack's
    kinds = [c.loss.recon for c in configs]
    stack.eval()
    count, device = stack.members, split.images.device
    generator = eval_generator(split_name, device)
    samples = config.eval.samples
    recon = torch.zeros(count, device=device)
    kl = torch.zeros(count, device=device)
    means = []
    size = max(1, config.train.eval_batch_size // samples)  # as evaluate chunks the split
    for start in range(0, len(split), size):
        x, y = split.images[start : start + size], split.labels[start : start + size]
        labels = y.expand(count, *y.shape) if stack.conditional else None
        mu, logvar = stack.encode(x.expand(count, *x.shape), labels)
        repeated_mu, repeated_logvar = mu.repeat(1, samples, 1), logvar.repeat(1, samples, 1)
        noise = torch.randn(  # one member's draws, as each would make them alone
            repeated_mu.shape[1:], generator=generator, device=device, dtype=mu.dtype
        )
        repeated_labels = labels.repeat(1, samples) if labels is not None else None
        logits = stack.decode(
            reparameterize(repeated_mu, repeated_logvar, noise), repeated_labels
        )
        images = x.repeat(samples, *([1] * (x.dim() - 1)))
        recon += reconstruction(logits, images.expand(count, *images.shape), kinds) / samples
        kl += gaussian_kl(mu, logvar)
        means.append(mu)
    mu_all = torch.cat(means, dim=1)
    return [
        Evaluation(split_name, len(split), recon[k], {"kl_z": kl[k]}, mu_all[k], None)
        for k in range(count)
    ]
