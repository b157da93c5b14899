"""Grids and studies that survive: SIGKILL and resume, SIGINT/SIGTERM, a tracking server that
dies mid-grid. Each test drives the real command in a subprocess against a real store."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from commands import (
    Command,
    all_runs,
    assert_each_variant_finished_once,
    children,
    grid_args,
    steps,
    study_args,
)
from conftest import start_mlflow_server, stop_server
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback

pytestmark = pytest.mark.slow

GRID = """
name: survive
base:
  data: {subset: 6000, validation: 1000}
  model: {hidden: [64], z_dim: 4}
  train: {epochs: 4, batch_size: 32, eval_batch_size: 1000, device: cpu}
matrix:
  loss.beta: [1, 4]
seeds: [0]
"""

STUDY = """
name: survive-study
base:
  data: {subset: 3000, validation: 1000}
  model: {hidden: [64], z_dim: 4}
  train: {epochs: 3, batch_size: 32, eval_batch_size: 1000, device: cpu}
space:
  loss.beta: {type: float, low: 0.5, high: 4.0}
objectives:
  - {metric: val_elbo, direction: maximize}
sampler: random
pruner: none
seed: 0
n_trials: 2
"""


def stop_when(
    path: Path, text: str, args: list[str], pattern: str, *signals: int
) -> tuple[Command, float]:
    """Write the grid or study file, start the command, send ``signals`` (50 ms apart) once a
    stderr line matches ``pattern``; returns the command and when the first signal went."""
    path.write_text(text)
    command = Command(args, path.parent)
    command.wait_for(pattern)
    sent = time.monotonic()
    for index, signum in enumerate(signals):
        if index:
            time.sleep(0.05)
        command.process.send_signal(signum)
    return command, sent


def test_a_sigkilled_stack_continues_each_member_alone(tmp_path, mnist_root):
    """A stack of both runs SIGKILLed once its second epoch shows: the rerun marks both
    KILLED and continues each alone from its last checkpoint, in its own MLflow run."""
    (tmp_path / "grid.yaml").write_text(GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = Command(grid_args(tmp_path, uri, mnist_root, stack="auto"), tmp_path)
    killed.wait_for(r"^\[1/2\] stack of 2 \(\S+, \S+\) epoch 2/4 ")
    killed.process.send_signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    stranded = [r for r in children(all_runs(uri, "survive")) if r.info.status == "RUNNING"]
    assert len(stranded) == 2 and all(r.data.tags["vaebench.stack_size"] == "2" for r in stranded)
    for run in stranded:
        assert (tmp_path / "checkpoints" / f"{run.info.run_id}.pt").is_file()

    rerun = Command(grid_args(tmp_path, uri, mnist_root, stack="auto"), tmp_path)
    assert rerun.finish() == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    # each after its last checkpoint: the kill may fall between the members' epoch-2 writes
    continued = re.findall(r"^\[\d/2\] \S+ continues after epoch [12]$", rerun.stderr, re.M)
    assert len(continued) == 2, rerun.stderr[-3000:]
    finished = assert_each_variant_finished_once(all_runs(uri, "survive"), 2)
    assert {r.info.run_id for r in finished.values()} == {r.info.run_id for r in stranded}
    for run in finished.values():
        for metric in ("train_loss", "val_elbo", "epoch_seconds"):
            assert steps(uri, run.info.run_id, metric) == [1, 2, 3, 4]
    assert not list((tmp_path / "checkpoints").glob("*.pt"))

    # the same grid stacked, never interrupted: each member ends where its continuation did
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "grid.yaml").write_text(GRID)
    reference_uri = f"sqlite:///{tmp_path / 'reference' / 'mlflow.db'}"
    args = grid_args(tmp_path / "reference", reference_uri, mnist_root, stack="auto")
    assert Command(args, tmp_path).finish() == 0
    reference = assert_each_variant_finished_once(all_runs(reference_uri, "survive"), 2)
    for key, run in finished.items():
        theirs = reference[key].data.metrics["test_elbo"]
        assert abs(run.data.metrics["test_elbo"] - theirs) < 0.05, key


def test_sigkill_mid_epoch_then_rerun_continues_the_run(tmp_path, mnist_root):
    """Acceptance 1: a grid SIGKILLed inside an epoch of its second run, then rerun."""
    (tmp_path / "grid.yaml").write_text(GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = Command(grid_args(tmp_path, uri, mnist_root), tmp_path)
    started = time.monotonic()
    killed.wait_for(r"^\[2/2\] \S+ epoch 2/4 ")  # epoch 3 of run 2 is now training
    killed.process.send_signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    killed_after = time.monotonic() - started

    stranded = [r for r in children(all_runs(uri, "survive")) if r.info.status == "RUNNING"]
    assert len(stranded) == 1, "the killed run is left RUNNING by SIGKILL"
    stopped = stranded[0]
    checkpoint = tmp_path / "checkpoints" / f"{stopped.info.run_id}.pt"
    assert checkpoint.is_file()

    started = time.monotonic()
    rerun = Command(grid_args(tmp_path, uri, mnist_root), tmp_path)
    assert rerun.finish() == 0, rerun.stderr
    rerun_seconds = time.monotonic() - started
    assert "Traceback" not in rerun.stderr
    assert re.search(rf"{stopped.info.run_id}\) was left RUNNING \(its process \d+ .* is gone\)"
                     r": marked KILLED", rerun.stderr)
    assert re.search(r"^\[1/2\] \S+ skipped: FINISHED already in run", rerun.stderr, re.M)
    assert re.search(r"^\[2/2\] \S+ continues after epoch 2$", rerun.stderr, re.M)
    assert not re.search(r"^\[2/2\] \S+ epoch [12]/4", rerun.stderr, re.M)

    finished = assert_each_variant_finished_once(all_runs(uri, "survive"), 2)
    continued = finished[stopped.data.tags["vaebench.run_key"]]
    assert continued.info.run_id == stopped.info.run_id  # the same MLflow run
    for metric in ("train_loss", "val_elbo", "epoch_seconds"):
        assert steps(uri, continued.info.run_id, metric) == [1, 2, 3, 4]
    assert not checkpoint.exists(), "a finished run's checkpoint is removed"

    # the same grid, never interrupted, in another store: the same numbers, to the last bit
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "grid.yaml").write_text(GRID)
    reference_uri = f"sqlite:///{tmp_path / 'reference' / 'mlflow.db'}"
    started = time.monotonic()
    reference = Command(grid_args(tmp_path / "reference", reference_uri, mnist_root), tmp_path)
    assert reference.finish() == 0, reference.stderr
    reference_seconds = time.monotonic() - started
    same = assert_each_variant_finished_once(all_runs(reference_uri, "survive"), 2)
    twin = same[stopped.data.tags["vaebench.run_key"]]
    assert continued.data.metrics["test_elbo"] == twin.data.metrics["test_elbo"]
    for metric in ("val_elbo", "train_loss"):
        ours = MlflowClient(uri).get_metric_history(continued.info.run_id, metric)
        theirs = MlflowClient(reference_uri).get_metric_history(twin.info.run_id, metric)
        assert sorted((m.step, m.value) for m in ours) == sorted((m.step, m.value) for m in theirs)
    print(
        f"\nkill/resume timings: killed after {killed_after:.1f} s, rerun {rerun_seconds:.1f} s, "
        f"uninterrupted grid {reference_seconds:.1f} s"
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_grid_cleanly_and_the_rerun_completes_it(tmp_path, mnist_root, signum):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command, seconds = stop_when(
        tmp_path / "grid.yaml", GRID, grid_args(tmp_path, uri, mnist_root),
        r"^\[1/2\] \S+ epoch 1/4 ", signum,
    )
    assert command.finish(timeout=60) == 128 + signum
    assert time.monotonic() - seconds < 30
    name = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}[signum]
    assert "Traceback" not in command.stderr
    assert f"interrupted by {name}" in command.stderr.splitlines()[-1]
    assert "rerun the same command" in command.stderr.splitlines()[-1]

    runs = all_runs(uri, "survive")
    assert {r.info.status for r in runs} == {"KILLED"}  # the run and the parent
    killed = children(runs)[0]
    assert f"interrupted by {name}" in killed.data.tags["vaebench.error"]
    reason = killed.data.tags["vaebench.error"]
    assert re.search(r"checkpoint after epoch [12] continues it", reason)
    assert (tmp_path / "results" / "survive.csv").is_file()

    rerun = Command(grid_args(tmp_path, uri, mnist_root), tmp_path)
    assert rerun.finish() == 0, rerun.stderr
    finished = assert_each_variant_finished_once(all_runs(uri, "survive"), 2)
    assert killed.info.run_id in {r.info.run_id for r in finished.values()}
    assert steps(uri, killed.info.run_id, "val_elbo") == [1, 2, 3, 4]
    table = pd.read_csv(tmp_path / "results" / "survive.csv")
    assert list(table["status"]) == ["FINISHED", "FINISHED"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_study_cleanly_and_the_rerun_completes_it(tmp_path, mnist_root, signum):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command, _ = stop_when(
        tmp_path / "study.yaml", STUDY, study_args(tmp_path, uri, mnist_root),
        r"^\[1/2\] trial-0000 epoch 1/3 ", signum,
    )
    assert command.finish(timeout=60) == 128 + signum
    assert "Traceback" not in command.stderr
    runs = all_runs(uri, "survive-study")
    assert {r.info.status for r in runs} == {"KILLED"}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = optuna.load_study(study_name="survive-study", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
    assert "interrupted by" in trials[0].user_attrs["stopped"]

    rerun = Command(study_args(tmp_path, uri, mnist_root), tmp_path)
    assert rerun.finish() == 0, rerun.stderr
    trials = optuna.load_study(study_name="survive-study", storage=storage).trials
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2 and len(states) == 3
    runs = all_runs(uri, "survive-study")
    assert [r.info.status for r in runs].count("FINISHED") == 3  # 2 trials and the parent
    assert "RUNNING" not in {r.info.status for r in runs}

    again = Command(study_args(tmp_path, uri, mnist_root), tmp_path)  # nothing left to do
    assert again.finish() == 0
    assert "nothing to do" in again.stdout


def test_sigkill_of_a_study_fails_its_trial_on_the_rerun(tmp_path, mnist_root):
    (tmp_path / "study.yaml").write_text(STUDY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = Command(study_args(tmp_path, uri, mnist_root), tmp_path)
    command.wait_for(r"^\[1/2\] trial-0000 epoch 1/3 ")
    command.process.send_signal(signal.SIGKILL)
    command.finish()
    rerun = Command(study_args(tmp_path, uri, mnist_root), tmp_path)
    assert rerun.finish() == 0, rerun.stderr
    assert "trial 0 was left RUNNING" in rerun.stderr
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = optuna.load_study(study_name="survive-study", storage=storage).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert "trial 0 was left RUNNING (its process" in rerun.stderr
    assert [t.state for t in trials[1:]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0  # tried again
    assert trials[1].params == trials[0].params
    statuses = {r.info.run_name: r.info.status for r in all_runs(uri, "survive-study")}
    assert statuses["trial-0000"] == "KILLED" and "RUNNING" not in statuses.values()


def test_a_signal_stops_a_stack_of_trials_and_a_sigkill_leaves_them_to_the_rerun(
    tmp_path, mnist_root
):
    """Both trials of a stack: SIGTERM fails both (stopped, runs KILLED); SIGKILL leaves both
    RUNNING, and the rerun fails them as abandoned; each time the rerun completes 2 trials."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    stacked = study_args(tmp_path, uri, mnist_root, stack="auto")
    stack_epoch = r"^\[\d/\d\] stack of 2 \(trial-\d+, trial-\d+\) epoch 1/3 "
    command, _ = stop_when(tmp_path / "study.yaml", STUDY, stacked, stack_epoch, signal.SIGTERM)
    assert command.finish(timeout=60) == 128 + signal.SIGTERM
    assert "Traceback" not in command.stderr
    trials = optuna.load_study(study_name="survive-study", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("interrupted by SIGTERM" in t.user_attrs["stopped"] for t in trials)
    assert {r.info.status for r in all_runs(uri, "survive-study")} == {"KILLED"}

    killed = Command(stacked, tmp_path)  # 2 trials still to do: one stack of 2 again
    killed.wait_for(stack_epoch)
    killed.process.send_signal(signal.SIGKILL)
    killed.finish()
    rerun = Command(stacked, tmp_path)
    assert rerun.finish() == 0, rerun.stderr
    assert "trial 2 was left RUNNING" in rerun.stderr
    assert "trial 3 was left RUNNING" in rerun.stderr
    trials = optuna.load_study(study_name="survive-study", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL"] * 4 + ["COMPLETE"] * 2
    assert [RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials[4:]] == [2, 3]
    statuses = {r.info.run_name: r.info.status for r in all_runs(uri, "survive-study")}
    assert "RUNNING" not in statuses.values()
    assert [statuses[f"trial-{n:04d}"] for n in range(6)] == ["KILLED"] * 4 + ["FINISHED"] * 2


def test_tracking_server_dying_mid_grid_stops_it_and_the_rerun_completes_it(
    tmp_path, mnist_root
):
    """A real ``mlflow server`` killed while a grid logs to it."""
    (tmp_path / "grid.yaml").write_text(GRID)
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    server, url = start_mlflow_server(backend, tmp_path / "server.log", cwd=tmp_path)
    checkpoints = ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    try:
        command = Command(grid_args(tmp_path, url, mnist_root, *checkpoints), tmp_path)
        command.wait_for(r"^\[1/2\] \S+ epoch 2/4 ")
    finally:
        stop_server(server, signal.SIGKILL)
    died = time.monotonic()
    status = command.finish(timeout=120)
    noticed = time.monotonic() - died
    assert status == 75, command.stderr
    assert noticed < 30, f"the grid took {noticed:.0f} s to notice"
    assert "Traceback" not in command.stderr
    last = command.stderr.splitlines()[-1]
    assert last.startswith(f"vaebench: error: tracking store {url} failed")
    assert "Rerun the same command once the store answers" in last

    server, url = start_mlflow_server(backend, tmp_path / "server2.log", cwd=tmp_path)
    try:
        stranded = [r for r in children(all_runs(url, "survive")) if r.info.status == "RUNNING"]
        assert len(stranded) == 1
        rerun = Command(grid_args(tmp_path, url, mnist_root, *checkpoints), tmp_path)
        assert rerun.finish() == 0, rerun.stderr
        # epoch 2's line came after its log; epoch 3 may have been saved before the store died
        assert re.search(r"^\[1/2\] \S+ continues after epoch [23]$", rerun.stderr, re.M)
        finished = assert_each_variant_finished_once(all_runs(url, "survive"), 2)
        assert stranded[0].info.run_id in {r.info.run_id for r in finished.values()}
        assert steps(url, stranded[0].info.run_id, "val_elbo") == [1, 2, 3, 4]
    finally:
        stop_server(server)
    print(f"\nserver killed: the grid ended {noticed:.1f} s later with status 75")


def test_a_second_ctrl_c_exits_at_once_and_the_rerun_completes_the_grid(tmp_path, mnist_root):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command, sent = stop_when(
        tmp_path / "grid.yaml", GRID, grid_args(tmp_path, uri, mnist_root),
        r"^\[1/2\] \S+ epoch 1/4 ", signal.SIGINT, signal.SIGINT,
    )
    assert command.finish(timeout=60) == 130, command.stderr
    assert time.monotonic() - sent < 15
    assert "Traceback" not in command.stderr
    rerun = Command(grid_args(tmp_path, uri, mnist_root), tmp_path)
    assert rerun.finish() == 0, rerun.stderr
    assert_each_variant_finished_once(all_runs(uri, "survive"), 2)
