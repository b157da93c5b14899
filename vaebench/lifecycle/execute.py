"""The life of tracked runs, one alone or K trained together as a stack, for ``run`` and ``tune``
(see docs/architecture.md): nothing else starts or ends a run. A run alone is a stack of one.

How an ending is recorded, for each member:
- finished: FINISHED, the checkpoint removed (the final state_dict is an artifact);
- a signal (:class:`~vaebench.signals.Interrupted`, Ctrl-C): KILLED with the reason, the
  checkpoint kept, so that the next invocation continues the run;
- stopped on purpose (``RunContext.stopped_early``, e.g. a pruned trial) or by an error of the
  run (diverged, its scoring failed): KILLED, or FAILED with the error; no checkpoint, and the
  other members go on;
- an error of the whole (out of memory): every member not ended yet FAILED, and raised;
- the store failing (:class:`TrackingError`): nothing more is written; the runs stay RUNNING
  with a lease that the next invocation recognises as abandoned.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from vaebench.lifecycle.artifacts import picture_arrays, weights_bytes
from vaebench.lifecycle.claims import KEEPER, RunLease, lease_tags
from vaebench.lifecycle.exactly_once import ClaimLost, check_continuation
from vaebench.lifecycle.post_run import (
    ExtraMetrics,
    FinishJob,
    RunOutcome,
    end_for_good,
    end_quietly,
    finished,
)
from vaebench.lifecycle.provenance import code_version, run_tags
from vaebench.lifecycle.workspace import Workspace
from vaebench.signals import deferred_signals
from vaebench.spec.config import DiskFull, first_line
from vaebench.spec.grid import RunSpec
from vaebench.stacking.fit import fit_members
from vaebench.timeline import TIMELINE, phase
from vaebench.tracking.tracker import Tracker, TrackingError
from vaebench.training.loop import MemberStopped
from vaebench.training.progress import RunProgress, line_prefix
from vaebench.training.trainer import EpochMetrics, TrainResult, resolve_device

EpochHook = Callable[[EpochMetrics], None]
# a member's ending: handed to the finisher (FINISHED once done), or what failed or stopped it
Outcome = Future[RunOutcome] | BaseException

STACK_SIZE_TAG = "vaebench.stack_size"
STACK_MEMBERS_TAG = "vaebench.stack_members"  # the members' run names, comma-separated
STACK_TIMING_TAG = "vaebench.stack_timing"
STACK_TIMING = (
    "epoch_seconds, eval_seconds and seconds are this run's share of its stack: the stack's "
    "seconds divided by the members it held then (stack_size until one leaves), plus the "
    "scoring the run does alone"
)
FINISHING = "trained: its scores, pictures and artifacts follow in the background"


@dataclass
class RunHooks:
    """What a caller adds to one run's life (``tune``: its trial). ``epoch_hook`` runs after each
    epoch is logged (raising one of ``RunContext.stopped_early`` stops the run on purpose, as a
    pruner does); ``on_end(error)`` as soon as the run's ending is recorded (None: handed to the
    finisher), while other members may still train."""

    tags: Mapping[str, str] = field(default_factory=dict)
    on_start: Callable[[str], None] | None = None
    epoch_hook: EpochHook | None = None
    extra_metrics: ExtraMetrics | None = None
    on_end: Callable[[BaseException | None], None] | None = None


@dataclass
class Member:
    """One run to execute and where it is recorded: ``claimed_id``, the RUNNING run a claim
    created for it, trained in instead of starting one; or ``continue_id``, a stopped (KILLED)
    run of the same key, continued with a checkpoint of this code (a member alone only), else
    left KILLED. ``continue_claim``: the claim run under which this process continues it,
    checked just before (:class:`ClaimLost` if it no longer stands)."""

    run: RunSpec
    hooks: RunHooks = field(default_factory=RunHooks)
    claimed_id: str | None = None
    continue_id: str | None = None
    continue_claim: str | None = None


@dataclass(frozen=True)
class RunContext:
    """What the invocation adds to every member: the first is run ``number`` of ``total``;
    ``epoch_hook`` sees each epoch of the whole once (its seconds the stack's)."""

    tags: Mapping[str, str]
    number: int
    total: int
    epoch_hook: EpochHook | None = None
    stopped_early: tuple[type[BaseException], ...] = ()
    pictures: bool = True


def execute(
    members: Sequence[Member], tracker: Tracker, workspace: Workspace, context: RunContext
) -> list[Outcome]:
    """Each member's :data:`Outcome` (one stack key; a member continued comes alone), or what
    stops them as a whole, raised once every member's run ended as the module's docstring says."""
    life = _Life(list(members), tracker, workspace, context)
    try:
        with phase("store", "runs started"):
            life.start()
        life.finish(life.train())
        life.status = life.status_line()
        return [life.ended[index] for index in range(len(life.members))]
    except TrackingError:
        life.status = "STOPPED (tracking store failed)"
        raise
    except ClaimLost as exc:  # nothing was written to the run: another process has it
        life.status = f"let go: {exc}"
        raise
    except (KeyboardInterrupt, DiskFull) as exc:  # KILLED: the rerun continues them
        life.kill(exc)
        raise
    except BaseException as exc:
        life.fail(exc)
        raise
    finally:
        KEEPER.let_go(*life.run_ids)
        TIMELINE.group = ""
        if life.progress is not None:
            life.progress.close(life.status)


class _Life:
    def __init__(
        self, members: list[Member], tracker: Tracker, workspace: Workspace, context: RunContext
    ):
        self.members, self.tracker, self.workspace = members, tracker, workspace
        self.context, self.count = context, len(members)
        self.device = resolve_device(members[0].run.config.train.device)
        # from here on, this object ends the claimed runs
        self.run_ids: list[str | None] = [member.claimed_id for member in members]
        self.ended: dict[int, Outcome] = {}
        self.jobs: dict[int, FinishJob] = {}  # the trained members' finishing
        self.saved: dict[int, int] = {}  # the last epoch each member's checkpoint holds
        self.resume: dict[str, Any] | None = None
        self.progress: RunProgress | None = None
        self.longest = 0.0  # the whole's longest epoch, for the leases
        self.shown = 0  # the last epoch shown
        self.status = "FAILED"

    def start(self) -> None:
        """Each member's run tracked (started, claimed or reopened) and its data logged."""
        first = self.members[0]
        self.workspace.load_splits(first.run)
        checkpoints = self.workspace.checkpoints
        if self.count == 1 and first.continue_id is not None and checkpoints is not None:
            state = checkpoints.load(first.continue_id)
            identity = checkpoint_identity(first.run)
            if state is not None and any(state.get(k) != v for k, v in identity.items()):
                checkpoints.remove(first.continue_id)  # other settings, code or device: start over
            elif state is not None:  # it continues exactly this run with this code
                self.resume, self.saved = state, {0: state["epoch"]}
        names = ", ".join(member.run.name for member in self.members)
        label = first.run.name if self.count == 1 else f"stack of {self.count} ({names})"
        TIMELINE.group = label
        self.progress = RunProgress(
            self.context.number, self.context.total, label, first.run.config.train.epochs,
            start=self.saved.get(0, 0),
        )
        with deferred_signals():  # a signal waits until the runs' ids are known and recorded
            for member in self.members:  # every claim checked before a run is opened
                check_continuation(self.tracker, member.continue_id, member.continue_claim)
            for index, member in enumerate(self.members):
                self.run_ids[index] = self._open(member)
                if member.hooks.on_start is not None:
                    member.hooks.on_start(self.run_ids[index])
        for member, run_id in zip(self.members, self.run_ids, strict=True):
            if self.resume is None:
                self.tracker.log_inputs(run_id, self.workspace.split_records_for(member.run))
                continue
            # continued: its data is logged; the epochs the store missed are logged now (no gap)
            logged = self.tracker.logged_steps(run_id, "train_loss")
            for metrics in (EpochMetrics(**record) for record in self.resume["history"]):
                if metrics.epoch not in logged:
                    self.tracker.log_metrics(run_id, metrics.as_dict(), step=metrics.epoch)

    def _open(self, member: Member) -> str:
        run_id = self._opened(member)
        KEEPER.hold(RunLease(self.tracker, run_id, runs_at_once=self.count))
        return run_id

    def _opened(self, member: Member) -> str:
        if self.resume is not None:
            self.tracker.reopen_run(member.continue_id, lease_tags())
            return member.continue_id
        lease = lease_tags(runs_at_once=self.count)  # until the first epoch is timed
        shared = {} if self.count == 1 else {
            STACK_SIZE_TAG: str(self.count),
            STACK_MEMBERS_TAG: ",".join(m.run.name for m in self.members),
            STACK_TIMING_TAG: STACK_TIMING,
        }
        if member.claimed_id is not None:
            if shared:
                self.tracker.set_tags(member.claimed_id, {**lease, **shared})
            return member.claimed_id
        run = member.run
        tags = {**self.context.tags, **member.hooks.tags, **run_tags(run), **lease, **shared}
        return self.tracker.start_run(run.name, run.params, tags)

    def train(self) -> list[TrainResult | BaseException]:
        keep = self.save_state if self.workspace.checkpoints is not None else None
        with contextlib.ExitStack() as monitors:
            for run_id in self.run_ids:
                monitors.enter_context(self.tracker.system_metrics(run_id))
            return fit_members(
                [member.run.config for member in self.members],
                self.workspace.load_splits(self.members[0].run),
                self.device, self.on_epoch, keep, self.end, self.resume,
            )

    def save_state(self, index: int, snapshot: dict[str, Any]) -> None:
        snapshot.update(checkpoint_identity(self.members[index].run))
        with deferred_signals(), phase("checkpoint"):  # known on disk before a signal acts
            if self.workspace.checkpoints.save(self.run_ids[index], snapshot):
                self.saved[index] = snapshot["epoch"]

    def on_epoch(self, index: int, metrics: EpochMetrics) -> None:
        """Member ``index``'s epoch logged with a renewed lease, shown once for the whole,
        and given to the hooks; a member's hook may stop that member (:class:`MemberStopped`)."""
        whole = stack_epoch(metrics, self.count)  # a member's times are its share
        self.longest = max(self.longest, whole.epoch_seconds + whole.eval_seconds)
        values = metrics.as_dict()
        lease = KEEPER.hold(RunLease(self.tracker, self.run_ids[index], self.longest))
        with phase("store", "epoch metrics"):
            self.tracker.log_metrics(self.run_ids[index], values, step=metrics.epoch, tags=lease)
        if metrics.epoch > self.shown:  # the whole's epoch, once: its first live member's
            self.shown = metrics.epoch
            self.progress.epoch(metrics.epoch, values)
            if self.context.epoch_hook is not None:
                self.context.epoch_hook(whole)
        member_hook = self.members[index].hooks.epoch_hook
        if member_hook is None:
            return
        try:
            member_hook(metrics)
        except self.context.stopped_early as exc:  # this member only, on purpose: KILLED
            self.end(index, exc, "KILLED")
            raise MemberStopped(exc) from exc

    def end(self, index: int, outcome: Outcome, status: str = "FAILED") -> None:
        """Member ``index``'s run ends now (its error known, FAILED: the others go on; its
        caller hears of it at once), or, trained, has been handed to the finisher (``outcome``,
        FINISHED once it is done)."""
        with deferred_signals():
            if not isinstance(outcome, Future):
                checkpoints = self.workspace.checkpoints
                end_for_good(self.tracker, checkpoints, self.run_ids[index], outcome, status)
            self.ended[index] = outcome
            on_end = self.members[index].hooks.on_end
            if on_end is not None:
                on_end(None if isinstance(outcome, Future) else outcome)

    def finish(self, results: Sequence[TrainResult | BaseException]) -> None:
        """Each trained member handed to the finisher; one whose scores fail ends FAILED alone.
        The members' device scores come first, so that the finisher can start their
        clustering (:meth:`InlineFinisher.prepare`) before it finishes the first."""
        scored = []
        for index, result in enumerate(results):
            if index in self.ended:  # diverged or stopped: ended already
                continue
            member = self.members[index]
            try:
                with phase("scoring", "device scores and picture arrays"):
                    self.jobs[index] = finish_job(
                        member.run, self.run_ids[index], result, self.workspace,
                        self.context.pictures,
                    )
            except (TrackingError, KeyboardInterrupt):
                raise
            except Exception as exc:
                self.end(index, exc)
                continue
            scored.append(index)
        self.workspace.finisher.prepare([self.jobs[index] for index in scored])
        for index in scored:
            self.hand_over(index)

    def hand_over(self, index: int) -> None:
        member = self.members[index]
        try:
            with self.workspace.finisher.handing_over():
                finishing = self.workspace.finisher.finish(
                    self.jobs[index], self.tracker, member.hooks.extra_metrics
                )
                self.end(index, finishing)
        except TrackingError:
            raise
        except KeyboardInterrupt:
            outcome = self.jobs[index].outcome
            if outcome is not None and index not in self.ended:  # FINISHED just before
                self.end(index, finished(outcome))
            raise
        except Exception as exc:
            self.end(index, exc)
            return
        if not finishing.done():
            own = f"{line_prefix()}{member.run.name}"  # a member's own line
            label = self.progress.label if self.count == 1 else own
            finishing.add_done_callback(partial(say_finished, label))

    def _unended(self, index: int) -> bool:
        job = self.jobs.get(index)
        return index not in self.ended and (job is None or job.outcome is None)

    def kill(self, signal: BaseException) -> None:
        """A signal or a full disk: every member not ended yet KILLED, its checkpoint kept."""
        for index, run_id in enumerate(self.run_ids):
            if self._unended(index):
                epoch = self.saved.get(index, 0)
                where = f"; its checkpoint after epoch {epoch} continues it" if epoch else ""
                end_quietly(self.tracker, run_id, "KILLED", f"{first_line(signal)}{where}")
        self.status = self.status_line() if len(self.ended) == self.count else "KILLED"

    def fail(self, error: BaseException) -> None:
        """An error of the whole: every member not ended yet FAILED with it."""
        for index, run_id in enumerate(self.run_ids):
            if self._unended(index):
                end_for_good(self.tracker, self.workspace.checkpoints, run_id, error)

    def status_line(self) -> str:
        """How the members ended, for the progress line (a member alone: its status)."""
        outcomes = list(self.ended.values())
        stopped = sum(isinstance(o, self.context.stopped_early) for o in outcomes)
        finishing = sum(isinstance(o, Future) and not o.done() for o in outcomes)
        done = sum(isinstance(o, Future) and o.done() and not o.exception() for o in outcomes)
        if self.count == 1:
            if stopped or not isinstance(outcomes[0], Future):
                return "KILLED" if stopped else "FAILED"
            return FINISHING if finishing else "FINISHED"
        parts = [f"{done} of {self.count} FINISHED"] if done or not finishing else []
        if finishing:
            parts.append(f"{finishing} of {self.count} {FINISHING}")
        if stopped:
            parts.append(f"{stopped} stopped")
        return ", ".join(parts)


def stack_epoch(metrics: EpochMetrics, members: int) -> EpochMetrics:
    """A member's epoch as the stack's: its seconds (a share of the stack's) times the
    ``members`` the stack started with, at most the stack's own."""
    epoch, evaluation = metrics.epoch_seconds * members, metrics.eval_seconds * members
    return replace(metrics, epoch_seconds=epoch, eval_seconds=evaluation)


def finish_job(
    run: RunSpec, run_id: str, result: TrainResult, workspace: Workspace, pictures: bool = True
) -> FinishJob:
    """What finishing a trained run needs of its model, taken now on its device."""
    model = result.model
    classifier = partial(workspace.classifiers.get, run.config.data.dataset, model.device)
    parameters = float(sum(p.numel() for p in model.parameters()))
    summary = {**result.summary, **model.extra_scores(classifier), "parameters": parameters}
    return FinishJob(
        run=run, run_id=run_id, summary=summary, last=result.final.as_dict(),
        seconds=result.seconds, clusters=result.clusters, weights=weights_bytes(model),
        pictures=picture_arrays(model, workspace.load_splits(run)) if pictures else None,
        checkpoints=workspace.checkpoints, kl_per_dimension=result.kl_per_dimension,
    )


def say_finished(label: str, finishing: Future[RunOutcome]) -> None:
    error = finishing.exception()
    status = "FINISHED" if error is None else f"FAILED after training: {first_line(error)}"
    if isinstance(error, TrackingError):  # the run keeps its lease: a rerun finishes it
        status = f"STOPPED (tracking store failed: {first_line(error)})"
    print(f"{label} {status}", file=sys.stderr, flush=True)


def record_invalid(
    tracker: Tracker, name: str, params: Mapping[str, Any], tags: Mapping[str, str], error: str
) -> str:
    """A run whose settings make no valid config: recorded FAILED with the reason, untrained."""
    run_id = tracker.start_run(name, params, tags)
    tracker.end_run(run_id, "FAILED", error)
    return run_id


def checkpoint_identity(run: RunSpec) -> dict[str, str]:
    """What a checkpoint of ``run`` continues only with: its settings, this code, its device."""
    device = str(resolve_device(run.config.train.device))
    return {"run_key": run.key, "code": code_version(), "device": device}

