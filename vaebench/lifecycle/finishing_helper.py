"""A helper process for the host's share of finishing runs: k-means with the clustering scores,
and the Matplotlib figures, while this process draws the image grids and writes the store; at
the invocation's end, the report's figures while this process registers the best models
(docs/performance.md#finishing-beside-a-helper-process).

A stack's members are finished on the host after training. Each of the parts is one core's
work; in a thread they would take turns for the interpreter, in a process of their own they run
side by side, and the helper's start and its imports (scikit-learn, Matplotlib) happen while
this process imports torch and MLflow. What it returns is what this process would compute (the
same functions on the same arrays); if it dies, this process computes the rest itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from vaebench.scoring.clustering import ClusterInput, scored_clusters
from vaebench.signals import become_helper_process

Scores = dict[str, float]
Figures = dict[str, bytes]  # file name: PNG bytes
T = TypeVar("T")
STARTING_SECONDS = 30.0  # the longest close waits for a helper still starting, to kill it
_limits: object = None  # the helper's thread limits, kept for its life


def _start() -> None:
    """One thread for every library's pool (BLAS too, in k-means' initialisation): the
    helper takes one core, the invocation's process the other."""
    global _limits
    become_helper_process()
    # imported now, beside the invocation's own imports, not when the first stack finishes
    import scipy.optimize  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.metrics  # noqa: F401
    from threadpoolctl import threadpool_limits

    import vaebench.plots  # noqa: F401

    _limits = threadpool_limits(limits=1)


_NOT_YET = object()


@dataclass
class Drawing(Generic[T]):
    """A figure's drawing, handed to the helper (``future``) or to be drawn here (None: no
    helper, or it was gone). :meth:`result` is what the helper returned, or what the call
    returns here where the helper has not started it by then (it is behind: the caller, who
    would wait, draws it instead) or died: the same function on the same arguments, so the
    same bytes. It is made once: asking again returns the same result."""

    function: Callable[..., T]
    arguments: tuple[Any, ...]
    future: Future[T] | None = None
    keywords: dict[str, Any] = field(default_factory=dict)
    _result: Any = field(default=_NOT_YET, repr=False)

    def result(self) -> T:
        if self._result is _NOT_YET:
            self._result = self._made()
        return self._result

    def _made(self) -> T:
        if self.future is not None and not self.future.cancel():
            try:
                return self.future.result()
            except BrokenProcessPool:
                pass
        return self.function(*self.arguments, **self.keywords)


def draw_here(function: Callable[..., T], *arguments: Any, **keywords: Any) -> Drawing[T]:
    """:meth:`FinishingHelper.draw` where there is no helper: drawn when asked for."""
    return Drawing(function, arguments, keywords=keywords)


@dataclass
class Pending:
    """One run's work in the helper: its clustering scores (an input each; None: the helper
    was gone) and its figures (None: not asked). A stack's scores are asked for first, in the
    order this process finishes its members, then its figures last member first: the helper
    draws those of the last members while this process finishes the first ones, and this
    process draws those the helper has not started when it comes to them
    (:meth:`Drawing.result`). Scores are always the helper's: k-means here would first
    import scikit-learn (most of a second), measured slower than waiting for the helper."""

    scores: list[Future[Scores]] | None = None
    figures: Drawing[Figures] | None = None

    def scores_of(self, clusters: Sequence[ClusterInput]) -> Scores:
        """Every input's scores, from the helper where it computed them, else computed here."""
        scores: Scores = {}
        for index, one in enumerate(clusters):
            try:
                if self.scores is None:
                    raise BrokenProcessPool
                scores.update(self.scores[index].result())
            except BrokenProcessPool:
                scores.update(scored_clusters(one))
        return scores


class FinishingHelper:
    """One spawned process that computes what it is asked, in the order asked."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_start
        )
        self._started = self._pool.submit(os.getpid)  # starts the process now

    @property
    def pid(self) -> int:
        """The process's id, once it has started."""
        return self._started.result()

    @staticmethod
    def worth_starting(executor: str, workers: str | int, post_run: str) -> bool:
        """Where runs are finished in the invoking process (one local worker, not in the
        background) and a second core is there to use."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        here = executor == "local" and workers == 1 and post_run != "background"
        return here and cores > 1

    def submit_scores(self, clusters: Sequence[ClusterInput]) -> list[Future[Scores]] | None:
        """Futures of each input's clustering scores (None: the helper is gone)."""
        try:
            return [self._submit(scored_clusters, one) for one in clusters]
        except (BrokenProcessPool, RuntimeError):  # died, or shut down
            return None

    def draw(self, function: Callable[..., T], *arguments: Any, **keywords: Any) -> Drawing[T]:
        """``function(*arguments, **keywords)`` in the helper, in turn (a module-level
        function; what it takes and returns crosses by pickle)."""
        try:
            future = self._submit(function, *arguments, **keywords)
        except (BrokenProcessPool, RuntimeError):  # died, or shut down
            future = None
        return Drawing(function, arguments, future, keywords)

    def _submit(self, function, *arguments, **keywords) -> Future:
        if self._pool is None:
            raise RuntimeError("closed")
        return self._pool.submit(function, *arguments, **keywords)

    def close(self) -> None:
        """Stop the process (again: nothing more). It is killed: it holds nothing to save, and
        its interpreter's teardown of scikit-learn would cost the invocation half a second.
        Then the pool is shut down waiting for its manager thread, which lets go of the pool's
        queues: a process that exits at once after a signal leaves their semaphores to
        multiprocessing's resource tracker, which warns of them as leaked."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        with contextlib.suppress(Exception):  # failed to start, or gone already
            os.kill(self._started.result(timeout=STARTING_SECONDS), signal.SIGKILL)
        pool.shutdown(wait=True, cancel_futures=True)
