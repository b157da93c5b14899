"""The loop every executor runs over a grid's stacks: claim each run, train it, keep its row.
Why each run trains exactly once however many processes work on a grid: docs/scaling.md."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vaebench.lifecycle.claims import CLAIM_TAG, OWNER_TAG, Planned, plan, recover_abandoned
from vaebench.lifecycle.exactly_once import ClaimLost, claim_run, counted_since
from vaebench.lifecycle.execute import (
    EpochHook,
    Member,
    Outcome,
    RunContext,
    RunHooks,
    execute,
)
from vaebench.lifecycle.post_run import RunOutcome, end_quietly, error_text
from vaebench.lifecycle.provenance import run_tags
from vaebench.lifecycle.workspace import Workspace
from vaebench.spec.config import DiskFull
from vaebench.spec.grid import RunSpec
from vaebench.timeline import phase
from vaebench.tracking.searches import PARENT_TAG
from vaebench.tracking.tracker import ERROR_TAG, RUN_KEY_TAG, RunRecord, Tracker, TrackingError
from vaebench.training.progress import line_prefix

GRID_TAG = "vaebench.grid"  # on every run of a grid: its name
# (run name, status) of each run this process trained, as it ends
RunEnded = Callable[[str, str], None]


@dataclass(frozen=True)
class Claimed:
    """A planned step this process holds: ``claim_id`` is the run to train in (a new run),
    or the claim run to delete once the stopped run is reopened (a continued run), which
    takes over the claim's ``stamp``."""

    number: int
    step: Planned
    claim_id: str
    stamp: dict[str, str]


@dataclass
class WorkRecord:
    """What one process did: rows of the results (in the order they ended) and failures."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run name, error line)
    skipped: int = 0  # FINISHED already when this process came to them
    # trained runs a background process is finishing (:mod:`vaebench.lifecycle.post_run`):
    # their rows join ``rows`` once they are done
    finishing: list[tuple[RunSpec, Future[RunOutcome]]] = field(default_factory=list)
    ended: RunEnded = lambda name, status: None  # hears of each run this process trained

    def take(self, run: RunSpec, done: Future[RunOutcome] | Exception) -> None:
        """Its row now, or once a background process finished it (:meth:`settle`)."""
        if isinstance(done, Future) and not done.done():
            self.finishing.append((run, done))
            return
        outcome = _outcome(done)
        row = row_of(run, outcome)
        if isinstance(outcome, Exception):
            self.failed.append((run.name, error_line(outcome)))
        self.rows.append(row)
        self.ended(row["name"], row["status"])

    def settle(self, wait: bool) -> None:
        """The rows of the runs finished in the background by now (with ``wait``: of all of
        them, once they are); raises the store's failure if one of them met it."""
        waiting, store_failed = [], None
        for run, finishing in self.finishing:
            if not wait and not finishing.done():
                waiting.append((run, finishing))
            elif isinstance(finishing.exception(), TrackingError):
                store_failed = store_failed or finishing.exception()
            else:  # the others' rows first: the store's failure is raised at the end
                self.take(run, finishing)
        self.finishing = waiting
        if store_failed is not None:
            raise store_failed


def _outcome(done: Future[RunOutcome] | Exception) -> RunOutcome | Exception:
    if isinstance(done, Exception):
        return done
    error = done.exception()
    if error is not None and (not isinstance(error, Exception) or isinstance(error, TrackingError)):
        raise error  # not a run's own failure: a signal, the store failing
    return error or done.result()


@dataclass(frozen=True)
class GridWork:
    """What a process needs to work on a grid (plain data: it crosses a spawn)."""

    experiment: str  # the grid's name, its MLflow experiment
    groups: list[list[int]]  # indices into the grid's runs, each a stack (or a run alone)
    tags: dict[str, str]  # the invocation's tags, on every run
    rerun: bool
    since_ms: int  # the invocation's start: with rerun, runs FINISHED earlier do not count
    settle: float  # claims' settle time (claims.settle_seconds)


def work_through(
    work: GridWork, runs: Sequence[RunSpec], planned: Sequence[Planned], tracker: Tracker,
    workspace: Workspace, record: WorkRecord, epoch_hook: EpochHook | None = None,
    start_group: int = 0,
) -> None:
    """Each group of ``work`` from ``start_group`` on, wrapping around; a failing run does not
    stop the work, a failing store or a signal does."""
    process = _Process(work, tracker, workspace, record, len(runs))
    order = work.groups[start_group:] + work.groups[:start_group]
    for group in order:
        held = process.held = []  # claims of this group not yet handed over for training
        try:
            record.settle(wait=False)
            with phase("store", "claims"):
                for index in group:
                    process.claim_or_skip(index + 1, planned[index])
            fresh = [c for c in held if c.step.action == "train"]
            together = [fresh] if len(fresh) > 1 else []  # a continued run trains alone
            while together or held:
                claims = together.pop() if together else [held[0]]
                context = RunContext(work.tags, claims[0].number, len(runs), epoch_hook)
                for run, done in process.train(claims, context):
                    record.take(run, done)
        except BaseException as exc:  # a signal or the store: release what is not started
            for claimed in held:
                _release(claimed, tracker, exc)
            # the runs finishing in the background end FINISHED (their training is over);
            # the error that stops the work is the one raised
            with contextlib.suppress(TrackingError):
                record.settle(wait=True)
            raise
    record.settle(wait=True)


CLAIM_ATTEMPTS = 3  # a claim lost to one that then vanished (its process stopped) is retried


@dataclass
class _Process:
    work: GridWork
    tracker: Tracker
    workspace: Workspace
    record: WorkRecord
    total: int
    held: list[Claimed] = field(default_factory=list)

    def claim_or_skip(self, number: int, step: Planned) -> None:
        work, tracker = self.work, self.tracker
        for _ in range(CLAIM_ATTEMPTS):
            step = self.as_stored_now(step)
            if step.action not in ("train", "continue"):
                skipped(number, self.total, step, self.record)
                return
            continues = step.previous.run_id if step.action == "continue" else None
            pending: list[str] = []
            try:
                claim = claim_run(
                    tracker, work.experiment, step.run, {**work.tags, **run_tags(step.run)},
                    work.settle, work.since_ms, work.rerun, continues, on_created=pending.append,
                )
                if claim is not None:
                    self.held.append(Claimed(number, step, claim.run_id, claim.stamp))
                    return
            except BaseException as exc:
                if not any(c.claim_id in pending for c in self.held):  # created, never handed on
                    for claim_id in pending:
                        _release(Claimed(number, step, claim_id, {}), tracker, exc)
                raise
        print(f"{line_prefix()}[{number}/{self.total}] {step.run.name} not run: its claim was "
              f"lost {CLAIM_ATTEMPTS} times; rerun the grid to train it", file=sys.stderr,
              flush=True)
        self.record.rows.append(not_run(step.run))

    def as_stored_now(self, step: Planned) -> Planned:
        """The step planned again from the store just before its run trains: another process
        working on the same grid may have finished, failed or taken the run."""
        work = self.work
        records = self.tracker.previous_runs(
            work.experiment, RUN_KEY_TAG, step.run.key,
            begun_since_ms=counted_since(work.since_ms, work.rerun),
        )
        records = recover_abandoned(self.tracker, records, sys.stderr)  # a worker that died
        return plan([step.run], records, work.rerun, work.since_ms)[0]

    def train(
        self, claims: Sequence[Claimed], context: RunContext
    ) -> list[tuple[RunSpec, Outcome]]:
        """A new run's claim leaves ``held`` at once (``execute`` ends every run it is given);
        a continuation's once the run it continues (or a new run, without a checkpoint) is
        RUNNING under this process's lease and stamp (:meth:`take_over`)."""
        held, tracker = self.held, self.tracker
        members = []
        for claimed in claims:
            if claimed.step.action == "continue":
                previous = claimed.step.previous.run_id
                hooks = RunHooks(on_start=partial(self.take_over, claimed))
                members.append(Member(claimed.step.run, hooks, continue_id=previous,
                                      continue_claim=claimed.claim_id))
            else:
                held.remove(claimed)
                members.append(Member(claimed.step.run, claimed_id=claimed.claim_id))
        try:
            done: list[Outcome] = execute(members, tracker, self.workspace, context)
        except ClaimLost:  # another process continues the run: this one lets go of its claim
            for claimed in [c for c in claims if c in held]:
                held.remove(claimed)
                with contextlib.suppress(TrackingError):
                    tracker.delete_run(claimed.claim_id)
            return []
        except Exception as exc:
            if isinstance(exc, TrackingError | DiskFull):
                raise
            for claimed in claims:
                if claimed in held:  # failed before the run it continues was reopened: the
                    held.remove(claimed)  # claim ends FAILED, so no other worker retries it
                    end_quietly(tracker, claimed.claim_id, "FAILED", error_text(exc))
            done = [exc] * len(claims)
        return [(member.run, outcome) for member, outcome in zip(members, done, strict=True)]

    def take_over(self, claimed: Claimed, run_id: str) -> None:
        self.tracker.set_tags(run_id, claimed.stamp)
        self.tracker.delete_run(claimed.claim_id)
        self.held.remove(claimed)


def _release(claimed: Claimed, tracker: Tracker, exc: BaseException) -> None:
    """A claim held but not yet trained when the work stopped: a new run ends KILLED (its
    rerun trains it), a continuation's claim run is deleted (the stopped run stays KILLED)."""
    with contextlib.suppress(TrackingError):  # its lease lets the next invocation recover it
        if claimed.step.action == "continue":
            tracker.delete_run(claimed.claim_id)
        else:
            end_quietly(tracker, claimed.claim_id, "KILLED", f"stopped before it trained ({exc})")


def not_run(run: RunSpec) -> dict[str, Any]:
    return {"name": run.name, "key": run.key, "status": "NOT RUN"}


def row_of(run: RunSpec, done: RunOutcome | Exception) -> dict[str, Any]:
    if isinstance(done, Exception):
        return {"name": run.name, "key": run.key, "status": "FAILED", **run.params}
    row = {"name": run.name, "key": run.key, "status": "FINISHED", "run_id": done.run_id}
    return {**row, **run.params, **done.final}


def error_line(error: Exception) -> str:
    line = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {line}"


def stored_row(run: RunSpec, stored: RunRecord) -> dict[str, Any]:
    row = {"name": run.name, "key": run.key, "status": stored.status, "run_id": stored.run_id}
    return {**row, **run.params, **stored.metrics}


def skipped(number: int, total: int, step: Planned, record: WorkRecord) -> None:
    run_id = step.previous.run_id
    if step.action == "skip":
        why = f"FINISHED already in run {run_id}"
    elif step.action == "failed":
        why = f"FAILED in run {run_id} during this invocation"
    else:
        holder = step.previous.tags.get(OWNER_TAG, "?")
        what = "claimed" if CLAIM_TAG in step.previous.tags else "RUNNING"
        why = f"{what} in run {run_id}, held by {holder}"
    line = f"{line_prefix()}[{number}/{total}] {step.run.name} skipped: {why}"
    print(line, file=sys.stderr, flush=True)
    record.rows.append(stored_row(step.run, step.previous))
    record.skipped += step.action == "skip"


def failure_of(stored: RunRecord) -> str:
    text = stored.tags.get(ERROR_TAG, "")
    return text.strip().splitlines()[-1] if text.strip() else "FAILED"


def latest_by_key(
    records: Sequence[RunRecord], parent_id: str, only_under_parent: bool
) -> Mapping[str, RunRecord]:
    """Each key's run to report (records oldest first, claims left out unless FAILED): the latest
    under the invocation's parent run ``parent_id`` if there is one, else (unless
    ``only_under_parent``, as for a rerun) the latest of the key."""
    latest: dict[str, RunRecord] = {}
    mine: dict[str, RunRecord] = {}
    for stored in records:
        if stored.key is None or (CLAIM_TAG in stored.tags and stored.status != "FAILED"):
            continue  # a FAILED claim: the continuation that could not start
        latest[stored.key] = stored
        if stored.tags.get(PARENT_TAG) == parent_id:
            mine[stored.key] = stored
    return mine if only_under_parent else {**latest, **mine}
