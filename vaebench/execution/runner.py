"""A grid invocation: check it, plan it against the store, run what is left, write results.
How running a grid again continues it, and how signals and a failing store stop it:
docs/resume.md."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vaebench.data import resolve_root
from vaebench.execution.dry_run import cpu_rule
from vaebench.execution.grid_work import (
    GRID_TAG,
    GridWork,
    WorkRecord,
    failure_of,
    latest_by_key,
    not_run,
    skipped,
    stored_row,
    work_through,
)
from vaebench.execution.invocation import GridInvocation
from vaebench.execution.ray_executor import import_ray, run_on_ray
from vaebench.execution.results import GridOutcome, close_results, take_work
from vaebench.execution.worker_plan import (
    AUTO,
    POST_RUN_CHOICES,
    Execution,
    WorkerSlot,
    cores,
    plan_workers,
    visible_gpus,
)
from vaebench.execution.worker_processes import GridJob, run_workers
from vaebench.lifecycle.claims import (
    CLAIM_TAG,
    KEEPER,
    Planned,
    RunLease,
    lease_tags,
    plan,
    recover_abandoned,
)
from vaebench.lifecycle.exactly_once import settle_seconds
from vaebench.lifecycle.post_run import BackgroundFinisher, InlineFinisher, end_quietly
from vaebench.lifecycle.preflight import check_output_folder
from vaebench.lifecycle.provenance import base_tags
from vaebench.lifecycle.workspace import Workspace
from vaebench.reporting.best_models import register_best
from vaebench.signals import Interrupted, deferred_signals, interruptible
from vaebench.spec.config import DiskFull, VaebenchError
from vaebench.spec.grid import SELECT_TAG, RunSpec, expand, load_grid
from vaebench.stacking.plan import plan_stacks
from vaebench.timeline import phase
from vaebench.tracking.searches import PARENT_TAG
from vaebench.tracking.store import resolve_tracking_uri, sqlite_path
from vaebench.tracking.tracker import RunRecord, Tracker, TrackingError, tracker_opened_during
from vaebench.training.checkpoint import CheckpointStore, default_folder
from vaebench.training.trainer import EpochMetrics, resolve_device

T = TypeVar("T")


def run_grid(
    grid_path: str | Path, invocation: GridInvocation | None = None, tracker: Tracker | None = None
) -> GridOutcome:
    """Check, expand and train a grid file as ``invocation`` says; ``tracker``: an open one
    (else the store is opened while the data loads)."""
    invocation = invocation or GridInvocation()
    try:
        grid_run = _GridRun.open(Path(grid_path), invocation, tracker)
        if not grid_run.todo:
            grid_run.nothing_to_train()
            return grid_run.outcome
        grid_run.train()
        grid_run.report_and_register()
    finally:
        if invocation.finishing_helper is not None:
            invocation.finishing_helper.close()
    return grid_run.outcome


@dataclass
class _GridRun:
    path: Path
    name: str
    runs: list[RunSpec]
    invocation: GridInvocation
    uri: str
    slots: list[WorkerSlot]
    workspace: Workspace
    tracker: Tracker
    background: bool  # a background process finishes the runs trained here
    select: str  # the grid file's: what its report ranks on and its registered models are
    planned: list[Planned] = field(default_factory=list)
    outcome: GridOutcome = field(default_factory=GridOutcome)
    parent: str | None = None

    @classmethod
    def open(cls, path: Path, invocation: GridInvocation, tracker: Tracker | None) -> _GridRun:
        """Every error a user can cause is raised before anything is tracked."""
        with phase("preflight"):
            grid = load_grid(path)
            runs = expand(grid)
            slots = _worker_slots(invocation.execution, runs)
            background = background_finishing(invocation.execution.post_run, runs)
            check_output_folder(Path(invocation.results_dir))
            uri = resolve_tracking_uri(invocation.tracking_uri)
            folder = invocation.checkpoint_dir
            checkpoints = Path(folder) if folder else default_folder(sqlite_path(uri))
            check_output_folder(checkpoints, "--checkpoint-dir")
            workspace = Workspace(resolve_root(invocation.data_root), CheckpointStore(checkpoints))
            if tracker is None:
                workspace.check(runs)
        with phase("data and store"):
            if tracker is None:
                tracker = tracker_opened_during(uri, lambda: workspace.prepare(runs))
            else:
                workspace.prepare(runs)
        made = cls(path, grid.name, runs, invocation, uri, slots, workspace, tracker, background,
                   grid.select)
        with phase("store", "plan against the store"):
            made.plan()
        return made

    def plan(self) -> None:
        """Plan each run against the store, skipped runs' rows into the outcome; drop
        checkpoints nothing will continue."""
        rerun = self.invocation.rerun
        previous = recover_abandoned(self.tracker, self.counted_runs(rerun), sys.stderr)
        planned = self.planned = plan(self.runs, previous, rerun)
        record = WorkRecord()
        for number, step in enumerate(planned, start=1):
            if step.action in ("skip", "elsewhere"):
                skipped(number, len(planned), step, record)
        take_work(self.outcome, record)
        continued = {step.previous.run_id for step in planned if step.action == "continue"}
        # a live claim (recover_abandoned left only those RUNNING) names the run it continues
        claimed = [r for r in previous if r.status == "RUNNING" and CLAIM_TAG in r.tags]
        continued |= {r.tags[CLAIM_TAG] for r in claimed}
        keys = {run.key for run in self.runs}
        for stored in previous:
            if stored.status == "KILLED" and stored.key in keys and stored.run_id not in continued:
                self.workspace.checkpoints.remove(stored.run_id)  # superseded: finished or rerun

    def counted_runs(self, rerun: bool) -> list[RunRecord]:
        """The grid's stored runs that its plan counts, oldest first: the unfinished ones
        (abandoned to recover, stopped to continue, or their checkpoints to drop) and, unless
        it is a rerun (which counts none), each run's latest FINISHED one. Not the whole
        history a grid rerun many times leaves."""
        stored = self.tracker.previous_runs(self.name, GRID_TAG, self.name, unfinished_only=True)
        if not rerun:
            keys = [run.key for run in self.runs]
            stored += self.tracker.latest_finished(self.name, GRID_TAG, self.name, keys)
        return sorted(stored, key=lambda record: record.order)

    @property
    def todo(self) -> list[tuple[int, Planned]]:
        steps = enumerate(self.planned, start=1)
        return [(n, step) for n, step in steps if step.action in ("train", "continue")]

    def nothing_to_train(self) -> None:
        running = sum(step.action == "elsewhere" for step in self.planned)
        print(f"grid {self.name}: nothing to train: {self.outcome.skipped} of {len(self.runs)} "
              "runs finished" + (f", {running} running in another process" if running else "")
              + " (--rerun trains them again)")
        self.close()

    def close(self) -> None:
        KEEPER.let_go(self.parent)
        with phase("results table"):
            close_results(self.outcome, Path(self.invocation.results_dir), self.name, self.runs)

    def work(self) -> GridWork:
        """A continued run trains alone."""
        todo = self.todo
        alone = [None if step.action == "continue" else step.run.config for _, step in todo]
        rule = cpu_rule(self.invocation.stack_everywhere)
        stacks = plan_stacks(alone, self.invocation.max_stack, rule)
        groups = [[todo[i][0] - 1 for i in group] for group in stacks]
        tags = base_tags(**{GRID_TAG: self.name, "vaebench.grid_file": str(self.path)})
        return GridWork(self.name, groups, tags, self.invocation.rerun, int(time.time() * 1000),
                        settle_seconds(self.uri))

    def train(self) -> None:
        ended = stopped = False
        with interruptible():
            try:
                work = self.work()
                with phase("store", "parent run"):
                    self.start_parent(work.tags)
                execution = self.invocation.execution
                here = execution.executor == "local" and len(self.slots) == 1
                if here and self.slots[0].gpu is None:  # one local worker, no GPU to pin
                    self.work_here(work)
                else:
                    self.work_elsewhere(work)
                with deferred_signals():
                    failed = self.outcome.failed or self.outcome.worker_errors
                    self.tracker.end_run(self.parent, "FAILED" if failed else "FINISHED")
                    ended = True
            except (Interrupted, DiskFull) as exc:
                stopped = True
                if not ended:
                    end_quietly(self.tracker, self.parent, "KILLED",
                                f"{exc}; rerun the same command to continue")
                raise
            except TrackingError as exc:
                stopped = True
                raise TrackingError(f"{exc}; the grid stopped. Rerun the same command once the "
                                    "store answers: finished runs are skipped, stopped ones "
                                    "continue from their checkpoint") from None
            finally:
                try:
                    self.close()
                except DiskFull:  # the results table: the error that stopped the grid is shown
                    if not stopped:
                        raise

    def start_parent(self, tags: dict[str, str]) -> None:
        executor = self.invocation.execution.executor
        started = time.strftime("%Y%m%d-%H%M%S")
        with deferred_signals():  # a signal waits until the parent run is recorded
            self.parent = self.tracker.start_grid(self.name, f"{self.name}-{started}", {
                **tags, "vaebench.runs": str(len(self.runs)), "vaebench.executor": executor,
                SELECT_TAG: self.select,
                "vaebench.workers": str(len(self.slots)) if self.slots else "ray tasks",
                **lease_tags(),
            })
        KEEPER.hold(RunLease(self.tracker, self.parent))

    def renew_parent_lease(self, metrics: EpochMetrics | None = None) -> None:
        seconds = metrics.epoch_seconds + metrics.eval_seconds if metrics else 0.0
        lease = KEEPER.hold(RunLease(self.tracker, self.parent, seconds))
        self.tracker.set_tags(self.parent, lease)

    def stored(self, work: GridWork) -> WorkRecord:
        """The rows of the runs this invocation trained as the store holds them now (each
        key's run under the invocation's parent, else its latest), after marking runs that a
        dead worker left RUNNING as KILLED. A rerun reads only the runs under its parent,
        the only ones it reports."""
        tag, value = (PARENT_TAG, self.parent) if work.rerun else (GRID_TAG, self.name)
        stored_runs = self.tracker.previous_runs(self.name, tag, value)
        records = recover_abandoned(self.tracker, stored_runs, sys.stderr)
        latest = latest_by_key(records, self.parent, only_under_parent=work.rerun)
        record = WorkRecord()
        for _, step in self.todo:
            stored = latest.get(step.run.key)
            record.rows.append(stored_row(step.run, stored) if stored else not_run(step.run))
            if stored is not None and stored.status == "FAILED":
                record.failed.append((step.run.name, failure_of(stored)))
        return record

    def work_here(self, work: GridWork) -> None:
        """After a signal the results are the store's, once the runs handed to a background
        finisher have ended."""
        record = WorkRecord()
        workspace = self.workspace
        if self.background:
            workspace.finisher = BackgroundFinisher(self.tracker.uri)
        else:
            workspace.finisher = InlineFinisher(self.invocation.finishing_helper)
        try:
            work_through(work, self.runs, self.planned, self.tracker, workspace, record,
                         self.renew_parent_lease)
        except Interrupted:
            workspace.finisher.close()
            with contextlib.suppress(TrackingError):
                skipped = record.skipped
                record = self.stored(work)
                record.skipped = skipped
            raise
        finally:
            workspace.finisher.close()
            take_work(self.outcome, record)

    def work_elsewhere(self, work: GridWork) -> None:
        execution = self.invocation.execution
        job = GridJob(str(self.path), work, self.uri, self.tracker.experiment_id, self.parent,
                      self.workspace.data_root, self.workspace.checkpoints.folder, self.background)
        renew, count = self.renew_parent_lease, len(self.todo)
        try:
            on_ray = execution.executor == "ray"
            self.outcome.worker_errors = (run_on_ray(job, execution, count, renew) if on_ray
                                          else run_workers(job, self.slots, count, renew))
        finally:
            take_work(self.outcome, self.stored(work))

    def report_and_register(self) -> None:
        """The report, its figures drawn by the helper process (where there is one) while
        this process registers the best models."""
        todo = self.todo
        resumed = len(todo) < len(self.planned) or any(s.action == "continue" for _, s in todo)
        uri, started, chosen = self.tracker.uri, None, None if resumed else self.parent
        # matplotlib and pandas' styling: imported when needed
        from vaebench.reporting.figures import Drawings
        from vaebench.reporting.report import best_of_invocation, start_report

        helper = self.invocation.finishing_helper
        figures = Drawings(helper.draw) if helper is not None else Drawings()
        if self.invocation.report:  # of every invocation, when this one continued a grid
            with phase("report"):
                started = _or_line("no report", None, lambda: start_report(
                    self.name, uri, self.invocation.results_dir, metric=self.select,
                    parent_id=chosen, all_invocations=resumed, figures=figures))
        if self.invocation.register:  # an error here (the store, a signal) ends the report
            with phase("registration"):
                best = started.report.best_runs if started else _or_line(
                    "nothing registered", [],
                    lambda: best_of_invocation(uri, self.name, chosen, self.select),
                )
                self.outcome.registered = register_best(
                    self.tracker, self.name, best, self.workspace.test_images, self.parent
                )
        if started is not None:
            with phase("report", "its figures, files and artifacts"):
                made = _or_line("no report", None, started.finish)
            self.outcome.report_folder = made.folder if made else None


def background_finishing(post_run: str, runs: Sequence[RunSpec]) -> bool:
    """Whether a background process finishes the trained runs; ``auto``: where some run trains
    on CUDA (the GPU would wait for the host's scoring and drawing otherwise; on the CPU the
    background process would take the cores the next run trains on)."""
    if post_run not in POST_RUN_CHOICES:
        raise VaebenchError(f"--post-run: one of {', '.join(POST_RUN_CHOICES)}, not {post_run!r}")
    return _on_cuda(runs) if post_run == AUTO else post_run == "background"


def _on_cuda(runs: Sequence[RunSpec]) -> bool:
    return any(resolve_device(run.config.train.device).type == "cuda" for run in runs)


def _worker_slots(execution: Execution, runs: Sequence[RunSpec]) -> list[WorkerSlot]:
    if execution.executor == "ray":
        import_ray()  # a missing extra is a one-line error before anything is tracked
        return []
    gpus: list[str] = []
    if _on_cuda(runs):
        import torch

        gpus = visible_gpus(torch.cuda.device_count())
    return plan_workers(execution.workers, execution.per_gpu, gpus, cores())


def _or_line(what: str, default: T, make: Callable[[], T]) -> T:
    """What ``make`` returns, or ``default`` and one line on stderr: the runs are tracked by
    now, so a report that cannot be made (every run failed, no validation split, the store
    failing) does not turn a grid into a crash; ``vaebench report`` can run again later."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        kind = "" if isinstance(exc, VaebenchError) else f"{type(exc).__name__}: "
        print(f"vaebench: {what}: {kind}{exc}", file=sys.stderr)
        return default
