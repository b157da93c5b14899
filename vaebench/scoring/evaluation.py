"""Scoring a model on a split: the ELBO estimate, the collapse diagnostics, clustering scores,
the likelihood estimate.

Every evaluation draws its latents from its own generator, seeded per split, so every run and
epoch of a split sees the same draws (docs/metrics.md#evaluation); categorical latents are drawn
as exact one-hot samples from q(c|x): a relaxed sample with the discrete KL would bound nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from vaebench.data import Split
from vaebench.models import convolutional
from vaebench.models.base import Posterior
from vaebench.models.losses import reconstruction
from vaebench.scoring.clustering import ClusterInput
from vaebench.scoring.collapse import (
    KLPerDimension,
    active_units,
    cat_posteriors,
    kl_per_dimension,
    mutual_information,
    take_images,
)
from vaebench.scoring.likelihood import draw_latents, estimate_nll
from vaebench.spec.config import RunConfig

EVAL_SEEDS = {"validation": 101, "test": 202}
LIKELIHOOD_ROWS_PER_PASS = 20000  # decoder rows (images x draws) per pass of the estimate
LIKELIHOOD_SUBSET_SEED = 303  # the permutation eval.iwae_images takes its images from
MI_IMAGES = 128  # the mini-batch the mutual information is estimated on: at most log 128
MI_SUBSET_SEED = 404  # the permutation it takes its images from
PREFIXES = {"validation": "val", "test": "test"}
T = TypeVar("T")


def eval_generator(split_name: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(EVAL_SEEDS[split_name])


def read_scalars(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Device scalars read back to the host in one transfer."""
    return dict(zip(tensors, torch.stack(list(tensors.values())).tolist(), strict=True))


@dataclass
class Evaluation:

    split_name: str
    images: int
    recon: torch.Tensor
    kl: dict[str, torch.Tensor]
    mu: torch.Tensor
    categories: torch.Tensor | None  # argmax q(c|x), for models with a categorical latent
    posterior: Posterior  # every image's (its mu is ``mu``)
    mi: torch.Tensor  # I(x; z) estimated on a mini-batch
    active_units: torch.Tensor

    @property
    def prefix(self) -> str:
        return PREFIXES[self.split_name]

    def scalars(self) -> dict[str, torch.Tensor]:
        """What the host reads back, in one transfer: the sums and the collapse diagnostics."""
        dtype = self.recon.dtype
        return {"recon": self.recon, **self.kl, "mi": self.mi.to(dtype),
                "active_units": self.active_units.to(dtype)}

    def metrics(self, read: dict[str, float]) -> dict[str, float]:
        """Per image, from the scalars read back; ``<prefix>_elbo`` is the beta = 1 bound."""
        n, p = self.images, self.prefix
        kl = {name: read[name] for name in self.kl}
        total_kl = sum(kl.values())
        values = {
            f"{p}_elbo": -(read["recon"] + total_kl) / n, f"{p}_recon": read["recon"] / n,
            f"{p}_kl": total_kl / n,
        }
        if len(kl) > 1:  # the parts of the KL, e.g. kl_z and kl_c
            values.update({f"{p}_{name}": value / n for name, value in kl.items()})
        values.update({f"{p}_mi": read["mi"], f"{p}_active_units": read["active_units"]})
        return values

    def kl_per_dimension(self) -> KLPerDimension:
        """Computed from the pass's posteriors when asked (once, at a run's end: a gmvae's
        takes as long as its KL terms), and read back to the host."""
        nats = (kl_per_dimension(self.posterior) / self.images).tolist()
        return KLPerDimension(self.split_name, tuple(nats))


def evaluate(
    model: torch.nn.Module, split: Split, split_name: str, config: RunConfig
) -> Evaluation:
    return evaluate_members(model, split, split_name, [config])[0]


@torch.no_grad()
def evaluate_members(
    model: torch.nn.Module, split: Split, split_name: str, configs: Sequence[RunConfig]
) -> list[Evaluation]:
    """:func:`evaluate` of each member of a stack (the evaluation settings the first's), or of
    a model alone. The members share one member's draws; the mutual information is estimated
    on the posteriors and first draws of a fixed subset of the split's images (no other pass,
    no other draw)."""
    config = configs[0]
    model.eval()
    device = split.images.device
    generator = eval_generator(split_name, device)
    samples = config.eval.samples
    kinds = [c.loss.recon for c in configs]
    recon = torch.zeros((), device=device)
    kl: dict[str, torch.Tensor] = {}
    posteriors, categories, firsts = [], [], []
    size = max(1, config.train.eval_batch_size // samples)  # decoder rows per pass, draws included
    rows = rows_per_call(model, device) if len(configs) == 1 else None  # a stack: whole
    for start in range(0, len(split), size):
        x, y = split.images[start : start + size], split.labels[start : start + size]
        posterior = in_pieces(model.posterior, cat_posteriors, rows, x, y)
        draws = draw_latents(posterior, samples, generator)
        logits = in_pieces(model.decode_sample, torch.cat, rows, draws.z, draws.c,
                           y.repeat(samples))
        repeated = x.repeat(samples, *([1] * (x.dim() - 1))).expand(logits.shape)
        recon = recon + reconstruction(logits, repeated, kinds) / samples
        for name, value in model.kl_terms(posterior).items():
            kl[name] = kl.get(name, 0) + value
        posteriors.append(posterior)
        firsts.append(draws.z[..., : x.shape[0], :])  # each image's first draw (sample-major)
        if posterior.category_logits is not None:
            categories.append(posterior.category_logits.argmax(dim=1))
    posterior = cat_posteriors(posteriors)
    mu = posterior.mu
    mi, active = subset_mutual_information(posterior, firsts), active_units(mu)
    if mu.dim() == 2:  # a model alone
        found = torch.cat(categories) if categories else None
        return [Evaluation(split_name, len(split), recon, kl, mu, found, posterior, mi, active)]
    return [  # a stack's members: Gaussian posteriors alone (categories are evaluated alone)
        Evaluation(
            split_name, len(split), recon[k], {n: v[k] for n, v in kl.items()}, mu[k], None,
            Posterior(mu[k], posterior.logvar[k]), mi[k], active[k],
        )
        for k in range(mu.shape[0])
    ]


# a convolutional network's images (or decoder rows) per call on the CPU: oneDNN ran the conv
# VAE's forward pass over 10,000 images in 0.60 s at 1,000 a call and 0.46 s at 500 (2-core
# CPU; a call's activations then stay in the cache), and 500 gave the same bits as 1,000
CPU_CONVOLUTION_ROWS = 500


def rows_per_call(model: torch.nn.Module, device: torch.device) -> int | None:
    """How many rows an evaluation hands a model alone at once (None: a pass's batch whole).
    The pass's batch, and so its draws, stay ``train.eval_batch_size``."""
    return CPU_CONVOLUTION_ROWS if device.type == "cpu" and convolutional(model) else None


def in_pieces(
    call: Callable[..., T], join: Callable[[list[T]], T], rows: int | None,
    first: torch.Tensor, *others: torch.Tensor | None,
) -> T:
    """``call`` on its inputs (rows first: a model alone's) in consecutive pieces of ``rows``
    rows of each (None stays None), the pieces' results joined in order; whole where
    ``rows`` does not divide them into equal pieces (other piece sizes are not known to give
    the bits the whole gives)."""
    count = first.shape[0]
    inputs = (first, *others)
    if rows is None or count <= rows or count % rows:
        return call(*inputs)
    return join([call(*(t if t is None else t[start : start + rows] for t in inputs))
                 for start in range(0, count, rows)])


def subset_mutual_information(posterior: Posterior, firsts: list[torch.Tensor]) -> torch.Tensor:
    """I(x; z) on the ``MI_IMAGES`` of a fixed permutation of the split (all, if fewer), from
    the split's posteriors and each pass's first draws."""
    draws = torch.cat(firsts, dim=-2)
    chosen = mi_subset(draws.shape[-2], draws.device)
    if chosen is not None:
        posterior, draws = take_images(posterior, chosen), draws.index_select(-2, chosen)
    return mutual_information(draws, posterior)


@functools.lru_cache(maxsize=16)
def mi_subset(images: int, device: torch.device) -> torch.Tensor | None:
    """The mutual information's images, copied to the device once: a copy to a GPU waits for
    the work queued before it, a host sync the validation pass would make every epoch."""
    chosen = fixed_subset(images, MI_IMAGES, MI_SUBSET_SEED)
    return None if chosen is None else chosen.to(device)


def cluster_input(evaluation: Evaluation, labels: torch.Tensor) -> ClusterInput:
    categories = evaluation.categories
    means = evaluation.mu.cpu().numpy() if categories is None else None
    found = categories.cpu().numpy() if categories is not None else None
    return ClusterInput(evaluation.prefix, labels.cpu().numpy(), means, found)


def fixed_subset(images: int, count: int | None, seed: int) -> torch.Tensor | None:
    """The first ``count`` of a fixed permutation, in the split's order (None: all). MNIST's
    test file is ordered (its first 5,000 images from the cleaner writers): no fair sample."""
    if count is None or count >= images:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(images, generator=generator)[:count].sort().values


def likelihood_subset(images: int, count: int | None) -> torch.Tensor | None:
    return fixed_subset(images, count, LIKELIHOOD_SUBSET_SEED)


def likelihood_metrics(
    model: torch.nn.Module, split: Split, split_name: str, config: RunConfig
) -> dict[str, float]:
    """``<prefix>_nll`` (nats per image) and its standard error over the images."""
    images, labels = split.images, split.labels
    chosen = likelihood_subset(len(split), config.eval.iwae_images)
    if chosen is not None:
        chosen = chosen.to(images.device)
        images, labels = images.index_select(0, chosen), labels.index_select(0, chosen)
    generator = eval_generator(split_name, split.images.device)
    estimate = estimate_nll(
        model, images, labels, config.eval.iwae_samples, generator,
        rows_per_pass=LIKELIHOOD_ROWS_PER_PASS,
    )
    prefix = PREFIXES[split_name]
    return {f"{prefix}_nll": estimate.nll, f"{prefix}_nll_se": estimate.standard_error}
