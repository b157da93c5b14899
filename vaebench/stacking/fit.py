"""Train K runs of one shape as one stacked model, each member exactly as it would train alone
(docs/scaling.md#stacked-runs): its own batch order, draws, optimizer state and learning rate;
a member that diverges or is stopped leaves, the others going on as a smaller stack."""

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
    """``model``: the one it would train alone, filled with its slice to be evaluated alone."""

    config: RunConfig
    model: torch.nn.Module
    order_rng: torch.Generator
    draw_rng: torch.Generator


def build_member(config: RunConfig, splits: Splits, device: torch.device) -> Member:
    """The model initialised as its run alone's, and generators in the states that run's batch
    order and global random stream would have after that."""
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
    """The summed objective per member (K,), on the device."""
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
    kind = STACKED_OPTIMIZERS[configs[0].optim.name]
    return kind(list(stack.parameters()), [config.optim.lr for config in configs])


class StackTrainee:
    """K runs as one stacked model, as :func:`vaebench.training.loop.train_members` drives
    them. Evaluation is stacked where ``stacked_evaluation`` says, by default on CUDA: on the
    CPU each member alone was as fast (mlp) or faster (conv, channels-last); joint and mixture
    members draw their categories, so they are always evaluated alone."""

    earlier = 0.0  # a stack starts afresh

    def __init__(
        self, configs: Sequence[RunConfig], splits: Splits, device: torch.device,
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
        self.members = members
        self.stack = StackedGaussianVAE([m.model for m in members]).to(members[0].model.device)
        self.optimizer = optimizer(self.stack)
        graph = cuda_graph_for(self.stack, self.splits, members[0].config.loss.objective)
        self.steps = StackSteps(self.stack, self.optimizer, members, self.splits, graph)

    def epoch(self, first_step: int) -> torch.Tensor:
        return stacked_epoch(self.steps, self.splits, first_step)

    def evaluations(self, split: Split, split_name: str) -> list[Evaluation]:
        if self.stacked_evaluation:
            return evaluate_stack(self.stack, split, split_name, [m.config for m in self.members])
        alone = [self._own(position) for position in range(len(self.members))]
        return [evaluate(m.model, split, split_name, m.config) for m in alone]

    def _own(self, position: int) -> Member:
        member = self.members[position]
        member.model.load_state_dict(self.stack.member_state(position))
        return member

    def training_state(
        self, position: int, history: list[EpochMetrics], seconds: float
    ) -> dict[str, Any]:
        """What its run alone would have saved after the same epoch: it continues alone."""
        member = self._own(position)
        like = build_optimizer(member.config.optim, member.model.parameters())
        state = training_state(member.model, like, member.order_rng, history, seconds)
        state["optimizer"] = self.optimizer.member_state(position, like)
        rng = "torch_rng" if member.draw_rng.device.type == "cpu" else "cuda_rng"
        state[rng] = member.draw_rng.get_state()
        return state

    def keep(self, positions: Sequence[int]) -> None:
        kept = [self._own(position) for position in positions]
        keeping = self.optimizer.keeping
        self._restack(kept, lambda stack: keeping(positions, list(stack.parameters())))

    def final_model(self, position: int) -> torch.nn.Module:
        return self._own(position).model.eval()  # as a run alone ends


def fit_stack(
    configs: Sequence[RunConfig], splits: Splits, device: torch.device,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    save_state: Callable[[int, dict[str, Any]], None] | None = None,
    on_failed: Callable[[int, TrainingDiverged], None] | None = None,
    stacked_evaluation: bool | None = None, score_clusters: bool = True,
) -> list[TrainResult | BaseException]:
    trainee = StackTrainee(configs, splits, device, stacked_evaluation)
    return train_members(trainee, splits, device, on_epoch, save_state, on_failed, score_clusters)


def fit_members(
    configs: Sequence[RunConfig], splits: Splits, device: torch.device,
    on_epoch: Callable[[int, EpochMetrics], None],
    save_state: Callable[[int, dict[str, Any]], None] | None = None,
    on_failed: Callable[[int, TrainingDiverged], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> list[TrainResult | BaseException]:
    """A run alone in its own model (the CPU's fast path, and the one that continues a
    checkpoint), several as one stack; the clustering scores are left in ``result.clusters``."""
    if len(configs) == 1:
        trainee = ModelTrainee(configs[0], splits, device, resume)
    elif resume is not None:
        raise ValueError("a stack starts afresh: a continued run trains alone")
    else:
        trainee = StackTrainee(configs, splits, device)
    return train_members(trainee, splits, device, on_epoch, save_state, on_failed, False)
