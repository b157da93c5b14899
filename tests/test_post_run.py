"""Finishing trained runs in a background process (``run --post-run background``) records what
finishing them in the invocation's own process records; a run it cannot finish ends FAILED,
a run it dies with ends KILLED with its checkpoint, and a signal waits for it."""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from commands import Command, all_runs, children, grid_args
from mlflow.tracking import MlflowClient

from vaebench.cli import main
from vaebench.execution.runner import background_finishing
from vaebench.lifecycle.artifacts import RunPictures
from vaebench.lifecycle.post_run import LOST, BackgroundFinisher, FinishJob
from vaebench.spec.config import RunConfig, VaebenchError
from vaebench.spec.grid import RunSpec, expand, load_grid
from vaebench.tracking.tracker import ERROR_TAG, MLflowTracker
from vaebench.training.checkpoint import CheckpointStore

GRID = """
name: finishing
base:
  data: {subset: 600, validation: 500}
  model: {arch: mlp, hidden: [64], z_dim: 4}
  train: {epochs: 2, batch_size: 100, eval_batch_size: 2500, device: cpu}
matrix:
  loss.beta: [1, 4]
include:
  - {model.arch: gumbel}
seeds: [0]
"""
TWO_STACKS = GRID.replace(
    "include:\n  - {model.arch: gumbel}", "  optim.name: [adam, rmsprop]"
).replace("epochs: 2", "epochs: 30")
TIMING = ("seconds", "images_per_second")


def _grid_run(tmp_path: Path, mnist_root: Path, post_run: str):
    folder = tmp_path / post_run
    folder.mkdir()
    (folder / "grid.yaml").write_text(GRID)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    status = main([*grid_args(folder, uri, mnist_root, stack="auto"), "--post-run", post_run])
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in children(all_runs(uri, "finishing"))}
    table = pd.read_csv(folder / "results" / "finishing.csv").set_index("name")
    return status, client, runs, table


def test_background_finishing_records_what_finishing_here_records(tmp_path, mnist_root, capfd):
    """Two mlp runs stacked and a gumbel run alone (its val_nmi logged every epoch): every
    metric but the timing, every artifact's bytes and every results row are the same."""
    status, here_client, here, here_table = _grid_run(tmp_path, mnist_root, "inline")
    assert status == 0
    assert "follow in the background" not in capfd.readouterr().err
    status, there_client, there, there_table = _grid_run(tmp_path, mnist_root, "background")
    err = capfd.readouterr().err
    assert status == 0
    assert "2 of 2 trained: its scores, pictures and artifacts follow in the background" in err
    assert len(here) == len(there) == 3
    for name, run in here.items():
        other = there[name]
        assert run.info.status == other.info.status == "FINISHED"
        assert f"{name} FINISHED" in err
        untimed = {k: v for k, v in run.data.metrics.items() if not k.endswith(TIMING)
                   and not k.startswith("system/")}
        assert {"test_nmi", "val_nmi", "test_accuracy", "test_elbo"} <= set(untimed)
        assert untimed == {k: other.data.metrics[k] for k in untimed}
        assert set(other.data.metrics) == set(run.data.metrics)
        assert other.data.metrics["seconds"] > 0
        files = sorted(a.path for a in here_client.list_artifacts(run.info.run_id))
        assert files == sorted(a.path for a in there_client.list_artifacts(other.info.run_id))
        assert {"state_dict.pt", "latent.npz", "latent.png", "samples.png"} <= set(files)
        differ = [
            path for path in files
            if _digest(here_client, run.info.run_id, path, tmp_path / "a")
            != _digest(there_client, other.info.run_id, path, tmp_path / "b")
        ]
        assert differ == [], name
    columns = [c for c in here_table.columns if not c.endswith(TIMING) and c != "run_id"]
    pd.testing.assert_frame_equal(here_table[columns], there_table.loc[here_table.index, columns])
    assert not list((tmp_path / "background" / "checkpoints").glob("*.pt"))


def _digest(client: MlflowClient, run_id: str, path: str, folder: Path) -> str:
    return hashlib.sha256(
        Path(client.download_artifacts(run_id, path, str(folder))).read_bytes()
    ).hexdigest()


def _job(tracker: MLflowTracker, checkpoints: CheckpointStore, name: str, pictures=None):
    """A trained run's finishing job, its run RUNNING with a checkpoint on disk."""
    run = RunSpec(name, f"key-{name}", RunConfig(), ())
    run_id = tracker.start_run(name, {}, {})
    checkpoints.folder.mkdir(exist_ok=True)
    checkpoints.path(run_id).write_bytes(b"a checkpoint")
    return FinishJob(
        run=run, run_id=run_id, summary={"test_elbo": -100.0}, last={"val_elbo": -101.0},
        seconds=1.0, clusters=[], weights=b"weights", pictures=pictures, checkpoints=checkpoints,
    )


def test_a_run_the_background_cannot_finish_fails_and_the_next_one_finishes(tmp_path):
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_grid("finishing", "parent", {})
    checkpoints = CheckpointStore(tmp_path / "checkpoints")
    flat = np.zeros(3, dtype=np.float32)  # not images: drawing them fails
    broken = RunPictures(flat, flat, flat, np.zeros((2, 2)), np.zeros(2), {})
    bad, good = _job(tracker, checkpoints, "bad", broken), _job(tracker, checkpoints, "good")
    finisher = BackgroundFinisher(tracker.uri)
    try:
        failing, finishing = finisher.finish(bad, tracker), finisher.finish(good, tracker)
        error = failing.exception(timeout=120)
        outcome = finishing.result(timeout=120)
    finally:
        finisher.close()
    assert isinstance(error, ValueError)
    failed = tracker.run_record(bad.run_id)
    assert failed.status == "FAILED"
    assert "ValueError" in failed.tags[ERROR_TAG]
    assert not checkpoints.path(bad.run_id).exists()
    assert tracker.run_record(good.run_id).status == "FINISHED"
    assert not checkpoints.path(good.run_id).exists()
    assert outcome.summary["test_elbo"] == -100.0 and outcome.summary["seconds"] >= 1.0
    assert outcome.final["val_elbo"] == -101.0
    client = MlflowClient(tracker.uri)
    assert sorted(a.path for a in client.list_artifacts(good.run_id)) == [
        "config.yaml", "state_dict.pt"]


def test_a_run_the_background_process_dies_with_is_killed_and_keeps_its_checkpoint(tmp_path):
    """Its rerun continues it after its last epoch; the runs after it are finished here."""
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_grid("finishing", "parent", {})
    checkpoints = CheckpointStore(tmp_path / "checkpoints")
    lost, later = _job(tracker, checkpoints, "lost"), _job(tracker, checkpoints, "later")
    finisher = BackgroundFinisher(tracker.uri)
    try:
        finishing = finisher.finish(lost, tracker)
        for process in multiprocessing.active_children():  # while it still starts up
            process.kill()
        assert isinstance(finishing.exception(timeout=120), BrokenProcessPool)
        with pytest.warns(RuntimeWarning, match="finished in this process from now on"):
            assert finisher.finish(later, tracker).result().run_id == later.run_id
    finally:
        finisher.close()
    killed = tracker.run_record(lost.run_id)
    assert killed.status == "KILLED" and killed.tags[ERROR_TAG] == LOST
    assert checkpoints.path(lost.run_id).read_bytes() == b"a checkpoint"
    assert tracker.run_record(later.run_id).status == "FINISHED"


@pytest.mark.slow
def test_a_ctrl_c_waits_for_the_runs_the_background_is_finishing(tmp_path, mnist_root):
    """Ctrl-C (SIGINT to the command's process group) once the first stack has trained: its
    runs end FINISHED after the signal (the background process ignores it, and the command
    waits for it), with their rows in the results table; the second stack's end KILLED."""
    (tmp_path / "grid.yaml").write_text(TWO_STACKS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*grid_args(tmp_path, uri, mnist_root, stack="auto"), "--post-run", "background"]
    command = Command(args, tmp_path, own_group=True)
    command.wait_for(r"^\[1/4\] stack of 2 .* 2 of 2 trained: its scores")
    command.ctrl_c()
    before = list(command.lines)
    assert command.finish(timeout=120) == 130, command.stderr
    assert "Traceback" not in command.stderr
    first = ["b1-adam-s0", "b4-adam-s0"]
    for name in first:  # finished, and said so, after the signal
        assert f"{name} FINISHED" in command.lines[len(before):], command.stderr
    runs = children(all_runs(uri, "finishing"))
    status = {r.info.run_name: r.info.status for r in runs}
    assert [status[name] for name in first] == ["FINISHED", "FINISHED"], status
    assert {s for name, s in status.items() if name not in first} <= {"KILLED"}
    assert not any(
        (tmp_path / "checkpoints" / f"{r.info.run_id}.pt").exists()
        for r in runs if r.info.run_name in first
    )
    # the results table after the signal is the store's: the finished runs are in it
    table = pd.read_csv(tmp_path / "results" / "finishing.csv").set_index("name")
    assert list(table.loc[first, "status"]) == ["FINISHED", "FINISHED"]
    assert table.loc[first, "test_nmi"].notna().all()


@pytest.mark.slow
def test_each_worker_process_finishes_its_runs_in_the_background(tmp_path, mnist_root):
    """With --workers (as on a GPU, where each worker is pinned to one) each worker hands its
    trained runs to a background process of its own."""
    (tmp_path / "grid.yaml").write_text(TWO_STACKS.replace("epochs: 30", "epochs: 2"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*grid_args(tmp_path, uri, mnist_root, stack="auto"), "--post-run", "background",
            "--workers", "2"]
    command = Command(args, tmp_path)
    assert command.finish(timeout=300) == 0, command.stderr
    assert command.stderr.count("2 of 2 trained: its scores, pictures and artifacts follow") == 2
    runs = children(all_runs(uri, "finishing"))
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    assert all("test_nmi" in r.data.metrics for r in runs)
    table = pd.read_csv(tmp_path / "results" / "finishing.csv")
    assert list(table["status"]) == ["FINISHED"] * 4


def test_where_runs_are_finished(tmp_path):
    """``auto`` finishes inline on the CPU (measured faster there); a wrong choice is one
    line."""
    (tmp_path / "grid.yaml").write_text(GRID)
    cpu = expand(load_grid(tmp_path / "grid.yaml"))
    assert background_finishing("auto", cpu) is False
    assert background_finishing("background", cpu) is True
    assert background_finishing("inline", cpu) is False
    with pytest.raises(VaebenchError, match="--post-run: one of auto, background, inline"):
        background_finishing("elsewhere", cpu)
