"""The validation and test passes of a stack's members in one pass over the split.

:func:`vaebench.scoring.evaluation.evaluate` of a Gaussian VAE draws its latents from the split's
own generator, so every member alone would see the same images and the same standard
normal draws: one draw serves all K members, which then match their runs alone up to the
rounding of the batched products.
"""

from __future__ import annotations

from collections.abc import Sequence

from vaebench.data import Split
from vaebench.scoring.evaluation import Evaluation, evaluate_members
from vaebench.spec.config import RunConfig
from vaebench.stacking.model import StackedGaussianVAE


def evaluate_stack(
    stack: StackedGaussianVAE, split: Split, split_name: str, configs: Sequence[RunConfig]
) -> list[Evaluation]:
    """Each member's :class:`Evaluation` of ``split`` (member k's config ``configs[k]``), as
    ``evaluate`` gives it alone."""
    if stack.categories:
        raise ValueError(
            "joint and mixture VAEs' members draw their categories: evaluate each alone"
        )
    return evaluate_members(stack, split, split_name, configs)
