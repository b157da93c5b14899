"""The life of a stack: K tracked runs of one shape trained together (:mod:`vaebench.stacking.fit`).

Each member is its own MLflow run, recorded as :func:`vaebench.lifecycle.execute.execute` records a
run alone (params, tags, every epoch's metrics, the summary, artifacts, the ending), plus the
tags :data:`STACK_SIZE_TAG`, :data:`STACK_MEMBERS_TAG` and :data:`STACK_TIMING_TAG` (its
times are its share of the stack's). Each member's checkpoint is the one its run alone
would write, so a stopped member continues alone (``execute``). A member that
diverges ends FAILED and the others go on; a signal ends every unfinished member KILLED,
keeping its checkpoint. MLflow is reached only through the :class:`Tracker`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from typing import Any

from vaebench.lifecycle.claims import lease_tags
from vaebench.lifecycle.execute import (
    FINISHING,
    EpochHook,
    RunHooks,
    Workspace,
    finish_job,
    say_finished,
)
from vaebench.lifecycle.post_run import (
    FinishJob,
    RunOutcome,
    end_quietly,
    error_text,
    finished,
    forget,
    handing_over,
)
from vaebench.lifecycle.provenance import code_version, run_tags
from vaebench.signals import deferred_signals
from vaebench.spec.config import first_line
from vaebench.spec.grid import RunSpec
from vaebench.stacking.fit import MemberStopped, fit_stack
from vaebench.tracking.tracker import Tracker, TrackingError
from vaebench.training.progress import RunProgress, line_prefix
from vaebench.training.trainer import EpochMetrics, resolve_device

STACK_SIZE_TAG = "vaebench.stack_size"
STACK_MEMBERS_TAG = "vaebench.stack_members"  # the members' run names, comma-separated
STACK_TIMING_TAG = "vaebench.stack_timing"
STACK_TIMING = (
    "epoch_seconds, eval_seconds and seconds are this run's share of its stack: the stack's "
    "seconds divided by the members it held then (stack_size until one leaves), plus the "
    "scoring the run does alone"
)


def stack_tags(runs: Sequence[RunSpec]) -> dict[str, str]:
    return {
        STACK_SIZE_TAG: str(len(runs)),
        STACK_MEMBERS_TAG: ",".join(run.name for run in runs),
        STACK_TIMING_TAG: STACK_TIMING,
    }


def execute_stack(
    runs: Sequence[RunSpec],
    tracker: Tracker,
    workspace: Workspace,
    tags: Mapping[str, str],
    number: int,
    total: int,
    epoch_hook: EpochHook | None = None,
    claimed_ids: Sequence[str] | None = None,
    member_hooks: Sequence[RunHooks] | None = None,
    stopped_early: tuple[type[BaseException], ...] = (),
    pictures: bool = True,
) -> list[Future[RunOutcome] | BaseException]:
    """Train and track ``runs`` (one stack key) as one stack; for each run, in order, its
    outcome (to come, where the workspace's finisher finishes runs in the background:
    :mod:`vaebench.lifecycle.post_run`), the error that failed it, or the ``stopped_early``
    exception
    its hook raised to stop it (its run KILLED, as :func:`vaebench.lifecycle.execute.execute` ends
    it;
    the others go on). Raises what stops the stack as a whole (a signal, the store failing).
    ``epoch_hook`` sees the stack's epochs once (:func:`stack_epoch`: its seconds the
    stack's, as a grid's lease needs them), ``member_hooks[i]`` run i's life;
    ``claimed_ids``: the RUNNING runs claims created for ``runs``
    (:func:`vaebench.lifecycle.exactly_once.claim_run`), trained in instead of starting new ones."""
    hooks = list(member_hooks or [RunHooks() for _ in runs])
    epochs = runs[0].config.train.epochs
    device = resolve_device(runs[0].config.train.device)
    label = f"stack of {len(runs)} ({', '.join(run.name for run in runs)})"
    progress: RunProgress | None = None
    run_ids: list[str] = list(claimed_ids or [])  # from here on, this function ends them
    ended: dict[int, Future[RunOutcome] | BaseException] = {}
    jobs: dict[int, FinishJob] = {}  # the trained members' finishing
    saved: dict[int, int] = {}
    shown = 0
    longest = 0.0
    status = "FAILED"
    try:
        splits = workspace.splits_for(runs[0])
        progress = RunProgress(number, total, label, epochs)
        with deferred_signals():  # a signal waits until the runs' ids are known and recorded
            first_lease = lease_tags(runs_at_once=len(runs))  # until the first epoch is timed
            for run_id in run_ids:  # claimed
                tracker.set_tags(run_id, {**first_lease, **stack_tags(runs)})
            for run, run_hooks in zip(runs, hooks, strict=True) if claimed_ids is None else ():
                run_tag_set = {
                    **tags, **run_hooks.tags, **run_tags(run), **first_lease, **stack_tags(runs)
                }
                run_ids.append(tracker.start_run(run.name, run.params, run_tag_set))
            for run_hooks, run_id in zip(hooks, run_ids, strict=True):
                if run_hooks.on_start is not None:
                    run_hooks.on_start(run_id)
        for run, run_id in zip(runs, run_ids, strict=True):
            tracker.log_inputs(run_id, workspace.split_records_for(run))

        def save_state(index: int, snapshot: dict[str, Any]) -> None:
            snapshot.update(run_key=runs[index].key, code=code_version(), device=str(device))
            with deferred_signals():
                if workspace.checkpoints.save(run_ids[index], snapshot):
                    saved[index] = snapshot["epoch"]

        def end(index: int, status: str, outcome: Future[RunOutcome] | BaseException) -> None:
            """Member ``index``'s run ends now (its caller hears of it at once), or, trained,
            has been handed to the finisher (``outcome``, FINISHED once it is done)."""
            with deferred_signals():
                if not isinstance(outcome, Future):
                    forget(workspace.checkpoints, run_ids[index])
                    reason = first_line(outcome) if status == "KILLED" else error_text(outcome)
                    end_quietly(tracker, run_ids[index], status, reason)
                ended[index] = outcome
                if hooks[index].on_end is not None:
                    hooks[index].on_end(None if isinstance(outcome, Future) else outcome)

        def on_epoch(index: int, metrics: EpochMetrics) -> None:
            nonlocal shown, longest
            # a member's times are its share: the stack's epoch is up to K times longer
            whole = stack_epoch(metrics, len(runs))
            longest = max(longest, whole.epoch_seconds + whole.eval_seconds)
            values = metrics.as_dict()
            lease = lease_tags(longest)
            tracker.log_metrics(run_ids[index], values, step=metrics.epoch, tags=lease)
            if metrics.epoch > shown:  # the stack's epoch, once: its first live member's
                shown = metrics.epoch
                progress.epoch(metrics.epoch, values)
                if epoch_hook is not None:
                    epoch_hook(whole)
            member_hook = hooks[index].epoch_hook
            if member_hook is None:
                return
            try:
                member_hook(metrics)
            except stopped_early as exc:  # this member only, on purpose: KILLED
                end(index, "KILLED", exc)
                raise MemberStopped(exc) from exc

        def fail(index: int, error: Exception) -> None:
            """A member's run ends FAILED when its error is known; the others go on."""
            end(index, "FAILED", error)

        keep = save_state if workspace.checkpoints is not None else None
        configs = [run.config for run in runs]
        with contextlib.ExitStack() as monitors:  # each member's run records the machine
            for run_id in run_ids:
                monitors.enter_context(tracker.system_metrics(run_id))
            results = fit_stack(
                configs, splits, device, on_epoch, keep, on_failed=fail, score_clusters=False
            )
        for index, result in enumerate(results):
            if index in ended:  # diverged or stopped: ended already
                continue
            try:
                jobs[index] = finish_job(runs[index], run_ids[index], result, workspace, pictures)
                with handing_over(workspace.finisher):
                    finishing = workspace.finisher.finish(
                        jobs[index], tracker, hooks[index].extra_metrics
                    )
                    end(index, "FINISHED", finishing)
            except TrackingError:
                raise
            except KeyboardInterrupt:
                outcome = jobs[index].outcome if index in jobs else None
                if outcome is not None and index not in ended:  # FINISHED just before it
                    end(index, "FINISHED", finished(outcome))
                raise
            except Exception as exc:  # this member's scores or pictures: the others go on
                fail(index, exc)
                continue
            if not finishing.done():
                member = f"{line_prefix()}{runs[index].name}"
                finishing.add_done_callback(partial(say_finished, member))
        status = _stack_status(list(ended.values()), len(runs), stopped_early)
        return [ended[index] for index in range(len(runs))]
    except TrackingError:
        status = "STOPPED (tracking store failed)"
        raise
    except KeyboardInterrupt as exc:
        status = "KILLED"
        for index, run_id in enumerate(run_ids):
            if index not in ended and not (index in jobs and jobs[index].ended):
                epoch = saved.get(index, 0)
                where = f"; its checkpoint after epoch {epoch} continues it" if epoch else ""
                end_quietly(tracker, run_id, "KILLED", f"{first_line(exc)}{where}")
        raise
    except BaseException as exc:
        text = error_text(exc)
        for index, run_id in enumerate(run_ids):
            if index not in ended and not (index in jobs and jobs[index].ended):
                forget(workspace.checkpoints, run_id)
                end_quietly(tracker, run_id, "FAILED", text)
        raise
    finally:
        if progress is not None:
            progress.close(status)


def _stack_status(
    ended: Sequence[Future[RunOutcome] | BaseException],
    members: int,
    stopped_early: tuple[type[BaseException], ...],
) -> str:
    """The stack's closing line: how many of its runs finished, are being finished in the
    background and were stopped (the others failed, each with its own line)."""
    finished = sum(isinstance(e, Future) and e.done() and not e.exception() for e in ended)
    finishing = sum(isinstance(e, Future) and not e.done() for e in ended)
    stopped = sum(isinstance(e, stopped_early) for e in ended)
    parts = [f"{finished} of {members} FINISHED"] if finished or not finishing else []
    if finishing:
        parts.append(f"{finishing} of {members} {FINISHING}")
    if stopped:
        parts.append(f"{stopped} stopped")
    return ", ".join(parts)


def stack_epoch(metrics: EpochMetrics, members: int) -> EpochMetrics:
    """A member's epoch as the stack's: its training and evaluation seconds (a share of the
    stack's) times the ``members`` the stack started with, at most the stack's own."""
    return replace(
        metrics,
        epoch_seconds=metrics.epoch_seconds * members,
        eval_seconds=metrics.eval_seconds * members,
    )
