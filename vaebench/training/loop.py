"""The one epoch loop, for K >= 1 members trained together (docs/architecture.md), and
:func:`fit`, a run alone; an epoch's sums are read back to the host in one transfer."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from vaebench.data import Split, Splits
from vaebench.scoring.evaluation import Evaluation, evaluate, read_scalars
from vaebench.spec.config import RunConfig
from vaebench.timeline import TIMELINE, phase
from vaebench.training.trainer import (
    EpochMetrics,
    ModelTrainee,
    TrainingDiverged,
    TrainResult,
    check_finite,
    checkpoint_due,
    final_scores,
    not_logged,
    steps_per_epoch,
    timing_summary,
    validation_values,
)


class MemberStopped(Exception):
    """Raised by ``on_epoch`` to stop that member (a pruned trial); ``reason``: its outcome."""

    def __init__(self, reason: BaseException):
        super().__init__(str(reason))
        self.reason = reason


class Trainee(Protocol):
    """K >= 1 runs trained together; a member is named by its position among those still in."""

    configs: list[RunConfig]  # member i's config, i its position at the start
    results: list[TrainResult]  # member i's, holding its model and a continued run's epochs
    earlier: float  # the seconds a continued run had trained

    def epoch(self, first_step: int) -> torch.Tensor: ...  # (K,) summed objectives, on the device

    def evaluations(self, split: Split, split_name: str) -> list[Evaluation]: ...

    def training_state(
        self, position: int, history: list[EpochMetrics], seconds: float
    ) -> dict[str, Any]:
        ...  # what the member's run alone would save: it continues alone

    def keep(self, positions: Sequence[int]) -> None: ...  # only the members at ``positions`` go on

    def final_model(self, position: int) -> torch.nn.Module: ...


def train_members(
    trainee: Trainee, splits: Splits, device: torch.device,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    save_state: Callable[[int, dict[str, Any]], None] | None = None,
    on_failed: Callable[[int, TrainingDiverged], None] | None = None, score_clusters: bool = True,
) -> list[TrainResult | BaseException]:
    """For each member, in order, its result, the :class:`TrainingDiverged` that ended it
    (``on_failed`` hears of it at once), or the reason of a :class:`MemberStopped`.

    ``save_state(i, state)`` comes before ``on_epoch`` sees the epoch. A member's time is its
    share of the stack's (docs/scaling.md#what-a-member-records). Without ``score_clusters``
    what the clustering scores are computed from is left in ``result.clusters``."""
    loop = _Loop(trainee, splits, device, on_failed)
    config = trainee.configs[0]
    per_epoch = steps_per_epoch(len(splits.train), config.train.batch_size)
    for epoch in range(len(trainee.results[0].history) + 1, config.train.epochs + 1):
        t0 = loop.clock()
        trains, values = loop.train_epoch((epoch - 1) * per_epoch)
        times = (t0, loop.trained_at, loop.clock())
        TIMELINE.add("epoch", f"epoch {epoch}", t0, times[1] - t0)
        TIMELINE.add("validation", f"validation {epoch}", times[1], times[2] - times[1])
        for position, index in enumerate(list(loop.active)):
            metrics = loop.metrics(position, epoch, trains[position], values[position], times)
            if metrics is None:
                continue
            if save_state is not None and checkpoint_due(epoch, trainee.configs[index].train):
                seconds = loop.shares[index] + (loop.clock() - t0) / len(loop.active)
                history = loop.outcomes[index].history
                save_state(index, trainee.training_state(position, history, seconds))
            if on_epoch is not None:
                try:
                    on_epoch(index, metrics)
                except MemberStopped as stopped:
                    loop.outcomes[index] = stopped.reason
        loop.share_since(t0)
        if not loop.keep_going():
            break
    loop.score(score_clusters)
    return loop.outcomes


class _Loop:

    def __init__(self, trainee: Trainee, splits: Splits, device: torch.device, on_failed):
        self.trainee, self.configs, self.splits = trainee, trainee.configs, splits
        self.device, self.on_failed = device, on_failed
        self.outcomes: list[TrainResult | BaseException] = list(trainee.results)
        self.active = list(range(len(self.configs)))  # the members still in, in position order
        self.shares = [trainee.earlier] * len(self.configs)
        self.validations: list[Evaluation | None] = [None] * len(self.configs)
        self.trained_at = 0.0

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def share_since(self, since: float) -> None:
        now = self.clock()
        for index in self.active:
            self.shares[index] += (now - since) / len(self.active)

    def fail(self, index: int, error: TrainingDiverged) -> None:
        self.outcomes[index] = error
        if self.on_failed is not None:
            self.on_failed(index, error)

    def train_epoch(self, first_step: int) -> tuple[list[float], list[dict[str, float]]]:
        totals = self.trainee.epoch(first_step)
        self.trained_at = self.clock()
        sums = {f"{p}/train": totals[p] for p in range(len(self.active))}
        evaluations: list[Evaluation | None] = [None] * len(self.active)
        if self.splits.validation is not None:
            evaluations = list(self.trainee.evaluations(self.splits.validation, "validation"))
        for position, evaluation in enumerate(evaluations):
            self.validations[self.active[position]] = evaluation
            for name, tensor in (evaluation.scalars() if evaluation else {}).items():
                sums[f"{position}/{name}"] = tensor
        read = read_scalars(sums)
        values = []
        for p, evaluation in enumerate(evaluations):
            names = evaluation.scalars() if evaluation else {}
            mine = {name: read[f"{p}/{name}"] for name in names}
            values.append(validation_values(evaluation, mine, self.splits.validation))
        return [read[f"{p}/train"] for p in range(len(self.active))], values

    def metrics(self, position, epoch, train, values, times) -> EpochMetrics | None:
        """Appended to the member's history; None if its numbers diverged."""
        index, size = self.active[position], len(self.active)
        n_train, (t0, t1, t2) = len(self.splits.train), times
        when = f"after epoch {epoch}"
        result = self.outcomes[index]
        try:
            check_finite({"training loss": train}, when)
            check_finite(values, when)
        except TrainingDiverged as exc:
            self.fail(index, exc)
            return None
        metrics = EpochMetrics(
            epoch=epoch, train_loss=train / n_train, epoch_seconds=(t1 - t0) / size,
            eval_seconds=(t2 - t1) / size, images_per_second=n_train * size / (t1 - t0),
            values={**values, **result.model.annealed_values()},
        )
        result.history.append(metrics)
        return metrics

    def keep_going(self) -> bool:
        kept = [p for p, i in enumerate(self.active) if isinstance(self.outcomes[i], TrainResult)]
        if len(kept) < len(self.active):
            self.active = [self.active[p] for p in kept]
            if self.active:
                self.trainee.keep(kept)
        return bool(self.active)

    def score(self, score_clusters: bool) -> None:
        tested = self.clock()
        tests = self.trainee.evaluations(self.splits.test, "test") if self.active else []
        self.share_since(tested)
        TIMELINE.add("test", "test pass", tested, self.clock() - tested)
        for position, index in enumerate(self.active):
            scoring, result, config = time.perf_counter(), self.outcomes[index], self.configs[index]
            model = self.trainee.final_model(position)
            validation = self.validations[index]
            if validation is None and self.splits.validation is not None:  # continued at its end
                validation = evaluate(model, self.splits.validation, "validation", config)
            pending = None if score_clusters else result.clusters
            try:
                with phase("scoring", "final scores"):
                    scores = final_scores(
                        model, self.splits, config, validation, tests[position], pending
                    )
            except TrainingDiverged as exc:
                self.fail(index, exc)
                continue
            # logged after the last epoch: the scores it did not log (val_nmi), the timing
            timing = timing_summary(result.history, len(self.splits.train))
            result.summary = {**not_logged(scores, result.final.values), **timing}
            measured = validation if validation is not None else tests[position]
            result.kl_per_dimension = measured.kl_per_dimension()
            result.seconds = self.shares[index] + time.perf_counter() - scoring


def fit(
    config: RunConfig, splits: Splits, device: torch.device,
    on_epoch: Callable[[EpochMetrics], None] | None = None, resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None, score_clusters: bool = True,
) -> TrainResult:
    """One run; same config and seed on CPU give the same numbers, ``resume`` (a
    :func:`~vaebench.training.trainer.training_state`) too. Diverged: :class:`TrainingDiverged`."""
    [outcome] = train_members(
        ModelTrainee(config, splits, device, resume), splits, device,
        on_epoch=None if on_epoch is None else (lambda index, metrics: on_epoch(metrics)),
        save_state=None if save_state is None else (lambda index, state: save_state(state)),
        score_clusters=score_clusters,
    )
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
