"""A grid invocation: check it, plan it against the store, run what is left, write results.

Every run goes through :func:`vaebench.execute.execute`. Running a grid again
continues it: runs whose key FINISHED in the experiment are skipped (``rerun``
trains them again as new samples), runs a killed invocation left RUNNING are
marked KILLED (see :mod:`vaebench.claims`), and KILLED runs continue from their
checkpoint in their own MLflow run. Ctrl-C and SIGTERM stop the grid cleanly;
a store that fails stops it with one line saying how to continue.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vaebench.checkpoint import CheckpointStore, default_folder
from vaebench.claims import OWNER_TAG, Planned, lease_tags, plan, recover_abandoned
from vaebench.config import VaebenchError
from vaebench.data import resolve_root
from vaebench.execute import EpochHook, RunOutcome, Workspace, end_quietly, execute
from vaebench.execute_stack import execute_stack
from vaebench.grid import RunSpec, expand, load_grid
from vaebench.preflight import check_output_folder
from vaebench.provenance import base_tags
from vaebench.signals import Interrupted, deferred_signals, interruptible
from vaebench.stack_plan import plan_stacks
from vaebench.tracking import (
    RUN_KEY_TAG,
    MLflowTracker,
    Tracker,
    TrackingError,
    resolve_tracking_uri,
    sqlite_path,
    tracker_opened_during,
)
from vaebench.train import EpochMetrics, resolve_device

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
    csv_path: Path | None = None
    report_folder: Path | None = None


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
) -> GridOutcome:
    """Check, expand and train a grid file; record it and return what happened.

    Runs that can share a stack (:mod:`vaebench.stacked`) train together, at most
    ``max_stack`` at a time (1, the default: every run alone). With ``report`` (and an
    MLflow tracker) the invocation's report follows: ``results/<grid>/`` and artifacts of
    the parent run.
    """
    grid_path = Path(grid_path)
    grid = load_grid(grid_path)
    runs = expand(grid)
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
    parent, ended = None, False
    with interruptible():
        try:
            with deferred_signals():  # a signal waits until the parent run is recorded
                parent = tracker.start_grid(
                    grid.name,
                    f"{grid.name}-{started}",
                    {**tags, "vaebench.runs": str(len(runs)), **lease_tags()},
                )

            def renew_parent_lease(metrics: EpochMetrics) -> None:
                seconds = metrics.epoch_seconds + metrics.eval_seconds
                tracker.set_tags(parent, lease_tags(seconds))

            alone = [None if step.action == "continue" else step.run.config for _, step in todo]
            for group in plan_stacks(alone, max_stack, trains_on_cpu):
                ready = []
                for number, step in (todo[index] for index in group):
                    step = step if rerun else _as_stored_now(step, grid.name, tracker)
                    if step.action in ("skip", "elsewhere"):  # another invocation took it
                        _print_skip(number, len(planned), step)
                        outcome.rows.append(_skipped_row(step))
                        outcome.skipped += step.action == "skip"
                    else:
                        ready.append((number, step))
                fresh = [(number, step) for number, step in ready if step.action == "train"]
                if len(fresh) > 1:  # those still new train as a stack; a continued run alone
                    outcome.rows += _run_stack(
                        fresh, len(planned), tracker, workspace, tags, outcome, renew_parent_lease
                    )
                    ready = [item for item in ready if item not in fresh]
                for number, step in ready:
                    outcome.rows.append(
                        _run_step(
                            step, number, len(planned), tracker, workspace, tags, outcome,
                            renew_parent_lease,
                        )
                    )
            with deferred_signals():
                tracker.end_run(parent, "FAILED" if outcome.failed else "FINISHED")
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
    if report and isinstance(tracker, MLflowTracker):
        resumed = len(todo) < len(planned) or any(s.action == "continue" for _, s in todo)
        outcome.report_folder = report_invocation(
            tracker.uri, grid.name, results, parent, all_invocations=resumed
        )
    return outcome


def _as_stored_now(step: Planned, name: str, tracker: Tracker) -> Planned:
    """The step planned again from the store just before its run trains: an invocation of the
    same grid started meanwhile may have finished or taken the run."""
    return plan([step.run], tracker.previous_runs(name, RUN_KEY_TAG, step.run.key), False)[0]


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
            _print_skip(number, len(planned), step)
            outcome.rows.append(_skipped_row(step))
    outcome.skipped = sum(step.action == "skip" for step in planned)
    continued = {step.previous.run_id for step in planned if step.action == "continue"}
    keys = {run.key for run in runs}
    for record in previous:
        if record.status == "KILLED" and record.key in keys and record.run_id not in continued:
            workspace.checkpoints.remove(record.run_id)  # superseded: finished or rerun
    return planned


def _run_step(
    step: Planned,
    number: int,
    total: int,
    tracker: Tracker,
    workspace: Workspace,
    tags: dict[str, str],
    outcome: GridOutcome,
    epoch_hook: EpochHook,
) -> dict[str, Any]:
    """One run's row of the results; a failing run does not stop the grid."""
    run = step.run
    stopped = step.previous.run_id if step.previous is not None else None
    try:
        done = execute(
            run, tracker, workspace, tags, number, total, continue_id=stopped,
            epoch_hook=epoch_hook,
        )
    except Exception as exc:
        if isinstance(exc, TrackingError):
            raise
        return _row(run, exc, outcome)
    return _row(run, done, outcome)


def _run_stack(
    ready: Sequence[tuple[int, Planned]],
    total: int,
    tracker: Tracker,
    workspace: Workspace,
    tags: dict[str, str],
    outcome: GridOutcome,
    epoch_hook: EpochHook,
) -> list[dict[str, Any]]:
    """The rows of runs trained as one stack; a failing stack does not stop the grid."""
    runs = [step.run for _, step in ready]
    try:
        done = execute_stack(runs, tracker, workspace, tags, ready[0][0], total, epoch_hook)
    except Exception as exc:
        if isinstance(exc, TrackingError):
            raise
        done = [exc] * len(runs)
    return [_row(run, result, outcome) for run, result in zip(runs, done, strict=True)]


def _row(run: RunSpec, done: RunOutcome | Exception, outcome: GridOutcome) -> dict[str, Any]:
    """A run's row of the results: its final values, or FAILED (and the error, in
    ``outcome.failed``)."""
    if isinstance(done, Exception):
        line = str(done).splitlines()[0] if str(done) else ""
        outcome.failed.append((run.name, f"{type(done).__name__}: {line}"))
        return {"name": run.name, "key": run.key, "status": "FAILED", **run.params}
    row = {"name": run.name, "key": run.key, "status": "FINISHED", "run_id": done.run_id}
    return {**row, **run.params, **done.final}


def _print_skip(number: int, total: int, step: Planned) -> None:
    run_id = step.previous.run_id
    if step.action == "skip":
        why = f"FINISHED already in run {run_id}"
    else:
        why = f"RUNNING in run {run_id}, held by {step.previous.tags.get(OWNER_TAG, '?')}"
    print(f"[{number}/{total}] {step.run.name} skipped: {why}", file=sys.stderr, flush=True)


def _skipped_row(step: Planned) -> dict[str, Any]:
    record = step.previous
    row = {"name": step.run.name, "key": step.run.key, "status": record.status}
    return {**row, "run_id": record.run_id, **step.run.params, **record.metrics}


def _close(outcome: GridOutcome, results: Path, name: str, runs: Sequence[RunSpec]) -> None:
    """The results table of what is known so far, in the grid's order, and the summary."""
    order = {run.key: index for index, run in enumerate(runs)}
    outcome.rows.sort(key=lambda row: order[row["key"]])
    outcome.csv_path = write_results(outcome.rows, results, name)
    print_summary(outcome)


def report_invocation(
    uri: str, name: str, results_dir: str | Path, parent: str, all_invocations: bool = False
) -> Path | None:
    """The report of the invocation just run (of every invocation, when this one continued
    a grid that earlier ones began). The grid's runs are tracked by now, so a report that
    cannot be made (every run failed, say) is one line on stderr, and ``vaebench report``
    can be run again later; it does not turn a grid into a crash."""
    from vaebench.report import make_report

    try:
        chosen = None if all_invocations else parent
        return make_report(
            name, uri, results_dir, parent_id=chosen, all_invocations=all_invocations
        ).folder
    except Exception as exc:  # noqa: BLE001 - see the docstring
        kind = "" if isinstance(exc, VaebenchError) else f"{type(exc).__name__}: "
        print(f"vaebench: no report: {kind}{exc}", file=sys.stderr)
        return None


def write_results(rows: list[dict[str, Any]], folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def trains_on_cpu(config) -> bool:
    return resolve_device(config.train.device).type == "cpu"


def print_summary(outcome: GridOutcome, stream=None) -> None:
    stream = stream or sys.stdout
    table = pd.DataFrame(outcome.rows).reindex(columns=SUMMARY_COLUMNS)
    with pd.option_context("display.width", 120, "display.max_rows", 500):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"), file=stream)
    if outcome.csv_path:
        print(f"results: {outcome.csv_path}", file=stream)
    for name, error in outcome.failed:
        print(f"FAILED {name}: {error}", file=stream)
