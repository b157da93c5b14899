"""Helpers for tests that drive ``python -m vaebench`` in subprocesses against real stores."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient


class Command:
    """``python -m vaebench ...`` in a subprocess; stderr read line by line as it comes."""

    def __init__(
        self, args: list[str], cwd: Path, loopback_only: bool = False, own_group: bool = False,
        prefix: tuple[str, ...] = (),
    ):
        """``loopback_only``: in a network namespace of its own that has only loopback
        (``unshare -n``), for servers that listen beyond 127.0.0.1 whatever they are told.
        ``own_group``: in a session (and process group) of its own, which :meth:`ctrl_c`
        signals as a terminal's Ctrl-C does. ``prefix``: a command that runs it (``unshare``)."""
        self.out = cwd / f"stdout-{time.monotonic_ns()}.txt"
        command = [*prefix, sys.executable, "-m", "vaebench", *args]
        if loopback_only:
            command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                       *command]
        with self.out.open("w") as stdout:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                start_new_session=own_group,
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 180.0) -> str:
        """The first stderr line matching ``pattern``; fails if the command ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} in {timeout} s:\n" + self.stderr)
            if line is None:
                pytest.fail(f"ended before a line matching {pattern!r}:\n" + self.stderr)
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def ctrl_c(self) -> None:
        """SIGINT to the command's whole process group, as a terminal's Ctrl-C sends it."""
        os.killpg(self.process.pid, signal.SIGINT)

    def finish(self, timeout: float = 300.0) -> int:
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._dump_stacks()
            raise

        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return status

    def _dump_stacks(self) -> None:
        """Where a command that did not end is stuck: its threads' stacks (``py-spy``, where
        installed) and what it printed, on the test's output."""
        spy = shutil.which("py-spy")
        if spy is not None:
            dump = subprocess.run([spy, "dump", "--pid", str(self.process.pid)],
                                  capture_output=True, text=True, timeout=60)
            print(f"py-spy dump of {self.process.pid}:\n{dump.stdout}{dump.stderr}")
        while not self._queue.empty():
            if (line := self._queue.get()) is not None:
                self.lines.append(line)
        print("stderr so far:\n" + self.stderr)

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def stdout(self) -> str:
        return self.out.read_text()


def grid_args(
    folder: Path, uri: str, mnist_root: Path, *extra: str, stack: str = "off"
) -> list[str]:
    """The grid's command line; its runs train alone unless ``stack`` is ``auto``."""
    return [
        "run", str(folder / "grid.yaml"), "--tracking-uri", uri, "--data-root", str(mnist_root),
        "--results-dir", str(folder / "results"), "--no-report", "--stack", stack, *extra,
    ]


def study_args(folder: Path, uri: str, mnist_root: Path, stack: str = "off") -> list[str]:
    """The study's command line; its trials train one by one unless ``stack`` is ``auto``."""
    return [
        "tune", str(folder / "study.yaml"), "--tracking-uri", uri, "--data-root",
        str(mnist_root), "--results-dir", str(folder / "results"),
        "--storage", str(folder / "optuna.db"), "--stack", stack,
    ]


def all_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000)


def children(runs: list) -> list:
    return [r for r in runs if "vaebench.run_key" in r.data.tags]


def assert_each_variant_finished_once(runs: list, variants: int) -> dict[str, object]:
    """No run RUNNING, parents included; exactly one FINISHED run per run key."""
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    finished = [r for r in children(runs) if r.info.status == "FINISHED"]
    keys = [r.data.tags["vaebench.run_key"] for r in finished]
    assert len(keys) == len(set(keys)) == variants
    return {r.data.tags["vaebench.run_key"]: r for r in finished}


def steps(uri: str, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, metric))
