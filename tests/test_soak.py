"""Soak: three invocations of one grid share a PostgreSQL-backed ``mlflow server``, two
workers each, while random workers are SIGKILLed at random moments (an invocation that ends
is started again, as a scheduler requeues a job); a clean invocation then finishes the grid.
Every run ends FINISHED exactly once, with each epoch logged once, nothing left RUNNING and
no checkpoint left behind (issue 28)."""

from __future__ import annotations

import random
import time

import psutil
import pytest
from commands import Command, all_runs, assert_each_variant_finished_once, grid_args, steps
from conftest import mlflow_server
from postgres import postgres_server

pytestmark = pytest.mark.slow

EPOCHS = 5
GRID = f"""
name: soak
base:
  data: {{subset: 2048, validation: 256}}
  model: {{hidden: [32], z_dim: 2}}
  train: {{epochs: {EPOCHS}, batch_size: 64, eval_batch_size: 256, device: cpu}}
matrix:
  loss.beta: [1, 2, 4]
seeds: [0, 1, 2, 3]
"""
RUNS, INVOCATIONS, KILLS = 12, 3, 10
SEED = 28  # the kills' victims and moments


def spawned_workers(pid: int) -> list[psutil.Process]:
    """The worker processes of the invocation ``pid`` (multiprocessing's spawned children,
    not its resource tracker)."""
    workers = []
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:  # it ended meanwhile
        return []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:  # it ended meanwhile
            continue
    return workers


def test_random_sigkills_of_workers_lose_no_run_and_train_none_twice(tmp_path, mnist_root):
    rng = random.Random(SEED)
    (tmp_path / "grid.yaml").write_text(GRID)
    checkpoints = tmp_path / "checkpoints"
    with postgres_server(("mlflow",)) as urls, \
            mlflow_server(urls["mlflow"], tmp_path / "server.log", cwd=tmp_path) as uri:
        args = grid_args(tmp_path, uri, mnist_root, "--workers", "2", "--checkpoint-dir",
                         str(checkpoints), "--no-register", "--no-system-metrics")
        running = [Command(args, tmp_path) for _ in range(INVOCATIONS)]
        ended: list[Command] = []
        killed = 0
        deadline = time.monotonic() + 300
        while killed < KILLS and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 5.0))
            for command in [c for c in running if c.process.poll() is not None]:
                running.remove(command)
                ended.append(command)
                running.append(Command(args, tmp_path))  # requeued
            workers = [w for c in running for w in spawned_workers(c.process.pid)]
            if workers:
                rng.choice(workers).kill()
                killed += 1
        assert killed == KILLS, f"only {killed} kills before the deadline"
        for command in running + ended:
            command.finish(timeout=600)
        for command in running + ended:  # a worker killed: its invocation says so, exit 1
            assert command.process.returncode in (0, 1), command.stderr
            assert "Traceback" not in command.stderr, command.stderr

        clean = Command(args, tmp_path)
        assert clean.finish(timeout=600) == 0, clean.stderr
        runs = all_runs(uri, "soak")
        finished = assert_each_variant_finished_once(runs, RUNS)
        for run in finished.values():  # each epoch logged once: no run trained twice
            assert steps(uri, run.info.run_id, "train_loss") == list(range(1, EPOCHS + 1))
    assert not checkpoints.exists() or [p for p in checkpoints.rglob("*") if p.is_file()] == []
