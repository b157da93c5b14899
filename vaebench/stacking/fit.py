"""Train K runs of one shape as one stacked model, each member exactly as it would train alone.

Members share the architecture, data, batch size, epochs and objective, and may differ in
what :data:`MEMBER_KEYS` names (seed, KL weight, learning rate). Each keeps its own batch
order (a permutation from its seed), its own random draws (noise and binarized pixels, from
a generator in the state its run alone would have), its own Adam state and learning rate.
The members' losses are summed before one backward pass; as no parameter is shared, each
member's gradient is exactly its own. A member whose loss or metrics turn NaN or infinite
(its run fails with the reason), or that its caller stops (a pruned trial), leaves the stack
after that epoch: the others go on as a smaller stack, their tensors and optimizer state
carried over exactly, so a stopped member costs nothing more.

A member is copied into the model its run alone would have (same parameter names) for its
checkpoints, the evaluations it makes alone (:class:`StackTrainee`) and, after the last
epoch, the scores it computes alone (clustering, likelihood). What a member reports is what
:func:`vaebench.training.loop.fit` reports for its config, up to floating-point rounding of
the batched products, and the timing, which is its share of the stack's (seconds / K).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vaebench.data import Split, Splits
from vaebench.models import build_model, place_model
from vaebench.scoring.evaluation import Evaluation, evaluate
from vaebench.spec.config import RunConfig
from vaebench.stacking.evaluation import evaluate_stack
from vaebench.stacking.model import StackedGaussianVAE
from vaebench.stacking.optim import STACKED_OPTIMIZERS, StackedOptimizer
from vaebench.stacking.plan import MEMBER_KEYS, stack_key
from vaebench.stacking.step import StackSteps, cuda_graph_for
from vaebench.training.loop import train_members
from vaebench.training.trainer import (
    EpochMetrics,
    ModelTrainee,
    TrainingDiverged,
    TrainResult,
    build_optimizer,
    training_state,
)


@dataclass
class Member:
    """One run of the stack: its config, the model it would train alone (filled with its
    slice for evaluation), its batch-order and random-draw generators."""

    config: RunConfig
    model: torch.nn.Module
    order_rng: torch.Generator
    draw_rng: torch.Generator


def build_member(config: RunConfig, splits: Splits, device: torch.device) -> Member:
    """The model, initialised as :func:`vaebench.training.loop.fit` initialises it, and
    generators in the states that run's batch order and global random stream would have
    after that. (Whether it stacks, :func:`stack_problem`, the stack it joins checks.)"""
    torch.manual_seed(config.seed)
    model = build_model(config.model, splits.image_shape)
    draw_rng = torch.Generator(device=device)
    if device.type == "cpu":
        draw_rng.set_state(torch.get_rng_state())  # after the initialisation's draws
    else:
        draw_rng.manual_seed(config.seed)  # initialisation draws on the CPU, not here
    order_rng = torch.Generator(device="cpu").manual_seed(config.seed)
    # placed as fit() places it: where a member is evaluated alone, it runs as fast as alone
    return Member(config, place_model(model, device), order_rng, draw_rng)


def stacked_epoch(steps: StackSteps, splits: Splits, first_step: int = 0) -> torch.Tensor:
    """One pass over the training split for every member of ``steps``' stack, its steps
    numbered from ``first_step`` (a schedule, such as a temperature, follows them); the
    summed objective per member (K,) as a device tensor."""
    members, n, device = steps.members, len(splits.train), splits.train.images.device
    batch_size = members[0].config.train.batch_size
    orders = [torch.randperm(n, generator=m.order_rng, device="cpu") for m in members]
    orders = torch.stack(orders).to(device)
    total = torch.zeros(len(members), device=device)
    steps.stack.train()
    for step, start in enumerate(range(0, n, batch_size), start=first_step):
        total += steps(orders[:, start : start + batch_size], step)
    return total


def stacked_optimizer(configs: Sequence[RunConfig], stack: torch.nn.Module) -> StackedOptimizer:
    """The stack's optimizer (the members' kind), with each member's learning rate."""
    kind = STACKED_OPTIMIZERS[configs[0].optim.name]
    return kind(list(stack.parameters()), [config.optim.lr for config in configs])


class StackTrainee:
    """K runs as one stacked model, as the epoch loop
    (:func:`vaebench.training.loop.train_members`) drives them. Validation and test passes
    are stacked (:func:`evaluate_stack`) where ``stacked_evaluation`` says, by default on
    CUDA: on the CPU, where a pass is not launch-bound, each member alone was as fast for the
    mlp and faster for conv (its own model keeps its weights channels-last,
    :func:`vaebench.models.place_model`), so each member is evaluated in its own model; a
    joint or mixture member's evaluation draws its category, so those are always."""

    earlier = 0.0  # a stack starts afresh

    def __init__(
        self,
        configs: Sequence[RunConfig],
        splits: Splits,
        device: torch.device,
        stacked_evaluation: bool | None = None,
    ):
        if len({stack_key(c) for c in configs}) != 1:
            raise ValueError("a stack's runs differ in more than " + ", ".join(MEMBER_KEYS))
        self.configs, self.splits = list(configs), splits
        members = [build_member(config, splits, device) for config in configs]
        self.results = [TrainResult(model=member.model) for member in members]
        self._restack(members, lambda stack: stacked_optimizer(configs, stack))
        stacked = device.type == "cuda" if stacked_evaluation is None else stacked_evaluation
        self.stacked_evaluation = stacked and not self.stack.categories

    def _restack(
        self, members: list[Member], optimizer: Callable[[torch.nn.Module], StackedOptimizer]
    ) -> None:
        """The stack of ``members``' own models, its ``optimizer(stack)`` and its steps."""
        self.members = members
        self.stack = StackedGaussianVAE([m.model for m in members]).to(members[0].model.device)
        self.optimizer = optimizer(self.stack)
        graph = cuda_graph_for(self.stack, self.splits, members[0].config.loss.objective)
        self.steps = StackSteps(self.stack, self.optimizer, members, self.splits, graph)

    def epoch(self, first_step: int) -> torch.Tensor:
        return stacked_epoch(self.steps, self.splits, first_step)

    def evaluations(self, split: Split, split_name: str) -> list[Evaluation]:
        if self.stacked_evaluation:
            configs = [member.config for member in self.members]
            return evaluate_stack(self.stack, split, split_name, configs)
        alone = [self._own(position) for position in range(len(self.members))]
        return [evaluate(m.model, split, split_name, m.config) for m in alone]

    def _own(self, position: int) -> Member:
        """The member at ``position``, its weights copied into its own model."""
        member = self.members[position]
        member.model.load_state_dict(self.stack.member_state(position))
        return member

    def training_state(
        self, position: int, history: list[EpochMetrics], seconds: float
    ) -> dict[str, Any]:
        """:func:`vaebench.training.trainer.training_state` of the member: what its run alone
        would have saved after the same epoch, so it continues alone."""
        member = self._own(position)
        like = build_optimizer(member.config.optim, member.model.parameters())
        state = training_state(member.model, like, member.order_rng, history, seconds)
        state["optimizer"] = self.optimizer.member_state(position, like)
        rng = "torch_rng" if member.draw_rng.device.type == "cpu" else "cuda_rng"
        state[rng] = member.draw_rng.get_state()
        return state

    def keep(self, positions: Sequence[int]) -> None:
        """The stack and its optimizer hold only the members at ``positions``, each with its
        parameters, buffers and optimizer state as they were: a smaller stack built from their
        own models, filled from this one."""
        kept = [self._own(position) for position in positions]
        keeping = self.optimizer.keeping
        self._restack(kept, lambda stack: keeping(positions, list(stack.parameters())))

    def final_model(self, position: int) -> torch.nn.Module:
        return self._own(position).model.eval()  # as a run alone ends


def fit_stack(
    configs: Sequence[RunConfig],
    splits: Splits,
    device: torch.device,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    save_state: Callable[[int, dict[str, Any]], None] | None = None,
    on_failed: Callable[[int, TrainingDiverged], None] | None = None,
    stacked_evaluation: bool | None = None,
    score_clusters: bool = True,
) -> list[TrainResult | BaseException]:
    """Train ``configs`` (one :func:`stack_key`) as one stack (:class:`StackTrainee`), with
    :func:`vaebench.training.loop.train_members`'s callbacks and outcomes; each member's
    checkpoint is the state its run alone continues."""
    trainee = StackTrainee(configs, splits, device, stacked_evaluation)
    return train_members(trainee, splits, device, on_epoch, save_state, on_failed, score_clusters)


def fit_members(
    configs: Sequence[RunConfig],
    splits: Splits,
    device: torch.device,
    on_epoch: Callable[[int, EpochMetrics], None],
    save_state: Callable[[int, dict[str, Any]], None] | None = None,
    on_failed: Callable[[int, TrainingDiverged], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> list[TrainResult | BaseException]:
    """K >= 1 runs of one :func:`stack_key` trained by the one epoch loop: a run alone in its
    own model (:class:`ModelTrainee`: the fast path on the CPU, and the one that continues a
    checkpoint, ``resume``), several as one stack. The clustering scores are left to the
    run's finishing (``result.clusters``)."""
    if len(configs) == 1:
        trainee = ModelTrainee(configs[0], splits, device, resume)
    elif resume is not None:
        raise ValueError("a stack starts afresh: a continued run trains alone")
    else:
        trainee = StackTrainee(configs, splits, device)
    return train_members(trainee, splits, device, on_epoch, save_state, on_failed, False)
