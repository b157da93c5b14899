"""The life of one tracked run, shared by ``run`` and ``tune``.

start (or continue a stopped run in its own MLflow run) -> ``fit`` with a
checkpoint and the run's metrics and lease after every epoch -> what finishing it
needs of its model (:func:`finish_job`) -> the workspace's finisher scores its
clusters, writes its artifacts and ends it FINISHED, here or in a background process
(:mod:`vaebench.lifecycle.post_run`); or fail, or kill. Nothing else starts or ends a run
(the finisher ends it FINISHED on this module's behalf), and nothing here knows
whether a grid or an Optuna study asked for it: ``tune`` passes its pruning as an
``epoch_hook`` and its objectives as ``extra_metrics``. MLflow is reached only
through the :class:`Tracker`.

How an ending is recorded:
- finished: FINISHED, the checkpoint removed (the final state_dict is an artifact);
- a signal (:class:`~vaebench.signals.Interrupted`, Ctrl-C): KILLED with the reason,
  the checkpoint kept, so that the next invocation continues the run;
- stopped on purpose (``stopped_early``, e.g. a pruned trial): KILLED, no checkpoint;
- an error of the run (diverged, out of memory): FAILED with the error, no checkpoint;
- the store failing (:class:`TrackingError`): nothing more is written; the run stays
  RUNNING with a lease that the next invocation recognises as abandoned.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vaebench.data import SplitRecord, Splits, split_records
from vaebench.lifecycle.artifacts import picture_arrays, weights_bytes
from vaebench.lifecycle.claims import lease_tags
from vaebench.lifecycle.post_run import (
    ExtraMetrics,
    Finisher,
    FinishJob,
    InlineFinisher,
    RunOutcome,
    end_quietly,
    fail_run,
    forget,
    handing_over,
)
from vaebench.lifecycle.preflight import check_before_tracking, preflight
from vaebench.lifecycle.provenance import code_version, run_tags
from vaebench.scoring.classifier import ClassifierCache
from vaebench.signals import deferred_signals
from vaebench.spec.config import RunConfig, first_line
from vaebench.spec.grid import RunSpec
from vaebench.tracking.tracker import Tracker, TrackingError
from vaebench.training.checkpoint import CheckpointStore
from vaebench.training.progress import RunProgress
from vaebench.training.trainer import EpochMetrics, TrainResult, fit, resolve_device

EpochHook = Callable[[EpochMetrics], None]


@functools.cache
def _digest_thread() -> ThreadPoolExecutor:
    """The process's one thread that hashes splits (every Workspace's), made when first
    needed."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaebench-digest")


os.register_at_fork(after_in_child=_digest_thread.cache_clear)  # a child has no such thread


@dataclass
class RunHooks:
    """What a caller adds to a run's life (``tune``: its trial): ``tags`` of its own,
    ``on_start(run_id)`` once the run is tracked, ``epoch_hook`` after each epoch is logged
    (it may raise one of ``stopped_early`` to stop the run on purpose, as a pruner does),
    ``extra_metrics`` of the run's final values, logged with its summary, and, for a member
    of a stack, ``on_end(error)`` as soon as its run's ending is recorded (None: FINISHED),
    while the others may still train."""

    tags: Mapping[str, str] = field(default_factory=dict)
    on_start: Callable[[str], None] | None = None
    epoch_hook: EpochHook | None = None
    extra_metrics: ExtraMetrics | None = None
    on_end: Callable[[BaseException | None], None] | None = None


class Workspace:
    """What the runs of one invocation share in this process: the device-resident splits
    (loaded once per data config and device), the classifiers, the checkpoint store (None:
    runs are not checkpointed, as a study's trials, which are never continued), and who
    finishes the trained runs (:mod:`vaebench.lifecycle.post_run`: here, unless the caller hands
    them to
    a background process)."""

    def __init__(self, data_root: Path, checkpoints: CheckpointStore | None):
        self.data_root = data_root
        self.checkpoints = checkpoints
        self.finisher: Finisher = InlineFinisher()
        self.classifiers = ClassifierCache(data_root)
        self._splits: dict[tuple[str, str], Splits] = {}
        # the splits' digests, hashed in a thread (hashlib lets go of the GIL) while the
        # store opens and the first run starts: 0.5 s for MNIST's on the CPU
        self._records: dict[tuple[str, str], Future[list[SplitRecord]]] = {}

    def check(self, runs: Sequence[RunSpec]) -> None:
        """The quick part of the preflight (clashing settings, data files present): what
        must fail before the tracking store is even opened."""
        check_before_tracking(runs, self.data_root)

    def prepare(self, runs: Sequence[RunSpec]) -> None:
        """Preflight ``runs`` (errors before anything is tracked), keep their splits and start
        hashing them."""
        self._splits.update(preflight(runs, self.data_root, self._splits))
        for run in runs:
            key = self._key(run)
            if key not in self._records:
                self._records[key] = _digest_thread().submit(
                    split_records, self._splits[key], run.config.data, self.data_root
                )

    def split_records_for(self, run: RunSpec) -> list[SplitRecord]:
        """The run's splits as MLflow dataset inputs (their digests computed once)."""
        self.splits_for(run)
        return self._records[self._key(run)].result()

    def splits_for(self, run: RunSpec) -> Splits:
        key = self._key(run)
        if key not in self._splits:
            self.prepare([run])
        return self._splits[key]

    @staticmethod
    def _key(run: RunSpec) -> tuple[str, str]:
        return run.config.data.model_dump_json(), str(resolve_device(run.config.train.device))

    def test_images(self, config: RunConfig, count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` test images and labels of a run's data, on the CPU (a
        registered model's input example)."""
        test = self.splits_for(RunSpec("example", "", config, ())).test
        return test.images[:count].cpu(), test.labels[:count].cpu()


def record_invalid(
    tracker: Tracker, name: str, params: Mapping[str, Any], tags: Mapping[str, str], error: str
) -> str:
    """A run whose settings make no valid config: recorded FAILED with the reason, untrained."""
    run_id = tracker.start_run(name, params, tags)
    tracker.end_run(run_id, "FAILED", error)
    return run_id


def _resumable(
    workspace: Workspace, run: RunSpec, run_id: str | None
) -> dict[str, Any] | None:
    """The checkpoint of ``run_id`` if it continues exactly this run with this code."""
    if run_id is None or workspace.checkpoints is None:
        return None
    state = workspace.checkpoints.load(run_id)
    if state is None:
        return None
    device = str(resolve_device(run.config.train.device))
    if (state.get("run_key"), state.get("code"), state.get("device")) != (
        run.key,
        code_version(),
        device,
    ):  # other settings, other code or another device: start over
        workspace.checkpoints.remove(run_id)
        return None
    return state


def execute(
    run: RunSpec,
    tracker: Tracker,
    workspace: Workspace,
    tags: Mapping[str, str],
    index: int,
    total: int,
    continue_id: str | None = None,
    claimed_id: str | None = None,
    on_start: Callable[[str], None] | None = None,
    epoch_hook: EpochHook | None = None,
    extra_metrics: ExtraMetrics | None = None,
    stopped_early: tuple[type[BaseException], ...] = (),
    pictures: bool = True,
) -> Future[RunOutcome]:
    """Train and track one run; returns its outcome (to come, where the workspace's finisher
    finishes it in the background: :mod:`vaebench.lifecycle.post_run`), or raises what stopped it.

    ``continue_id`` names a stopped (KILLED) run of the same key: with a checkpoint
    of this code, the run goes on in that MLflow run after its last saved epoch;
    without one, a new run starts and the old one stays KILLED. ``claimed_id``: the
    RUNNING run a claim created for this run (:func:`vaebench.lifecycle.exactly_once.claim_run`,
    with the
    tags this function would give it), trained in instead of starting one.
    """
    device = resolve_device(run.config.train.device)
    status = "FAILED"
    run_id: str | None = claimed_id  # from here on, this function ends the claimed run
    saved = 0
    progress: RunProgress | None = None
    job: FinishJob | None = None
    try:
        splits = workspace.splits_for(run)
        state = _resumable(workspace, run, continue_id)
        saved = state["epoch"] if state else 0
        progress = RunProgress(index, total, run.name, run.config.train.epochs, start=saved)
        with deferred_signals():  # a signal waits until the run's id is known and recorded
            if state is not None:
                run_id = continue_id
                tracker.reopen_run(run_id, lease_tags())
            elif claimed_id is None:
                tags = {**tags, **run_tags(run), **lease_tags()}
                run_id = tracker.start_run(run.name, run.params, tags)
            if on_start is not None:
                on_start(run_id)
        if state is None:  # a new run: the data it sees (a continued one has them already)
            tracker.log_inputs(run_id, workspace.split_records_for(run))
        if state is not None:
            _log_missing_epochs(tracker, run_id, state)
        longest = 0.0

        def save_state(snapshot: dict[str, Any]) -> None:
            nonlocal saved
            snapshot.update(run_key=run.key, code=code_version(), device=str(device))
            with deferred_signals():  # the epoch on disk is known before a signal is raised
                if workspace.checkpoints.save(run_id, snapshot):
                    saved = snapshot["epoch"]

        def on_epoch(metrics: EpochMetrics) -> None:
            nonlocal longest
            longest = max(longest, metrics.epoch_seconds + metrics.eval_seconds)
            values = metrics.as_dict()
            tracker.log_metrics(run_id, values, step=metrics.epoch, tags=lease_tags(longest))
            progress.epoch(metrics.epoch, values)
            if epoch_hook is not None:
                epoch_hook(metrics)

        keep = save_state if workspace.checkpoints is not None else None
        with tracker.system_metrics(run_id):
            result = fit(
                run.config, splits, device, on_epoch, resume=state, save_state=keep,
                score_clusters=False,
            )
        job = finish_job(run, run_id, result, workspace, pictures)
        with handing_over(workspace.finisher):
            finishing = workspace.finisher.finish(job, tracker, extra_metrics)
            status = "FINISHED" if finishing.done() else FINISHING
        if not finishing.done():
            finishing.add_done_callback(partial(say_finished, progress.label))
        return finishing
    except TrackingError:
        status = "STOPPED (tracking store failed)"
        raise
    except KeyboardInterrupt as exc:
        if job is not None and job.ended:  # FINISHED just before the signal was raised
            status = "FINISHED"
            raise
        if status == FINISHING:  # the background's: it ends the run
            raise
        status = "KILLED"
        where = f"; its checkpoint after epoch {saved} continues it" if saved else ""
        end_quietly(tracker, run_id, "KILLED", f"{first_line(exc)}{where}")
        raise
    except stopped_early as exc:
        status = "KILLED"
        forget(workspace.checkpoints, run_id)
        end_quietly(tracker, run_id, "KILLED", first_line(exc))
        raise
    except BaseException as exc:
        fail_run(tracker, workspace.checkpoints, run_id, exc)
        raise
    finally:
        if progress is not None:
            progress.close(status)


FINISHING = "trained: its scores, pictures and artifacts follow in the background"


def finish_job(
    run: RunSpec, run_id: str, result: TrainResult, workspace: Workspace, pictures: bool = True
) -> FinishJob:
    """What finishing a trained run (:mod:`vaebench.lifecycle.post_run`) needs of its model, taken
    now
    on its device: the scores the model family adds, the parameter count, its weights and,
    with ``pictures``, its pictures' arrays."""
    model = result.model

    def classifier() -> torch.nn.Module:
        return workspace.classifiers.get(run.config.data.dataset, model.device)

    summary = {
        **result.summary,
        **model.extra_scores(classifier),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }
    return FinishJob(
        run=run,
        run_id=run_id,
        summary=summary,
        last=result.final.as_dict(),
        seconds=result.seconds,
        clusters=result.clusters,
        weights=weights_bytes(model),
        pictures=picture_arrays(model, workspace.splits_for(run)) if pictures else None,
        checkpoints=workspace.checkpoints,
    )


def say_finished(label: str, finishing: Future[RunOutcome]) -> None:
    """The line of a run finished in the background, once it is."""
    error = finishing.exception()
    status = "FINISHED" if error is None else f"FAILED after training: {first_line(error)}"
    if isinstance(error, TrackingError):  # the run keeps its lease: a rerun finishes it
        status = f"STOPPED (tracking store failed: {first_line(error)})"
    print(f"{label} {status}", file=sys.stderr, flush=True)


def _log_missing_epochs(tracker: Tracker, run_id: str, state: dict[str, Any]) -> None:
    """Epochs the checkpoint holds that the store missed (the process stopped between
    writing the checkpoint and logging the epoch): logged now, so the series has no gap."""
    logged = tracker.logged_steps(run_id, "train_loss")
    for record in state["history"]:
        metrics = EpochMetrics(**record)
        if metrics.epoch not in logged:
            tracker.log_metrics(run_id, metrics.as_dict(), step=metrics.epoch)
