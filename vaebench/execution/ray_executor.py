"""``run --executor ray``: each stack of the grid (or run alone) is a Ray task, which works
as a local worker does, so a task run twice never trains a run twice (docs/scaling.md). Ray
is an optional extra, imported only here."""

from __future__ import annotations

import os
from typing import Any

from vaebench.execution.worker_plan import Execution, cores
from vaebench.execution.worker_processes import GridJob, RunCount, work_on
from vaebench.lifecycle.claims import set_task
from vaebench.signals import interruptible
from vaebench.spec.config import VaebenchError
from vaebench.subnormals import subnormals_set
from vaebench.training.progress import set_line_prefix

TASK_RETRIES = 3  # a task whose process died runs again, at most this often
WAIT_SECONDS = 30.0  # how often the parent's lease is renewed while tasks run


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        missing = '--executor ray: Ray is not installed (pip install -e ".[ray]")'
        raise VaebenchError(missing) from None
    return ray


def grid_task(job: GridJob, group: int, threads: int) -> list[tuple[str, str]]:
    """The runs of ``job.work.groups[group]``; returns (run name, status) for each."""
    import dataclasses

    import torch

    torch.set_num_threads(max(1, threads))
    set_line_prefix(f"task {group} ")
    # a retry gets the same arguments, so the same name: the runs a dead attempt of this
    # task left RUNNING are abandoned for the next attempt, on whichever node it runs
    set_task(f"{job.parent_id}-{group}")
    ended: list[tuple[str, str]] = []
    work = dataclasses.replace(job.work, groups=[job.work.groups[group]])
    # ray.cancel's interrupt waits for store writes, as a signal does
    with interruptible(), subnormals_set():
        work_on(job, work, lambda name, status: ended.append((name, status)))
    return ended


def run_on_ray(job: GridJob, execution: Execution, todo: int, renew: Any) -> list[str]:
    """Every group of ``job`` a Ray task; a line per task that failed for good."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every task's progress line, not a digest
    if started_here:
        cpus = {"num_cpus": cores()} if execution.address is None else {}
        ray.init(address=execution.address, include_dashboard=False, log_to_driver=True, **cpus)
    task = ray.remote(
        num_cpus=execution.task_cpus, num_gpus=execution.task_gpus, max_retries=TASK_RETRIES
    )(grid_task)
    threads = max(1, int(execution.task_cpus))
    pending = {task.remote(job, group, threads): group for group in range(len(job.work.groups))}
    errors: list[str] = []
    count = RunCount(job.work.experiment, todo)
    try:
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SECONDS)
            renew()
            for ref in finished:
                group = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...
                    errors.append(f"task {group} failed: {str(exc).strip().splitlines()[-1]}")
                    continue
                for name, status in results:
                    count.ended(f"task {group}", name, status)
    except BaseException:  # a signal, or the store failing: each task ends its runs KILLED
        for ref in pending:
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=60)
        raise
    finally:
        if started_here:
            ray.shutdown()
    return errors

