"""The validation and test passes of a stack's members in one pass over the split: every
member alone would draw the same latents from the split's generator, so one draw serves all."""

from __future__ import annotations

from collections.abc import Sequence

from vaebench.data import Split
from vaebench.scoring.evaluation import Evaluation, evaluate_members
from vaebench.spec.config import RunConfig
from vaebench.stacking.model import StackedGaussianVAE


def evaluate_stack(
    stack: StackedGaussianVAE, split: Split, split_name: str, configs: Sequence[RunConfig]
) -> list[Evaluation]:
    if stack.categories:
        raise ValueError(
            "joint and mixture VAEs' members draw their categories: evaluate each alone"
        )
    return evaluate_members(stack, split, split_name, configs)
