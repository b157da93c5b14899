"""Local worker processes of ``run`` and ``tune --workers``: how many, on which GPU, how started
and stopped. No torch here (the caller passes the device count), so the mapping is tested
without a GPU."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vaebench.signals import Interrupted, forget_child, register_child
from vaebench.spec.config import VaebenchError

CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
AUTO = "auto"
# where the invocation's process finishes its trained runs (vaebench.lifecycle.post_run)
POST_RUN_CHOICES = (AUTO, "background", "inline")


@dataclass(frozen=True)
class Execution:
    """How an invocation spreads its runs: ``local`` worker processes, or ``ray`` tasks on the
    cluster at ``address`` (None: a local instance); ``post_run``: see
    :func:`vaebench.execution.runner.background_finishing`."""

    executor: str = "local"  # "local" or "ray"
    workers: str | int = 1
    per_gpu: int | None = None
    address: str | None = None
    task_cpus: float = 1.0
    task_gpus: float = 0.0
    post_run: str = AUTO


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    gpu: str | None  # the value its CUDA_VISIBLE_DEVICES gets (None: not pinned)
    threads: int


def cores() -> int:
    on_linux = hasattr(os, "sched_getaffinity")
    return len(os.sched_getaffinity(0)) if on_linux else (os.cpu_count() or 1)


def visible_gpus(device_count: int, environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` names them (so that a
    worker pinned to the second of ``CUDA_VISIBLE_DEVICES=4,6`` gets ``6``)."""
    environ = os.environ if environ is None else environ
    listed = environ.get(CUDA_VISIBLE)
    if listed is None:
        return [str(index) for index in range(device_count)]
    return [name.strip() for name in listed.split(",") if name.strip()][:device_count]


def plan_workers(
    workers: str | int, per_gpu: int | None, gpus: Sequence[str], cpu_cores: int
) -> list[WorkerSlot]:
    """``auto``: ``per_gpu`` workers (default 1) on each GPU, or one without a GPU; a number:
    that many, pinned to the GPUs in turn. The CPU cores are divided between the workers."""
    if per_gpu is not None and per_gpu < 1:
        raise VaebenchError("--per-gpu: must be >= 1")
    if workers == AUTO:
        count = len(gpus) * (per_gpu or 1) if gpus else 1
    else:
        if per_gpu is not None:
            raise VaebenchError("--per-gpu goes with --workers auto (one worker per GPU, or M)")
        count = int(workers)
        if count < 1:
            raise VaebenchError("--workers: must be >= 1 or auto")
    threads = max(1, cpu_cores // count)
    share = (per_gpu or 1) if workers == AUTO else 1
    return [WorkerSlot(index, gpus[(index // share) % len(gpus)] if gpus else None, threads)
            for index in range(count)]


def parse_workers(text: str) -> str | int:
    if text == AUTO:
        return AUTO
    if not text.isdigit() or int(text) < 1:
        raise VaebenchError(f"--workers: a number >= 1 or auto, not {text!r}")
    return int(text)


def run_processes(
    target: Callable[..., None], arguments: Mapping[int, tuple[Any, ...]], name: str,
    watch: Callable[[], None] = lambda: None,
) -> list[str]:
    """One spawned process ``<name><index>`` per ``arguments`` entry; a line per worker that
    did not exit well. ``watch`` is called every 0.2 s while they run, and once at the end.

    Spawned, not forked: a forked child inherits torch's thread pools and locks. A signal that
    stops this process is passed on to the workers (SIGTERM when something else stops it); one
    that does not stop within a minute is killed (its run is recovered later)."""
    context = multiprocessing.get_context("spawn")
    processes = {index: context.Process(target=target, args=args, name=f"{name}{index}")
                 for index, args in arguments.items()}
    try:
        for process in processes.values():
            process.start()
            register_child(process.pid)
        while any(process.is_alive() for process in processes.values()):
            watch()
            time.sleep(0.2)
        for process in processes.values():
            process.join()
        watch()
    except BaseException as exc:  # a signal, or the caller's watch failing (the store)
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGTERM
        for process in processes.values():
            if process.is_alive():
                os.kill(process.pid, signum)
        for process in processes.values():
            if process.pid is not None:
                process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
        raise
    finally:
        for process in processes.values():
            if process.pid is not None:
                forget_child(process.pid)
    return [f"worker {index} exited with status {process.exitcode}"
            for index, process in processes.items() if process.exitcode != 0]

