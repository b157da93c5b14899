"""``run --workers N``: worker processes on this machine work through one grid invocation,
each from its own place in the list of stacks (docs/scaling.md)."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import queue
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaebench.execution.grid_work import GridWork, RunEnded, WorkRecord, work_through
from vaebench.execution.worker_plan import CUDA_VISIBLE, WorkerSlot, run_processes
from vaebench.lifecycle.claims import Planned
from vaebench.lifecycle.post_run import BackgroundFinisher
from vaebench.lifecycle.workspace import Workspace
from vaebench.signals import Interrupted, interruptible
from vaebench.spec.config import VaebenchError
from vaebench.spec.grid import expand, load_grid
from vaebench.subnormals import subnormals_set
from vaebench.tracking.tracker import MLflowTracker
from vaebench.training.checkpoint import CheckpointStore
from vaebench.training.progress import set_line_prefix
from vaebench.whole_lines import write_whole_lines


@dataclass(frozen=True)
class GridJob:
    """Plain data: it crosses a spawn."""

    grid_path: str
    work: GridWork
    tracking_uri: str
    experiment_id: str
    parent_id: str
    data_root: Path
    checkpoint_dir: Path
    # each worker process finishes its trained runs in a background process of its own
    # (vaebench.lifecycle.post_run; Ray tasks finish theirs themselves)
    background: bool = False


def start_group(worker: int, workers: int, groups: int) -> int:
    """Spread evenly, so that workers rarely contend for the same claim."""
    return (worker * groups) // workers if groups else 0


@contextlib.contextmanager
def worker_process(index: int, threads: int | None, gpu: str | None = None) -> Iterator[None]:
    """A process group of its own, so that a terminal's Ctrl-C reaches the invocation's process
    alone, which passes it on; pinned to ``gpu`` before torch touches CUDA."""
    os.setpgrp()
    write_whole_lines()
    if gpu is not None:
        os.environ[CUDA_VISIBLE] = gpu
    import torch

    if threads:
        torch.set_num_threads(threads)
    with interruptible(), subnormals_set():
        try:
            yield
        except Interrupted as exc:
            sys.exit(exc.exit_status)
        except VaebenchError as exc:
            print(f"vaebench: worker {index}: {exc}", file=sys.stderr)
            sys.exit(exc.exit_status)


def work_on(
    job: GridJob, work: GridWork, on_ended: RunEnded, start: int = 0, background: bool = False
) -> None:
    """Any process working on a grid: its own tracker on the invocation's parent run; with
    ``background``, its trained runs finished by a background process."""
    tracker = MLflowTracker(job.tracking_uri)
    tracker.join_grid(job.experiment_id, job.parent_id)
    runs = expand(load_grid(job.grid_path))
    workspace = Workspace(job.data_root, CheckpointStore(job.checkpoint_dir))
    if background:
        workspace.finisher = BackgroundFinisher(job.tracking_uri)
    try:
        work_through(work, runs, [Planned(run, "train") for run in runs], tracker, workspace,
                     WorkRecord(ended=on_ended), start_group=start)
    finally:
        workspace.finisher.close()  # the runs handed over end first


def grid_worker_main(job: GridJob, slot: WorkerSlot, workers: int, events: Any) -> None:
    set_line_prefix(f"w{slot.index} ")
    with worker_process(slot.index, slot.threads, slot.gpu):
        work_on(job, job.work, lambda name, status: events.put((slot.index, name, status)),
                start_group(slot.index, workers, len(job.work.groups)), job.background)


@dataclass
class RunCount:

    experiment: str
    todo: int  # how many runs the workers or tasks have between them
    done: int = 0

    def ended(self, where: str, name: str, status: str) -> None:
        self.done += 1
        print(f"grid {self.experiment}: {self.done} of {self.todo} runs done "
              f"({where}: {name} {status})", file=sys.stderr, flush=True)


def run_workers(job: GridJob, slots: Sequence[WorkerSlot], todo: int, renew: Any) -> list[str]:
    """A line per worker that did not end well; ``renew()`` (the parent run's lease) is called
    about once a minute."""
    events = multiprocessing.get_context("spawn").Queue()
    count = RunCount(job.work.experiment, todo)
    ticks = itertools.count(1)

    def watch() -> None:
        if next(ticks) % 300 == 0:
            renew()
        with contextlib.suppress(queue.Empty):
            while True:
                worker, name, status = events.get_nowait()
                count.ended(f"w{worker}", name, status)

    arguments = {slot.index: (job, slot, len(slots), events) for slot in slots}
    return run_processes(grid_worker_main, arguments, "grid-worker-", watch=watch)
