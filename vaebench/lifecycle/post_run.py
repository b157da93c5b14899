"""What a run does after training that needs no model, here or in a background process (see
docs/performance.md#finishing-a-run-here-or-in-the-background)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from vaebench.lifecycle.artifacts import (
    RunPictures,
    draw_pictures,
    write_kl_per_dimension,
    write_weights,
)
from vaebench.lifecycle.finishing_helper import FinishingHelper, Pending, draw_here
from vaebench.lifecycle.run_figures import run_figures
from vaebench.scoring.clustering import ClusterInput
from vaebench.scoring.collapse import KLPerDimension
from vaebench.signals import (
    become_helper_process,
    deferred_signals,
    forget_child,
    register_child,
)
from vaebench.spec.config import first_line
from vaebench.spec.grid import RunSpec
from vaebench.timeline import phase
from vaebench.tracking.tracker import MLflowTracker, Tracker, TrackingError
from vaebench.training.checkpoint import CheckpointStore
from vaebench.training.trainer import check_finite, not_logged

ExtraMetrics = Callable[[dict[str, float]], dict[str, float]]


@dataclass
class RunOutcome:
    run_id: str
    summary: dict[str, float]  # logged after the last epoch
    final: dict[str, float]  # every final value: the last epoch's metrics and the summary


@dataclass
class FinishJob:
    """A trained run's results as plain data (it crosses to a background process)."""

    run: RunSpec
    run_id: str
    summary: dict[str, float]  # what was scored on the device, and the timing
    last: dict[str, float]  # the last epoch's metrics
    seconds: float  # the run's time so far: training, evaluation, scoring on the device
    clusters: list[ClusterInput]  # what its clustering scores are computed from
    weights: bytes  # its state_dict, as torch.save writes it
    pictures: RunPictures | None  # None: weights only (a study that keeps no pictures)
    checkpoints: CheckpointStore | None
    kl_per_dimension: KLPerDimension | None = None  # its file, and picture with the pictures
    # set once the run is ended FINISHED (in the process that ended it): a signal raised as
    # that ending's deferred block closes must not mark the run KILLED
    outcome: RunOutcome | None = None


def finish_run(
    job: FinishJob, tracker: Tracker, extra_metrics: ExtraMetrics | None = None,
    pending: Pending | None = None,
) -> RunOutcome:
    """``seconds``: the run's whole time, this scoring included. ``extra_metrics`` sees the
    final values and adds to the summary (a study's objectives). ``pending``: its clustering
    scores and figures, being made by a helper process (else made here)."""
    pending = pending or Pending()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vaebench-") as scratch:
        folder = Path(scratch)
        if job.pictures is not None:
            with phase("pictures"):
                figures = pending.figures or draw_here(
                    run_figures, *figure_arguments(job, job.pictures))
                draw_pictures(folder, job.pictures, figures.result())
        if job.kl_per_dimension is not None:
            with phase("artifacts", "kl_per_dimension.json"):
                write_kl_per_dimension(folder, job.kl_per_dimension)
        with phase("clustering"):
            clusters = pending.scores_of(job.clusters)
        check_finite(clusters, "after training")
        seconds = job.seconds + time.perf_counter() - started
        summary = {**job.summary, **not_logged(clusters, job.last), "seconds": seconds}
        final = {**job.last, **summary}
        if extra_metrics is not None:
            summary.update(extra_metrics(final))
        with phase("store", "final metrics"):
            tracker.log_metrics(job.run_id, summary, step=job.run.config.train.epochs)
        with phase("artifacts", "weights and pictures to the store"):
            write_weights(folder, job.run, job.weights)
            tracker.log_artifacts(job.run_id, folder)
    with deferred_signals(), phase("store", "run ended"):  # a signal now stops what follows
        tracker.end_run(job.run_id, "FINISHED")
        if job.checkpoints is not None:
            job.checkpoints.remove(job.run_id)
        job.outcome = RunOutcome(job.run_id, summary, final)
    return job.outcome


def figure_arguments(
    job: FinishJob, pictures: RunPictures
) -> tuple[np.ndarray, np.ndarray, str, tuple[float, ...] | None, str]:
    """What :func:`~vaebench.lifecycle.run_figures.run_figures` draws a run's figures from:
    its latent means and labels, its name, and its KL per dimension where it has one."""
    kl = job.kl_per_dimension
    return (
        pictures.latent_means, pictures.latent_labels, job.run.name,
        None if kl is None else kl.nats, "" if kl is None else kl.split,
    )


def error_text(exc: BaseException) -> str:
    """The error as a run's ``vaebench.error`` tag holds it: its type and message."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def end_quietly(tracker: Tracker, run_id: str | None, status: str, reason: str) -> None:
    """End the run (if it started); if the store cannot take it, the run's lease lets the
    next invocation recover it, and the error that stopped the run is the one the user sees."""
    if run_id is not None:
        with contextlib.suppress(TrackingError):
            tracker.end_run(run_id, status, reason)


def end_for_good(
    tracker: Tracker, checkpoints: CheckpointStore | None, run_id: str | None,
    exc: BaseException, status: str = "FAILED",
) -> None:
    """The run ends for good, its checkpoint removed (KILLED: stopped on purpose)."""
    if checkpoints is not None and run_id is not None:
        checkpoints.remove(run_id)
    end_quietly(tracker, run_id, status, error_text(exc) if status == "FAILED" else first_line(exc))


def finished(outcome: RunOutcome) -> Future[RunOutcome]:
    """An outcome that is already there, as a finisher's answer."""
    future: Future[RunOutcome] = Future()
    future.set_result(outcome)
    return future


class InlineFinisher:
    """Finishes each run in this process, before the next one starts; what goes wrong is
    raised at once, to the caller that ends the run. ``helper``: a process that makes the
    clustering scores and figures of the runs handed to :meth:`prepare`."""

    def __init__(self, helper: FinishingHelper | None = None):
        self._helper = helper
        self._pending: dict[str, Pending] = {}

    def prepare(self, jobs: Sequence[FinishJob]) -> None:
        """The runs about to be finished, in order (a stack's members): the helper starts on
        their scores, then their figures from the last
        (:class:`~vaebench.lifecycle.finishing_helper.Pending`)."""
        if self._helper is None:
            return
        for job in jobs:
            self._pending[job.run_id] = Pending(self._helper.submit_scores(job.clusters))
        for job in reversed(jobs):  # this process finishes them first to last
            if job.pictures is not None:
                figures = self._helper.draw(
                    run_figures, *figure_arguments(job, job.pictures))
                self._pending[job.run_id].figures = figures

    def finish(
        self, job: FinishJob, tracker: Tracker, extra_metrics: ExtraMetrics | None = None
    ) -> Future[RunOutcome]:
        pending = self._pending.pop(job.run_id, None)
        return finished(finish_run(job, tracker, extra_metrics, pending))

    def handing_over(self) -> contextlib.AbstractContextManager[None]:
        """Around handing a run over and noting it: inline, the finishing is the caller's
        own, interruptible as a run's recording always was."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Forget the jobs handed over (the helper is the invocation's: it closes it)."""
        self._pending.clear()


class BackgroundFinisher(InlineFinisher):
    """One spawned process that finishes runs in order while this process trains the next ones,
    started at once so that its imports overlap the data loading. It ignores SIGINT and SIGTERM:
    after a first signal this process waits (:meth:`close`) for the runs it handed over, which
    end FINISHED; a second signal kills it with this process (``PR_SET_PDEATHSIG``), leaving its
    runs RUNNING under this process's lease, for the next invocation to recover. A run it cannot
    finish ends FAILED; if the process dies, its runs end KILLED (their checkpoints continue
    them) and the runs that follow are finished here."""

    def __init__(self, uri: str):
        super().__init__()  # its process makes the scores and pictures itself
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(uri,),
        )
        self._broken = False
        self._pid: int | None = None
        self._pool.submit(os.getpid).add_done_callback(self._started)

    def _started(self, future: Future[int]) -> None:
        with contextlib.suppress(Exception):
            self._pid = future.result()
            register_child(self._pid)  # a second signal kills it with this process

    def finish(
        self, job: FinishJob, tracker: Tracker, extra_metrics: ExtraMetrics | None = None
    ) -> Future[RunOutcome]:
        if extra_metrics is None and not self._broken:
            try:
                future = self._pool.submit(_finish_in_worker, job)
                future.add_done_callback(partial(_killed_if_lost, tracker, job.run_id))
                return future
            except BrokenProcessPool:
                self._broken = True
                warnings.warn(
                    "the background process that finishes runs died: runs are finished in "
                    "this process from now on", RuntimeWarning, stacklevel=2,
                )
        return super().finish(job, tracker, extra_metrics)

    def handing_over(self) -> contextlib.AbstractContextManager[None]:
        """A signal waits until the caller has noted the run handed over: it is the
        background's from then on, not to be marked KILLED."""
        return deferred_signals()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._pid is not None:
            forget_child(self._pid)


_tracker: Tracker | None = None  # the background process's connection to the store


def _start_worker(uri: str) -> None:
    """The background process's start: a helper process (see :func:`become_helper_process`)
    with its own tracker."""
    global _tracker
    become_helper_process()
    # what finishing a run imports on first use, imported while this process waits for one
    import scipy.optimize  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.metrics  # noqa: F401

    _tracker = MLflowTracker(uri)


def _finish_in_worker(job: FinishJob) -> RunOutcome:
    """:func:`finish_run` in the background process; a run it cannot finish ends FAILED there
    (the store failing is raised as it is: the run keeps its lease and checkpoint)."""
    assert _tracker is not None
    try:
        return finish_run(job, _tracker)
    except TrackingError:
        raise
    except BaseException as exc:
        end_for_good(_tracker, job.checkpoints, job.run_id, exc)
        raise


LOST = "the background process finishing it died; its checkpoint continues it"


def _killed_if_lost(tracker: Tracker, run_id: str, finishing: Future[RunOutcome]) -> None:
    """A run the background process died with ends KILLED, its checkpoint kept: the next
    invocation continues it after its last epoch, and finishes it."""
    if isinstance(finishing.exception(), BrokenProcessPool):
        end_quietly(tracker, run_id, "KILLED", LOST)
