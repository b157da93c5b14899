"""One trial: the base config plus Optuna's values, trained by :mod:`vaebench.lifecycle.execute`
with pruning as the epoch hook; its run id, parent run and lease are Optuna user attributes."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TextIO

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from vaebench.lifecycle.claims import KEEPER, OWNER_TAG, abandoned, lease_seconds, lease_tags, owner
from vaebench.lifecycle.execute import (
    EpochHook,
    Member,
    RunContext,
    RunHooks,
    execute,
    record_invalid,
)
from vaebench.lifecycle.workspace import Workspace
from vaebench.signals import deferred_signals
from vaebench.spec.catalogue import METRICS
from vaebench.spec.config import RunConfig, VaebenchError, run_config_problems, set_dotted
from vaebench.spec.grid import RunSpec, run_key
from vaebench.spec.space import Param
from vaebench.spec.study import StudySpec
from vaebench.stacking.plan import plan_stacks
from vaebench.tracking.tracker import Tracker, TrackingError
from vaebench.training.trainer import EpochMetrics
from vaebench.tuning.outputs import PARENT_ATTR, RUN_ID_ATTR
from vaebench.tuning.storage import GRACE_BEATS, heartbeat_seconds

STOPPED_ATTR = "stopped"  # why a trial FAILED without being at fault: a signal, the store


def suggest(trial: optuna.Trial, key: str, param: Param) -> Any:
    """Optuna's parameter name is the dotted key."""
    if param.type == "float":
        return trial.suggest_float(key, param.low, param.high, log=param.log, step=param.step)
    if param.type == "int":
        step = int(param.step or 1)
        return trial.suggest_int(key, int(param.low), int(param.high), step=step, log=param.log)
    return param.decode(trial.suggest_categorical(key, param.optuna_choices()))


def trial_run(spec: StudySpec, name: str, sampled: dict[str, Any]) -> RunSpec:
    """VaebenchError if the sampled values make no valid config."""
    tree = copy.deepcopy(spec.base)
    for key, value in sampled.items():
        set_dotted(tree, key, value)
    problems = run_config_problems(tree)
    if problems:
        raise VaebenchError("; ".join(f"{key}: {message}" for key, message in problems))
    config = RunConfig.model_validate(tree)
    return RunSpec(name, run_key(config), config, tuple(sampled.items()))


def reported_beside(spec: StudySpec, final: dict[str, float]) -> dict[str, float]:
    """The test scores shown beside a trial's validation objectives: each objective's test
    counterpart, the test ELBO and, where estimated, the test NLL."""
    names = [METRICS[m].counterpart for m in spec.metrics] + ["test_elbo", "test_nll"]
    return {name: float(final[name]) for name in dict.fromkeys(names) if name in final}


def objective_values(spec: StudySpec, final: dict[str, float]) -> list[float]:
    values = []
    for metric in spec.metrics:
        if metric not in final:
            raise VaebenchError(f"objective {metric}: this run does not report it")
        value = float(final[metric])
        if not math.isfinite(value):
            raise VaebenchError(f"objective {metric}: the run ended with {value}")
        values.append(value)
    return values


@dataclass(frozen=True)
class TrialLease:
    """A trial's liveness as :data:`vaebench.lifecycle.claims.KEEPER` renews it: Optuna's
    heartbeat where the storage has one (RDB), with the owner in the user attributes (a trial
    whose process is known gone fails at once); elsewhere (journal file, memory) vaebench's
    expiring lease in the user attributes."""

    storage: optuna.storages.BaseStorage
    trial_id: int
    longest_epoch_seconds: float = 0.0
    runs_at_once: int = 1

    @property
    def key(self) -> str:
        return f"optuna-trial:{id(self.storage)}:{self.trial_id}"

    def tags(self) -> dict[str, str]:
        if heartbeat_seconds(self.storage) is not None:
            return {OWNER_TAG: owner()}
        return lease_tags(self.longest_epoch_seconds, self.runs_at_once)

    def period(self) -> float:
        beat = heartbeat_seconds(self.storage)
        return beat or lease_seconds(self.longest_epoch_seconds, self.runs_at_once) / 3

    def renew(self) -> bool:
        if self.storage.get_trial(self.trial_id).state.is_finished():
            return False
        if heartbeat_seconds(self.storage) is not None:
            self.storage.record_heartbeat(self.trial_id)
        else:
            for key, value in self.tags().items():
                self.storage.set_trial_user_attr(self.trial_id, key, value)
        return True


@dataclass
class TrialWork:
    """One trial's run as it goes (``run``: None until sampled, or if its values made no
    valid config)."""

    trial: optuna.Trial
    name: str
    own_tags: dict[str, str]  # beside the invocation's: the trial's number and state
    run: RunSpec | None = None
    run_id: str | None = None
    objectives: list[float] = field(default_factory=list)
    hooks: RunHooks = field(default_factory=RunHooks)
    told: bool = False  # its ending is settled (a stack's trial: and told to Optuna)
    ending: BaseException | None = None  # what ended its run early, once told
    lease: TrialLease | None = None  # once owned

    def on_start(self, run_id: str) -> None:
        self.run_id = run_id
        _set_attrs(self.trial, {RUN_ID_ATTR: run_id})

    def values(self) -> float | tuple[float, ...]:
        return self.objectives[0] if len(self.objectives) == 1 else tuple(self.objectives)


Tell = Callable[[TrialWork, BaseException | None], None]


@dataclass
class TrialObjective:
    """Called, Optuna's objective for a trial alone: a batch of one (:meth:`train`), its ending
    raised for Optuna to record; stacked trials (:mod:`.trial_stack`) go through :meth:`train`."""

    spec: StudySpec
    tracker: Tracker
    tags: dict[str, str]
    workspace: Workspace
    total: int  # the study's trials once this invocation's are done
    store_failure: TrackingError | None = None

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        work = self.work_for(trial)

        def settled(work: TrialWork, error: BaseException | None) -> None:
            self.settle(work, error)
            work.told, work.ending = True, error

        try:
            self.own(work)
            self.train([work], 1, settled)
        except BaseException as exc:
            if not work.told:
                self.settle(work, exc)
            if isinstance(exc, TrackingError):  # no point in the next trial: stop the study
                trial.study.stop()
            raise
        if work.ending is not None:
            raise work.ending
        return work.values()

    @staticmethod
    def work_for(trial: optuna.Trial) -> TrialWork:
        own_tags = {"optuna.trial_number": str(trial.number), "optuna.state": "RUNNING"}
        return TrialWork(trial, f"trial-{trial.number:04d}", own_tags)

    def own(self, work: TrialWork, runs_at_once: int = 1) -> None:
        """The lease first, for ``runs_at_once`` trials trained together, and the first beat."""
        trial = work.trial
        trial_id = trial._trial_id  # noqa: SLF001 - Optuna's storage calls take the id
        work.lease = TrialLease(trial.storage, trial_id, runs_at_once=runs_at_once)
        _set_attrs(trial, {**KEEPER.hold(work.lease), PARENT_ATTR: self.tracker.parent_id})
        if heartbeat_seconds(trial.storage) is not None:
            trial.storage.record_heartbeat(trial_id)

    def sample(self, work: TrialWork) -> None:
        """Values that make no valid config are recorded as a FAILED run and raised."""
        trial = work.trial
        sampled = {key: suggest(trial, key, p) for key, p in self.spec.space.items()}
        try:
            work.run = trial_run(self.spec, work.name, sampled)
        except VaebenchError as exc:
            tags = {**self.tags, **work.own_tags}
            work.on_start(record_invalid(self.tracker, work.name, sampled, tags, str(exc)))
            print(f"[{trial.number + 1}/{self.total}] {work.name} FAIL: {exc}", file=sys.stderr)
            raise

        def score(final: dict[str, float]) -> dict[str, float]:
            work.objectives.extend(objective_values(self.spec, final))
            _set_attrs(trial, reported_beside(self.spec, final))
            named = zip(self.spec.metrics, work.objectives, strict=True)
            return {f"objective.{m}": v for m, v in named}

        work.hooks = RunHooks(work.own_tags, work.on_start, extra_metrics=score)

    def train(self, works: Sequence[TrialWork], max_stack: int, tell: Tell) -> None:
        """Each trial is told when its run ends; a failing trial or stack is told, no more; the
        store's failure or a signal is raised."""
        sampled: list[TrialWork] = []
        for work in works:
            try:
                self.sample(work)
            except TrackingError:
                raise
            except Exception as exc:  # values that make no valid config: that trial fails
                tell(work, exc)
                continue
            sampled.append(work)
        for group in plan_stacks([work.run.config for work in sampled], max_stack):
            members = [sampled[index] for index in group]
            for member in members:  # told as its run ends; its lease spans the stack's epoch
                member.hooks.on_end = partial(tell, member)
                member.hooks.epoch_hook = self.epoch_hook(member, len(members))
            context = RunContext(self.tags, members[0].trial.number + 1, self.total,
                                 stopped_early=(optuna.TrialPruned,), pictures=self.spec.artifacts)
            try:
                execute([Member(m.run, m.hooks) for m in members], self.tracker, self.workspace,
                        context)
            except TrackingError:
                raise
            except Exception as exc:  # the stack as a whole failed (e.g. out of memory)
                for member in members:
                    if not member.told:
                        tell(member, exc)

    def settle(self, work: TrialWork, error: BaseException | None) -> TrialState:
        """A signal or a failing store marks the trial stopped (not the trial's fault)."""
        if work.lease is not None:
            KEEPER.let_go(work.lease.key)
        state = TrialState.COMPLETE
        if isinstance(error, optuna.TrialPruned):
            state = TrialState.PRUNED
        elif error is not None:
            state = TrialState.FAIL
            if isinstance(error, KeyboardInterrupt):
                work.trial.set_user_attr(STOPPED_ATTR, str(error) or "interrupted")
            elif isinstance(error, TrackingError):
                self.store_failure = error
                work.trial.set_user_attr(STOPPED_ATTR, f"tracking store failed: {error}")
        if work.run_id is not None and self.store_failure is None:
            with contextlib.suppress(TrackingError):  # the error that stopped it is shown
                self.tracker.set_tags(work.run_id, {"optuna.state": state.name})
        return state

    def epoch_hook(self, work: TrialWork, stack_size: int) -> EpochHook:
        """Renew the lease; report to the pruner, which may stop the trial (a metric known only
        after the last epoch is never reported). In a stack of ``stack_size`` an epoch takes
        up to that many times a member's share of it, and the lease lasts accordingly."""
        pruned_on = None if self.spec.multi_objective else self.spec.metrics[0]
        trial = work.trial

        def hook(metrics: EpochMetrics) -> None:
            longest = (metrics.epoch_seconds + metrics.eval_seconds) * stack_size
            if work.lease is not None:
                work.lease = replace(work.lease, longest_epoch_seconds=longest)
                _set_attrs(trial, KEEPER.hold(work.lease))
            self.tracker.set_tags(self.tracker.parent_id, lease_tags(longest))
            values = metrics.as_dict()
            if pruned_on in values:
                with deferred_signals():  # see _set_attrs
                    trial.report(values[pruned_on], metrics.epoch)
                    prune = trial.should_prune()
                if prune:
                    raise optuna.TrialPruned(f"pruned after epoch {metrics.epoch}")

        return hook


def _set_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """The trial's user attributes, written with signals held: a signal that cuts an Optuna
    write in half leaves a SQLite storage locked by this process's interrupted connection, and
    the writes that mark the stopped trial then wait out the lock's timeout (a Ctrl-C took over
    a minute to stop a study, measured)."""
    with deferred_signals():
        for key, value in attrs.items():
            trial.set_user_attr(key, value)


@dataclass
class StaleTrials:
    """Optuna's callback for a trial it failed for a stopped heartbeat, and ours for a trial
    whose owner is known gone: its values are tried again as a new trial (Optuna's
    ``RetryHeartbeatStaleTrialCallback``), its MLflow run tagged, one line said."""

    tracker: Tracker
    stream: TextIO = sys.stderr
    reason: str = ""  # why, when vaebench failed it

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        RetryHeartbeatStaleTrialCallback()(study, trial)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            self.tracker.set_tags(run_id, {"optuna.state": "FAIL"})
        beat = heartbeat_seconds(study._storage)  # noqa: SLF001 - the study's own storage
        reason = self.reason or f"no heartbeat for {GRACE_BEATS * (beat or 0)} s"
        print(f"trial {trial.number} was left RUNNING ({reason}): marked FAIL; its values are "
              "tried again as a new trial", file=self.stream)


def fail_abandoned_trials(study: optuna.Study, stale: StaleTrials, others_live: bool) -> int:
    """Trials a killed invocation left RUNNING: FAIL, their values tried again. On an RDB
    storage Optuna's heartbeat finds them (after its grace period), and vaebench at once
    where the owner's process is known gone; elsewhere vaebench's lease decides. Their MLflow
    runs are KILLED by :func:`vaebench.lifecycle.claims.recover_abandoned`. ``others_live``:
    another invocation of the study still runs (a RUNNING run of the study is left after
    recovery); a trial without an owner may then be one it has just created, so it is left
    alone. (Optuna's ``datetime_start`` is its creator's naive local time: never an age.)"""
    storage = study._storage  # noqa: SLF001 - Optuna has no public call for another's trial
    if heartbeat_seconds(storage) is not None:
        optuna.storages.fail_stale_trials(study)
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = abandoned(trial.user_attrs)
        if reason is None or (others_live and OWNER_TAG not in trial.user_attrs):
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed by another
            if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                replace(stale, reason=reason)(study, storage.get_trial(trial._trial_id))
                count += 1
    return count


def trials_done(study: optuna.Study) -> int:
    """Failed trials count only where by their own fault (not stopped by a signal, nor lost
    with their process and tried again)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and STOPPED_ATTR not in t.user_attrs
                   and t.number not in retried)
               for t in trials)
