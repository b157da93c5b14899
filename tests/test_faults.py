"""Faults a user's machine throws, each on a real condition (issue 28): one line naming the
cause, the exit status that says whether waiting may help, nothing stored damaged, and the
rerun after the fault is gone completes with every run FINISHED once."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import Command
from mlflow.tracking import MlflowClient

GRID = """
name: faults
base:
  data: {subset: 512, validation: 256}
  model: {hidden: [16], z_dim: 2}
  train: {epochs: 2, batch_size: 128, device: cpu}
seeds: [0, 1]
"""


def run_args(folder: Path, mnist_root: Path, checkpoints: Path) -> list[str]:
    """The grid in ``folder``, its store (and so its artifacts) and results there too."""
    return ["run", str(folder / "faults.yaml"), "--tracking-uri",
            f"sqlite:///{folder / 'mlflow.db'}", "--data-root", str(mnist_root),
            "--results-dir", str(folder / "results"), "--checkpoint-dir", str(checkpoints),
            "--no-report", "--no-register"]


def vaebench_run(tmp_path: Path, mnist_root: Path, checkpoints: Path, prefix=()):
    args = run_args(tmp_path, mnist_root, checkpoints)
    return subprocess.run([*prefix, sys.executable, "-m", "vaebench", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def runs_by_status(folder: Path) -> dict[str, list[str]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("faults")
    found: dict[str, list[str]] = {}
    for run in client.search_runs([experiment.experiment_id]):
        if "vaebench.run_key" in run.data.tags:
            found.setdefault(run.info.status, []).append(run.data.tags["vaebench.run_key"])
    return found


def assert_intact(store: Path) -> None:
    with contextlib.closing(sqlite3.connect(store)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def one_disk_full_line(stderr: str, disk: Path) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("vaebench: error")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"vaebench: error: no space left on the device of {disk}/")
    assert errors[0].endswith("; free some space and rerun the same command to continue")
    assert "Traceback" not in stderr


needs_mounts = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="mounts a small tmpfs: needs root (and unshare for a mount namespace)")


@needs_mounts
def test_a_full_disk_stops_the_grid_in_one_line_and_the_rerun_completes(tmp_path, mnist_root):
    """The checkpoints' disk is a 64 KiB tmpfs (a checkpoint of these runs is about 300 KiB):
    the first checkpoint write, after epoch 1, finds it full."""
    (tmp_path / "faults.yaml").write_text(GRID)
    small = tmp_path / "small-disk"
    small.mkdir()
    on_small_disk = ("unshare", "-m", "sh", "-c",
                     f'mount -t tmpfs -o size=64k none {small} && exec "$0" "$@"')
    before_fault = time.monotonic()  # the first checkpoint, after epoch 1, finds it full
    full = Command(run_args(tmp_path, mnist_root, small), tmp_path, prefix=on_small_disk)
    assert full.finish(timeout=120) == 75, full.stderr
    # the whole command, start-up included (the mid-grid test below times the fault itself)
    assert time.monotonic() - before_fault < 30
    one_disk_full_line(full.stderr, small)
    stopped = runs_by_status(tmp_path)
    assert "FAILED" not in stopped and len(stopped.get("KILLED", [])) == 2
    assert_intact(tmp_path / "mlflow.db")

    rerun = vaebench_run(tmp_path, mnist_root, tmp_path / "checkpoints")
    assert rerun.returncode == 0, rerun.stderr
    ended = runs_by_status(tmp_path)
    assert sorted(ended["FINISHED"]) == sorted(stopped["KILLED"])  # each once
    assert "RUNNING" not in ended and "FAILED" not in ended


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder`` (in this mount namespace: it outlives the
    commands that write to it), unmounted at the end."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path) -> Path:
    """Another process's file that takes every free byte of ``disk``."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(bytes(1 << 20))
    return filler


@needs_mounts
def test_the_disk_under_store_artifacts_and_checkpoints_filling_mid_grid(tmp_path, mnist_root):
    """Another process fills the disk that holds the SQLite store, the artifacts, the
    checkpoints and the results while a run trains: one line naming the disk, exit 75 within
    10 s, no run FAILED, the store intact; once space is freed the rerun finishes each run
    once."""
    with small_disk(tmp_path / "disk", "32m") as disk:
        (disk / "faults.yaml").write_text(GRID.replace("epochs: 2", "epochs: 30"))
        args = run_args(disk, mnist_root, disk / "checkpoints")
        command = Command(args, disk)
        command.wait_for(r"epoch 2/30 ")
        filler = fill(disk)
        filled = time.monotonic()
        assert command.finish(timeout=120) == 75, command.stderr
        assert time.monotonic() - filled < 10
        one_disk_full_line(command.stderr, disk)
        assert_intact(disk / "mlflow.db")
        assert "FAILED" not in runs_by_status(disk)

        filler.unlink()
        rerun = Command(args, disk)
        assert rerun.finish(timeout=300) == 0, rerun.stderr
        ended = runs_by_status(disk)
        assert sorted(ended) == ["FINISHED"] and len(ended["FINISHED"]) == 2  # each once
        assert_intact(disk / "mlflow.db")


def test_a_model_too_large_to_allocate_fails_its_run_and_the_grid_goes_on(tmp_path, mnist_root):
    """A 10^6 x 10^6 layer (4 TB of float32) cannot be allocated: that run ends FAILED with
    one line giving the size, the other trains, exit 1."""
    matrix = "seeds: [0]\nmatrix:\n  model.hidden: [[1000000, 1000000], [16]]"
    (tmp_path / "faults.yaml").write_text(GRID.replace("seeds: [0, 1]", matrix))
    done = vaebench_run(tmp_path, mnist_root, tmp_path / "checkpoints")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    [failed] = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert "can't allocate memory" in failed and "4000000000000 bytes" in failed
    assert [len(keys) for keys in runs_by_status(tmp_path).values()] == [1, 1]


def test_a_store_locked_by_another_process_is_waited_for_then_exit_75(
    tmp_path, mnist_root, monkeypatch
):
    """Another process holds ``BEGIN EXCLUSIVE`` on the SQLite store (a backup, an sqlite3
    shell): vaebench says who holds it, waits $VAEBENCH_STORE_WAIT seconds (plus SQLite's own
    5 s per try), and exits 75 in one line; once the lock is gone the rerun trains the grid."""
    (tmp_path / "faults.yaml").write_text(GRID)
    first = vaebench_run(tmp_path, mnist_root, tmp_path / "checkpoints")  # the store exists
    assert first.returncode == 0, first.stderr
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"db = sqlite3.connect({str(tmp_path / 'mlflow.db')!r}, isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(300)\n"
    )], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("VAEBENCH_STORE_WAIT", "2")
        locked = Command(run_args(tmp_path, mnist_root, tmp_path / "checkpoints"), tmp_path)
        locked.wait_for("is locked by pid")
        met = time.monotonic()
        assert locked.finish(timeout=120) == 75, locked.stderr
        assert time.monotonic() - met < 2 + 10  # the wait asked for, then within 10 s
    finally:
        holder.kill()
        holder.wait()
    lines = locked.stderr.strip().splitlines()
    assert f"is locked by pid {holder.pid} (python" in lines[0]
    assert "waiting up to 2 s ($VAEBENCH_STORE_WAIT)" in lines[0]
    assert [line for line in lines if line.startswith("vaebench: error")] == [lines[-1]]
    assert "database is locked" in lines[-1] and "Traceback" not in locked.stderr
    assert_intact(tmp_path / "mlflow.db")
    rerun = vaebench_run(tmp_path, mnist_root, tmp_path / "checkpoints")
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(runs_by_status(tmp_path)) == ["FINISHED"]
    assert len(runs_by_status(tmp_path)["FINISHED"]) == 2  # each once
