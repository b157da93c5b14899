"""``run --executor ray`` on a real local Ray instance (``ray.init`` with this machine's
cores), inside a network namespace that has only loopback: Ray listens beyond 127.0.0.1
whatever it is told, so the command under test runs in ``unshare -n`` (started here)."""

from __future__ import annotations

import os
import re
import signal

import pandas as pd
import pytest
from commands import Command, all_runs, assert_each_variant_finished_once, grid_args, steps

pytestmark = pytest.mark.slow

EPOCHS = 12
GRID = f"""
name: ray-grid
base:
  data: {{subset: 10000, validation: 1000}}
  model: {{hidden: [256], z_dim: 8}}
  train: {{epochs: {EPOCHS}, batch_size: 64, eval_batch_size: 1000, device: cpu}}
matrix:
  loss.beta: [1, 4]
seeds: [0, 1]
"""


@pytest.fixture(autouse=True)
def every_task_line_printed(monkeypatch):
    """Ray folds lines that differ only in their numbers ("[repeated 7x across cluster]"): the
    tests wait for one task's own epoch line, which may be folded away."""
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")


def test_ray_tasks_train_every_run_once_though_a_worker_dies(tmp_path, mnist_root):
    (tmp_path / "grid.yaml").write_text(GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = grid_args(tmp_path, uri, mnist_root, "--executor", "ray")
    command = Command(args, tmp_path, loopback_only=True)
    line = command.wait_for(r"\(grid_task pid=\d+\).* epoch 2/12 ", timeout=240)
    worker = int(re.search(r"pid=(\d+)", line).group(1))
    os.kill(worker, signal.SIGKILL)  # the Ray worker process training that run
    assert command.finish(timeout=600) == 0, command.stderr
    runs = all_runs(uri, "ray-grid")
    finished = assert_each_variant_finished_once(runs, 4)
    # the retried task (same arguments, same task name) found the run RUNNING, left by its
    # own dead attempt, marked it KILLED and continued it
    assert re.search(r"was left RUNNING \(an earlier attempt of task \S+ \(\S+:\d+\) ended\): "
                     r"marked KILLED", command.stderr), command.stderr[-3000:]
    continued = re.findall(r"\[\d/4\] \S+ continues after epoch (\d+)", command.stderr)
    assert len(continued) == 1 and int(continued[0]) >= 2, command.stderr[-3000:]
    for run in finished.values():  # no epoch missing or logged twice
        assert steps(uri, run.info.run_id, "train_loss") == list(range(1, EPOCHS + 1))
    assert "grid ray-grid: 4 of 4 runs done" in command.stderr
    assert list(pd.read_csv(tmp_path / "results" / "ray-grid.csv")["status"]) == ["FINISHED"] * 4


def test_ray_executor_without_ray_is_one_line(tmp_path, mnist_root):
    """Without the extra, --executor ray says what to install (Ray hidden from the import)."""
    (tmp_path / "grid.yaml").write_text(GRID)
    (tmp_path / "ray.py").write_text("raise ImportError('No module named ray')\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = Command(grid_args(tmp_path, uri, mnist_root, "--executor", "ray"), tmp_path)
    assert command.finish() == 2
    assert command.lines == ['vaebench: error: --executor ray: Ray is not installed '
                             '(pip install -e ".[ray]")']
    assert not (tmp_path / "mlflow.db").exists()
