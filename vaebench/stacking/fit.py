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

Validation and test passes are stacked as well (:mod:`vaebench.stacking.evaluation`; a
joint member, ``gumbel``, or a mixture member, ``gmvae``, is evaluated in its own model, its
categories drawn exactly); a
member is copied into the model its run alone would have (same parameter names) for its
checkpoints and, after the last epoch, for the scores it computes alone (clustering,
likelihood). What a member reports is what :func:`vaebench.training.trainer.fit` reports for its
config, up to floating-point rounding of the batched products, and the timing, which is
its share of the stack's (the stack's seconds / K).

This module imports neither mlflow nor optuna.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from vaebench.data import Split, Splits
from vaebench.models import build_model, place_model
from vaebench.scoring.evaluation import Evaluation, evaluate, read_scalars
from vaebench.spec.config import RunConfig
from vaebench.stacking.evaluation import evaluate_stack
from vaebench.stacking.model import StackedGaussianVAE, stack_problem
from vaebench.stacking.optim import STACKED_OPTIMIZERS, StackedOptimizer
from vaebench.stacking.plan import MEMBER_KEYS, stack_key
from vaebench.stacking.step import StackSteps, StepBatch, cuda_graph_for
from vaebench.training.trainer import (
    EpochMetrics,
    TrainingDiverged,
    TrainResult,
    build_optimizer,
    check_finite,
    checkpoint_due,
    final_scores,
    fit,
    steps_per_epoch,
    summary_of,
    training_state,
    validation_values,
)


class MemberStopped(Exception):
    """Raised by ``on_epoch`` of :func:`fit_stack` to stop that member on purpose (a pruned
    trial): it is masked out like a diverged member, and the others go on. ``reason``: what
    stopped it, its outcome."""

    def __init__(self, reason: BaseException):
        super().__init__(str(reason))
        self.reason = reason


@dataclass
class Member:
    """One run of the stack: its config, the model it would train alone (filled with its
    slice for evaluation), its batch-order and random-draw generators."""

    config: RunConfig
    model: torch.nn.Module
    order_rng: torch.Generator
    draw_rng: torch.Generator


def build_member(config: RunConfig, splits: Splits, device: torch.device) -> Member:
    """The model, initialised as :func:`vaebench.training.trainer.fit` initialises it, and
    generators in
    the states that run's batch order and global random stream would have after that."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, splits.image_shape)
    problem = stack_problem(model)
    if problem:
        raise ValueError(problem)
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
    members = steps.members
    config = members[0].config
    images, labels = splits.train.images, splits.train.labels
    n, count = images.shape[0], len(members)
    batch_size = config.train.batch_size
    total_steps = config.train.epochs * steps_per_epoch(n, batch_size)
    device = images.device
    orders = torch.stack(
        [torch.randperm(n, generator=m.order_rng, device="cpu") for m in members]
    ).to(device)
    total = torch.zeros(count, device=device)
    steps.stack.train()
    for step, start in enumerate(range(0, n, batch_size), start=first_step):
        index = orders[:, start : start + batch_size]
        total += steps(
            StepBatch(images, labels, index, step, total_steps, splits.dynamic_binarize)
        )
    return total


def _steps(
    stack: StackedGaussianVAE, optimizer: StackedOptimizer, members: list[Member], splits: Splits
) -> StackSteps:
    """The steps of a stack of ``members``, as a CUDA graph where the stack allows."""
    graph = cuda_graph_for(stack, splits, members[0].config.loss.objective)
    return StackSteps(stack, optimizer, members, splits, graph)


def stacked_optimizer(configs: Sequence[RunConfig], stack: torch.nn.Module) -> StackedOptimizer:
    """The stack's optimizer (the members' kind), with each member's learning rate."""
    kind = STACKED_OPTIMIZERS[configs[0].optim.name]
    return kind(list(stack.parameters()), [config.optim.lr for config in configs])


def member_training_state(
    member: Member,
    optimizer: StackedOptimizer,
    index: int,
    history: list[EpochMetrics],
    seconds: float,
) -> dict[str, Any]:
    """:func:`vaebench.training.trainer.training_state` of member ``index`` (its model already
    holds its
    slice): what its run alone would have saved after the same epoch, so it continues alone."""
    config = member.config
    like = build_optimizer(config.optim, member.model.parameters())
    state = training_state(member.model, like, member.order_rng, history, seconds)
    state["optimizer"] = optimizer.member_state(index, like)
    if member.draw_rng.device.type == "cpu":
        state["torch_rng"] = member.draw_rng.get_state()
    else:
        state["cuda_rng"] = member.draw_rng.get_state()
    return state


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
    """Train ``configs`` (one :func:`stack_key`) as one stack; for each, in order, its
    :class:`TrainResult`, the :class:`TrainingDiverged` that ended it, or the reason of a
    :class:`MemberStopped` that ``on_epoch`` raised for it. ``on_epoch(i, metrics)`` sees
    each live member's epochs; every ``train.checkpoint_every`` epochs, ``save_state(i,
    state)`` receives each live member's :func:`member_training_state` (before
    ``on_epoch``), which :func:`vaebench.training.trainer.fit` continues alone; ``on_failed(i,
    error)``
    hears of a member that diverged when it does, while the others go on.

    Validation and test passes are stacked too (:func:`evaluate_stack`) where
    ``stacked_evaluation`` says, by default on CUDA: on the CPU, where a pass is not
    launch-bound, each member alone was as fast for the mlp and faster for conv (its own model
    keeps its weights channels-last, :func:`vaebench.models.place_model`), so each member is
    evaluated in its own model. A member's time is its share: an epoch's training and
    evaluation seconds divided by the members the stack held in it, and its ``seconds`` the
    sum of such shares of everything the stack did while it was a member, plus the scoring
    it does alone (clustering, likelihood). ``score_clusters`` as for
    :func:`vaebench.training.trainer.fit`."""
    keys = {stack_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError("a stack's runs differ in more than " + ", ".join(MEMBER_KEYS))
    members = [build_member(config, splits, device) for config in configs]
    stack = StackedGaussianVAE([m.model for m in members]).to(device)
    optimizer = stacked_optimizer(configs, stack)
    steps = _steps(stack, optimizer, members, splits)
    outcomes: list[TrainResult | BaseException] = [TrainResult(model=m.model) for m in members]
    count, n_train = len(members), len(splits.train)
    active = list(range(count))  # the members the stack holds, in its order
    config = configs[0]
    started = time.perf_counter()
    # each member's share of the stack's time: what it shared, divided by those sharing it
    shares = [0.0] * count
    validations: list[Evaluation | None] = [None] * count
    if stacked_evaluation is None:
        stacked_evaluation = device.type == "cuda"
    # a joint or mixture member's evaluation draws its category: each is evaluated alone
    stacked_evaluation = stacked_evaluation and not stack.categories

    def evaluations(split: Split, split_name: str) -> list[Evaluation]:
        """Each active member's evaluation, in the stack's order."""
        if stacked_evaluation:
            return list(evaluate_stack(stack, split, split_name, [configs[i] for i in active]))
        return [_evaluate_alone(stack, position, members[index], split, split_name)
                for position, index in enumerate(active)]

    def fail(index: int, error: TrainingDiverged) -> None:
        outcomes[index] = error
        if on_failed is not None:
            on_failed(index, error)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def share_since(since: float) -> None:
        for index in active:
            shares[index] += (clock() - since) / len(active)

    share_since(started)  # building the stack
    for epoch in range(1, config.train.epochs + 1):
        size = len(active)
        t0 = clock()
        first_step = (epoch - 1) * steps_per_epoch(n_train, config.train.batch_size)
        totals = stacked_epoch(steps, splits, first_step)
        t1 = clock()
        train_losses = totals.tolist()  # one host read for the stack
        values = _validation_values(splits, size, evaluations)
        t2 = clock()
        for position, index in enumerate(active):
            member, result = members[index], outcomes[index]
            validations[index] = values.evaluations[position]
            try:
                check_finite({"training loss": train_losses[position]}, f"after epoch {epoch}")
                check_finite(values.per_member[position], f"after epoch {epoch}")
            except TrainingDiverged as exc:
                fail(index, exc)
                continue
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=train_losses[position] / n_train,
                epoch_seconds=(t1 - t0) / size,
                eval_seconds=(t2 - t1) / size,
                images_per_second=n_train * size / (t1 - t0),
                values={**values.per_member[position], **member.model.annealed_values()},
            )
            result.history.append(metrics)
            if save_state is not None and checkpoint_due(epoch, member.config.train):
                member.model.load_state_dict(stack.member_state(position))
                seconds = shares[index] + (time.perf_counter() - t0) / size
                save_state(index, member_training_state(
                    member, optimizer, position, result.history, seconds
                ))
            if on_epoch is not None:
                try:
                    on_epoch(index, metrics)
                except MemberStopped as stopped:
                    outcomes[index] = stopped.reason
        share_since(t0)
        kept = [p for p, index in enumerate(active) if isinstance(outcomes[index], TrainResult)]
        if len(kept) < size:  # failed or stopped members leave the stack: no more work for them
            active = [active[p] for p in kept]
            if not active:
                break
            in_stack = [members[index] for index in active]
            stack, optimizer = _without_members(stack, optimizer, kept, in_stack)
            steps = _steps(stack, optimizer, in_stack, splits)
    tested = clock()
    tests = evaluations(splits.test, "test") if active else []
    share_since(tested)
    for position, index in enumerate(active):
        member, result = members[index], outcomes[index]
        scoring = time.perf_counter()
        member.model.load_state_dict(stack.member_state(position))
        member.model.eval()  # as a run alone ends: its last evaluation left it so
        try:
            pending = None if score_clusters else result.clusters
            scores = final_scores(
                member.model, splits, member.config, validations[index], tests[position],
                pending,
            )
        except TrainingDiverged as exc:
            fail(index, exc)
            continue
        result.summary = summary_of(scores, result.history, n_train)
        result.seconds = shares[index] + time.perf_counter() - scoring
    return outcomes


def fit_members(
    configs: Sequence[RunConfig],
    splits: Splits,
    device: torch.device,
    on_epoch: Callable[[int, EpochMetrics], None],
    save_state: Callable[[int, dict[str, Any]], None] | None = None,
    on_failed: Callable[[int, TrainingDiverged], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> list[TrainResult | BaseException]:
    """K >= 1 runs of one :func:`stack_key` trained, with :func:`fit_stack`'s interface: for
    each, in order, its result, the :class:`TrainingDiverged` that ended it, or the reason of
    a :class:`MemberStopped` that ``on_epoch`` raised for it. A run alone trains in its own
    model (:func:`vaebench.training.trainer.fit`: the fast path on the CPU, and the one that
    continues a checkpoint, ``resume``); several as one stack. The clustering scores are left
    to the run's finishing (``result.clusters``)."""
    if len(configs) > 1:
        if resume is not None:
            raise ValueError("a stack starts afresh: a continued run trains alone")
        return fit_stack(
            configs, splits, device, on_epoch, save_state, on_failed, score_clusters=False
        )
    keep = None if save_state is None else partial(save_state, 0)
    try:
        return [fit(
            configs[0], splits, device, partial(on_epoch, 0), resume, keep, score_clusters=False
        )]
    except MemberStopped as stopped:
        return [stopped.reason]
    except TrainingDiverged as exc:
        if on_failed is not None:
            on_failed(0, exc)
        return [exc]


@dataclass
class StackValidation:
    """An epoch's validation of every member: its metrics and its evaluation."""

    per_member: list[dict[str, float]]
    evaluations: list[Evaluation | None]


def _evaluate_alone(
    stack: StackedGaussianVAE, position: int, member: Member, split: Split, split_name: str
) -> Evaluation:
    """The stack's member at ``position`` evaluated in its own model."""
    member.model.load_state_dict(stack.member_state(position))
    return evaluate(member.model, split, split_name, member.config)


def _without_members(
    stack: StackedGaussianVAE,
    optimizer: StackedOptimizer,
    kept: Sequence[int],
    kept_members: Sequence[Member],
) -> tuple[StackedGaussianVAE, StackedOptimizer]:
    """The stack and its optimizer holding only the members at positions ``kept`` (those
    are ``kept_members``), each with its parameters, buffers and optimizer state as they
    were: a smaller stack built from their own models, filled from this one."""
    device = next(stack.parameters()).device
    for position, member in zip(kept, kept_members, strict=True):
        member.model.load_state_dict(stack.member_state(position))
    smaller = StackedGaussianVAE([member.model for member in kept_members]).to(device)
    return smaller, optimizer.keeping(kept, list(smaller.parameters()))


def _validation_values(
    splits: Splits, count: int, evaluations: Callable[[Split, str], list[Evaluation | None]]
) -> StackValidation:
    """What :func:`vaebench.training.trainer.fit` logs after an epoch, for each of the ``count``
    members
    (the sums read back in one transfer), and the evaluations."""
    if splits.validation is None:
        return StackValidation([{} for _ in range(count)], [None] * count)
    done = evaluations(splits.validation, "validation")
    sums = {
        f"{k}/{name}": tensor
        for k, evaluation in enumerate(done)
        if evaluation is not None
        for name, tensor in evaluation.sums().items()
    }
    read = read_scalars(sums) if sums else {}
    per_member = [
        {}
        if evaluation is None
        else validation_values(
            evaluation,
            {name: read[f"{k}/{name}"] for name in evaluation.sums()},
            splits.validation,
        )
        for k, evaluation in enumerate(done)
    ]
    return StackValidation(per_member, done)
