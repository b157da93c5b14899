"""A grid invocation: check it, plan it against the store, run what is left, write results.

Every run goes through :func:`vaebench.lifecycle.execute.execute`. Running a grid again
continues it: runs whose key FINISHED in the experiment are skipped (``rerun``
trains them again as new samples), runs a killed invocation left RUNNING are
marked KILLED (see :mod:`vaebench.lifecycle.claims`), and KILLED runs continue from their
checkpoint in their own MLflow run. Ctrl-C and SIGTERM stop the grid cleanly;
a store that fails stops it with one line saying how to continue.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from vaebench.data import resolve_root
from vaebench.execution.dry_run import cpu_rule
from vaebench.execution.grid_work import GridWork, WorkRecord, print_skip, stored_row, work_through
from vaebench.execution.ray_executor import import_ray, run_on_ray
from vaebench.execution.worker_plan import (
    AUTO,
    POST_RUN_CHOICES,
    Execution,
    WorkerSlot,
    cores,
    plan_workers,
    visible_gpus,
)
from vaebench.execution.worker_processes import GridJob, rows_from_store, run_workers
from vaebench.lifecycle.claims import Planned, lease_tags, plan, recover_abandoned
from vaebench.lifecycle.exactly_once import settle_seconds
from vaebench.lifecycle.execute import Workspace, end_quietly
from vaebench.lifecycle.post_run import BackgroundFinisher
from vaebench.lifecycle.preflight import check_output_folder
from vaebench.lifecycle.provenance import base_tags
from vaebench.reporting.best_models import BestRun, Registered, register_best
from vaebench.signals import Interrupted, deferred_signals, interruptible
from vaebench.spec.config import VaebenchError
from vaebench.spec.grid import RunSpec, expand, load_grid
from vaebench.stacking.plan import plan_stacks
from vaebench.tracking.store import resolve_tracking_uri, sqlite_path
from vaebench.tracking.tracker import (
    MLflowTracker,
    Tracker,
    TrackingError,
    tracker_opened_during,
)
from vaebench.training.checkpoint import CheckpointStore, default_folder
from vaebench.training.trainer import EpochMetrics, resolve_device

if TYPE_CHECKING:
    from vaebench.reporting.report import Report

SUMMARY_COLUMNS = [
    "name",
    "status",
    "val_elbo",
    "test_elbo",
    "test_nll",
    "test_kl",
    "val_nmi",
    "test_nmi",
    "mean_epoch_seconds",
    "seconds",
]
GRID_TAG = "vaebench.grid"


@dataclass
class GridOutcome:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run name, error line)
    skipped: int = 0  # FINISHED before this invocation
    worker_errors: list[str] = field(default_factory=list)  # a line per worker that died
    csv_path: Path | None = None
    report_folder: Path | None = None
    registered: list[Registered] = field(default_factory=list)  # the best runs' models


def run_grid(
    grid_path: str | Path,
    tracking_uri: str | None = None,
    data_root: str | Path | None = None,
    results_dir: str | Path = "results",
    tracker: Tracker | None = None,
    report: bool = True,
    rerun: bool = False,
    checkpoint_dir: str | Path | None = None,
    max_stack: int = 1,
    execution: Execution | None = None,
    register: bool = True,
    stack_everywhere: bool = False,
) -> GridOutcome:
    """Check, expand and train a grid file; record it and return what happened.

    Runs that can share a stack (:mod:`vaebench.stacking.fit`) train together, at most
    ``max_stack`` at a time (1, the default: every run alone), with ``stack_everywhere``
    also those that stack on CUDA only (:func:`vaebench.stacking.plan.cpu_problem`) on the
    CPU. ``execution`` says who
    trains them: this process, local worker processes (:mod:`vaebench.execution.worker_processes`)
    or
    Ray tasks (:mod:`vaebench.execution.ray_executor`), each run claimed by one of them
    (:mod:`vaebench.lifecycle.exactly_once`). With ``report`` (and an
    MLflow tracker) the invocation's report follows: ``results/<grid>/`` and artifacts of
    the parent run, and with ``register`` each comparison group's best run becomes a new
    version of a registered MLflow model (:mod:`vaebench.reporting.best_models`).
    """
    grid_path = Path(grid_path)
    grid = load_grid(grid_path)
    runs = expand(grid)
    execution = execution or Execution()
    slots = _worker_slots(execution, runs)
    background = background_finishing(execution.post_run, runs)
    results = Path(results_dir)
    check_output_folder(results)
    uri = resolve_tracking_uri(tracking_uri)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else default_folder(sqlite_path(uri))
    check_output_folder(checkpoints, "--checkpoint-dir")
    workspace = Workspace(resolve_root(data_root), CheckpointStore(checkpoints))
    if tracker is None:
        workspace.check(runs)
        tracker = tracker_opened_during(uri, lambda: workspace.prepare(runs))
    else:
        workspace.prepare(runs)

    outcome = GridOutcome()
    planned = _plan(grid.name, runs, tracker, workspace, rerun, outcome)
    todo = [(n, s) for n, s in enumerate(planned, start=1) if s.action in ("train", "continue")]
    if not todo:
        running = sum(step.action == "elsewhere" for step in planned)
        print(
            f"grid {grid.name}: nothing to train: {outcome.skipped} of {len(runs)} runs "
            f"finished" + (f", {running} running in another process" if running else "")
            + " (--rerun trains them again)"
        )
        _close(outcome, results, grid.name, runs)
        return outcome

    tags = base_tags(**{GRID_TAG: grid.name, "vaebench.grid_file": str(grid_path)})
    started = time.strftime("%Y%m%d-%H%M%S")
    alone = [None if step.action == "continue" else step.run.config for _, step in todo]
    stacks = plan_stacks(alone, max_stack, cpu_rule(stack_everywhere))
    groups = [[todo[i][0] - 1 for i in group] for group in stacks]
    parent, ended = None, False
    with interruptible():
        try:
            since_ms = int(time.time() * 1000)
            with deferred_signals():  # a signal waits until the parent run is recorded
                parent = tracker.start_grid(
                    grid.name,
                    f"{grid.name}-{started}",
                    {
                        **tags,
                        "vaebench.runs": str(len(runs)),
                        "vaebench.executor": execution.executor,
                        "vaebench.workers": str(len(slots)) if slots else "ray tasks",
                        **lease_tags(),
                    },
                )
            work = GridWork(grid.name, groups, tags, rerun, since_ms, settle_seconds(uri))

            def renew_parent_lease(metrics: EpochMetrics | None = None) -> None:
                seconds = metrics.epoch_seconds + metrics.eval_seconds if metrics else 0.0
                tracker.set_tags(parent, lease_tags(seconds))

            trained = [step.run for _, step in todo]
            if execution.executor == "local" and len(slots) == 1 and slots[0].gpu is None:
                record = WorkRecord()
                if background and isinstance(tracker, MLflowTracker):
                    workspace.finisher = BackgroundFinisher(tracker.uri)
                try:
                    renew = renew_parent_lease
                    work_through(work, runs, planned, tracker, workspace, record, renew)
                except Interrupted:  # the table as stored, once the runs handed over ended
                    workspace.finisher.close()
                    with contextlib.suppress(TrackingError):
                        skipped = record.skipped
                        record = rows_from_store(
                            trained, tracker, work, parent, GRID_TAG, sys.stderr
                        )
                        record.skipped = skipped
                    raise
                finally:
                    workspace.finisher.close()
                    _take(outcome, record)
            else:
                job = GridJob(
                    str(grid_path), work, uri, tracker.experiment_id, parent,
                    workspace.data_root, workspace.checkpoints.folder, GRID_TAG,
                    background=background and isinstance(tracker, MLflowTracker),
                )
                try:
                    outcome.worker_errors = (
                        run_on_ray(
                            job, execution.address, execution.task_cpus, execution.task_gpus,
                            len(todo), renew_parent_lease,
                        )
                        if execution.executor == "ray"
                        else run_workers(job, slots, len(todo), renew_parent_lease)
                    )
                finally:
                    stored = rows_from_store(trained, tracker, work, parent, GRID_TAG, sys.stderr)
                    _take(outcome, stored)
            with deferred_signals():
                failed = outcome.failed or outcome.worker_errors
                tracker.end_run(parent, "FAILED" if failed else "FINISHED")
                ended = True
        except Interrupted as exc:
            if not ended:
                end_quietly(tracker, parent, "KILLED", f"{exc}; rerun the same command to continue")
            raise
        except TrackingError as exc:
            raise TrackingError(
                f"{exc}; the grid stopped. Rerun the same command once the store answers: "
                "finished runs are skipped, stopped ones continue from their checkpoint"
            ) from None
        finally:
            _close(outcome, results, grid.name, runs)
    if isinstance(tracker, MLflowTracker):
        resumed = len(todo) < len(planned) or any(s.action == "continue" for _, s in todo)
        made = None
        if report:
            made = report_invocation(tracker.uri, grid.name, results, parent, resumed)
            outcome.report_folder = made.folder if made else None
        if register:
            best = (
                made.best_runs if made
                else _best_runs(tracker.uri, grid.name, None if resumed else parent)
            )
            outcome.registered = register_best(
                tracker, grid.name, best, workspace.test_images, parent
            )
    return outcome


def background_finishing(post_run: str, runs: Sequence[RunSpec]) -> bool:
    """Whether a background process finishes the trained runs (:mod:`vaebench.lifecycle.post_run`)
    while
    this one trains the next: ``background``, ``inline``, or ``auto``: where some run trains
    on CUDA (the GPU would wait for the host's scoring and drawing otherwise; on the CPU
    the background process would take the cores the next run trains on)."""
    if post_run not in POST_RUN_CHOICES:
        raise VaebenchError(f"--post-run: one of {', '.join(POST_RUN_CHOICES)}, not {post_run!r}")
    if post_run == AUTO:
        return any(resolve_device(run.config.train.device).type == "cuda" for run in runs)
    return post_run == "background"


def _take(outcome: GridOutcome, record: WorkRecord) -> None:
    """The rows, failures and skips of work done (here or in the workers) into the outcome."""
    outcome.rows += record.rows
    outcome.failed += record.failed
    outcome.skipped += record.skipped


def _worker_slots(execution: Execution, runs: Sequence[RunSpec]) -> list[WorkerSlot]:
    """The local worker processes to start (pinned to the visible GPUs where runs train on
    CUDA); Ray places its tasks itself."""
    if execution.executor == "ray":
        import_ray()  # a missing extra is a one-line error before anything is tracked
        return []
    gpus: list[str] = []
    if any(resolve_device(run.config.train.device).type == "cuda" for run in runs):
        import torch

        gpus = visible_gpus(torch.cuda.device_count())
    return plan_workers(execution.workers, execution.per_gpu, gpus, cores())


def _plan(
    name: str,
    runs: Sequence[RunSpec],
    tracker: Tracker,
    workspace: Workspace,
    rerun: bool,
    outcome: GridOutcome,
) -> list[Planned]:
    """Recover the grid's abandoned runs, plan each run against the store (one line per
    skipped run, whose row joins the results) and drop checkpoints nothing will continue."""
    previous = recover_abandoned(tracker, tracker.previous_runs(name, GRID_TAG, name), sys.stderr)
    planned = plan(runs, previous, rerun)
    for number, step in enumerate(planned, start=1):
        if step.action in ("skip", "elsewhere"):
            print_skip(number, len(planned), step)
            outcome.rows.append(stored_row(step.run, step.previous))
    outcome.skipped = sum(step.action == "skip" for step in planned)
    continued = {step.previous.run_id for step in planned if step.action == "continue"}
    keys = {run.key for run in runs}
    for record in previous:
        if record.status == "KILLED" and record.key in keys and record.run_id not in continued:
            workspace.checkpoints.remove(record.run_id)  # superseded: finished or rerun
    return planned


def _close(outcome: GridOutcome, results: Path, name: str, runs: Sequence[RunSpec]) -> None:
    """The results table of what is known so far, in the grid's order, and the summary."""
    order = {run.key: index for index, run in enumerate(runs)}
    outcome.rows.sort(key=lambda row: order[row["key"]])
    outcome.csv_path = write_results(outcome.rows, results, name)
    print_summary(outcome)


def report_invocation(
    uri: str, name: str, results_dir: str | Path, parent: str, all_invocations: bool = False
) -> Report | None:
    """The report of the invocation just run (of every invocation, when this one continued
    a grid that earlier ones began). The grid's runs are tracked by now, so a report that
    cannot be made (every run failed, say) is one line on stderr, and ``vaebench report``
    can be run again later; it does not turn a grid into a crash."""
    from vaebench.reporting.report import make_report  # matplotlib and pandas' styling: when needed

    try:
        chosen = None if all_invocations else parent
        return make_report(
            name, uri, results_dir, parent_id=chosen, all_invocations=all_invocations
        )
    except Exception as exc:  # noqa: BLE001 - see the docstring
        kind = "" if isinstance(exc, VaebenchError) else f"{type(exc).__name__}: "
        print(f"vaebench: no report: {kind}{exc}", file=sys.stderr)
        return None


def _best_runs(uri: str, name: str, parent: str | None) -> list[BestRun]:
    """Each group's best run without a report (skipped, or failed); none, and one line, where
    none can be chosen (every run failed, no validation split, the store failing): the grid's
    runs are tracked by now, as for the report."""
    from vaebench.reporting.report import best_of_invocation

    try:
        return best_of_invocation(uri, name, parent)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        kind = "" if isinstance(exc, VaebenchError) else f"{type(exc).__name__}: "
        print(f"vaebench: nothing registered: {kind}{exc}", file=sys.stderr)
        return []


def write_results(rows: list[dict[str, Any]], folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def print_summary(outcome: GridOutcome, stream=None) -> None:
    stream = stream or sys.stdout
    table = pd.DataFrame(outcome.rows).reindex(columns=SUMMARY_COLUMNS)
    with pd.option_context("display.width", 120, "display.max_rows", 500):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"), file=stream)
    if outcome.csv_path:
        print(f"results: {outcome.csv_path}", file=stream)
    for name, error in outcome.failed:
        print(f"FAILED {name}: {error}", file=stream)
