"""Beyond one process: worker slots and devices, claims among real processes, ``run
--workers`` and simultaneous invocations on SQLite, and a real PostgreSQL server behind an
MLflow server (grid workers, two ``tune`` processes on one Optuna study)."""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from commands import Command, all_runs, assert_each_variant_finished_once, children, grid_args
from conftest import mlflow_server
from hypothesis import given
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from postgres import addresses_on, postgres_server

from vaebench.execution.worker_plan import WorkerSlot, parse_workers, plan_workers, visible_gpus
from vaebench.execution.worker_processes import start_group
from vaebench.lifecycle.claims import (
    CLAIM_TAG,
    EXPIRES_TAG,
    OWNER_TAG,
    abandoned,
    lease_tags,
    set_task,
)
from vaebench.lifecycle.exactly_once import CLAIMED_AT_TAG, claim_holds, claim_run, stamp
from vaebench.spec.config import VaebenchError
from vaebench.spec.grid import expand, load_grid
from vaebench.tracking.tracker import MLflowTracker

GRID = """
name: spread
base:
  data: {subset: 3000, validation: 1000}
  model: {hidden: [64], z_dim: 4}
  train: {epochs: 2, batch_size: 64, eval_batch_size: 1000, device: cpu}
matrix:
  loss.beta: [1, 4]
seeds: [0, 1]
"""
VARIANTS = 4

STUDY = """
name: shared-pg
base:
  data: {subset: 3000, validation: 1000}
  model: {hidden: [64], z_dim: 4}
  train: {epochs: 2, batch_size: 64, eval_batch_size: 1000, device: cpu}
space:
  loss.beta: {type: float, low: 0.5, high: 4.0}
objectives:
  - {metric: val_elbo, direction: maximize}
sampler: random
pruner: none
seed: 0
n_trials: 2
"""


# ---------------------------------------------------------------------------
# which worker runs where (the GPU paths CI cannot run)


def test_auto_puts_per_gpu_workers_on_each_visible_gpu():
    slots = plan_workers("auto", 4, ["0", "1"], cpu_cores=16)
    assert [slot.gpu for slot in slots] == ["0"] * 4 + ["1"] * 4
    assert [slot.index for slot in slots] == list(range(8))
    assert {slot.threads for slot in slots} == {2}


def test_auto_without_a_gpu_is_one_worker_with_every_core():
    assert plan_workers("auto", None, [], cpu_cores=2) == [WorkerSlot(0, None, 2)]


def test_a_number_of_workers_takes_the_gpus_in_turn():
    slots = plan_workers(3, None, ["4", "6"], cpu_cores=2)
    assert [slot.gpu for slot in slots] == ["4", "6", "4"]
    assert {slot.threads for slot in slots} == {1}  # at least one thread each
    assert [slot.gpu for slot in plan_workers(2, None, [], cpu_cores=8)] == [None, None]


def test_visible_gpus_are_named_as_cuda_visible_devices_names_them():
    assert visible_gpus(2, {}) == ["0", "1"]
    assert visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "4,6"}) == ["4", "6"]
    assert visible_gpus(1, {"CUDA_VISIBLE_DEVICES": "GPU-3f2a, GPU-9b1c"}) == ["GPU-3f2a"]
    assert visible_gpus(0, {"CUDA_VISIBLE_DEVICES": ""}) == []


@given(
    gpus=st.lists(st.sampled_from("0123456789"), min_size=1, max_size=8, unique=True),
    per_gpu=st.integers(1, 8),
    cpu_cores=st.integers(1, 64),
)
def test_auto_gives_every_gpu_exactly_per_gpu_workers(gpus, per_gpu, cpu_cores):
    slots = plan_workers("auto", per_gpu, gpus, cpu_cores)
    assert len(slots) == len(gpus) * per_gpu
    assert all([slot.gpu for slot in slots].count(gpu) == per_gpu for gpu in gpus)
    assert all(slot.threads == max(1, cpu_cores // len(slots)) for slot in slots)


@pytest.mark.parametrize(
    ("workers", "per_gpu", "fragment"),
    [(2, 4, "--per-gpu goes with --workers auto"), (0, None, ">= 1"), ("auto", 0, "--per-gpu")],
)
def test_worker_options_that_make_no_sense_are_one_line_errors(workers, per_gpu, fragment):
    with pytest.raises(VaebenchError, match=fragment):
        plan_workers(workers, per_gpu, ["0"], cpu_cores=2)


def test_workers_option_text():
    assert parse_workers("auto") == "auto" and parse_workers("3") == 3
    for wrong in ("0", "-1", "two", ""):
        with pytest.raises(VaebenchError, match="--workers"):
            parse_workers(wrong)


@given(workers=st.integers(1, 16), groups=st.integers(0, 64))
def test_workers_start_spread_over_the_stacks(workers, groups):
    starts = [start_group(worker, workers, groups) for worker in range(workers)]
    assert starts == sorted(starts) and all(0 <= s < max(groups, 1) for s in starts)
    if groups >= workers:
        assert len(set(starts)) == workers  # no two workers begin on the same stack


# ---------------------------------------------------------------------------
# claims among real processes


def _claim_in_process(uri: str, experiment_id: str, parent: str, grid: str, ready, out) -> None:
    tracker = MLflowTracker(uri)
    tracker.join_grid(experiment_id, parent)
    run = expand(load_grid(grid))[0]
    ready.wait()  # all six claim at the same moment
    won = claim_run(tracker, "spread", run, {"vaebench.grid": "spread"}, settle=0.01)
    out.put(won.run_id if won else None)


def _store_with_parent(tmp_path: Path) -> tuple[str, MLflowTracker, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri)
    parent = tracker.start_grid("spread", "spread-parent", {})
    return uri, tracker, parent


def test_of_six_processes_claiming_one_run_at_once_exactly_one_wins(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    uri, tracker, parent = _store_with_parent(tmp_path)
    context = multiprocessing.get_context("spawn")
    out, ready = context.Queue(), context.Barrier(6)
    processes = [
        context.Process(target=_claim_in_process,
                        args=(uri, tracker.experiment_id, parent, str(grid), ready, out))
        for _ in range(6)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * 6
    claims = [out.get(timeout=5) for _ in processes]
    winners = [claim for claim in claims if claim is not None]
    assert len(winners) == 1
    key = expand(load_grid(grid))[0].key
    live = tracker.previous_runs("spread", "vaebench.run_key", key)  # deleted runs left out
    assert [record.run_id for record in live] == winners
    assert live[0].status == "RUNNING" and CLAIMED_AT_TAG in live[0].tags


def test_a_claim_waits_for_an_unstamped_claim_and_the_earlier_stamp_wins(tmp_path):
    """B's claim run is in the store but not yet stamped when A reads: A waits. B stamps
    after A (as it must: B stamps only once its run is stored), so A wins and B loses."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    _, tracker, _ = _store_with_parent(tmp_path)
    run = expand(load_grid(grid))[0]
    tags = {"vaebench.grid": "spread", "vaebench.run_key": run.key, **lease_tags()}
    b = tracker.start_run(run.name, run.params, tags)  # B, between creating and stamping
    a = tracker.start_run(run.name, run.params, tags)
    tracker.set_tags(a, stamp())
    timer = threading.Timer(0.5, lambda: tracker.set_tags(b, stamp()))
    started = time.monotonic()
    timer.start()
    assert claim_holds(tracker, "spread", run.key, a, settle=0.01)
    assert time.monotonic() - started >= 0.45  # it waited for B's stamp
    assert not claim_holds(tracker, "spread", run.key, b, settle=0.01)


def test_a_claim_loses_to_a_finished_run_and_to_an_earlier_live_claim(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    _, tracker, _ = _store_with_parent(tmp_path)
    run = expand(load_grid(grid))[0]
    tags = {"vaebench.grid": "spread"}
    first = claim_run(tracker, "spread", run, tags, settle=0.01)
    assert first is not None
    assert claim_run(tracker, "spread", run, tags, settle=0.01) is None  # the live one holds
    tracker.end_run(first.run_id, "FINISHED")
    assert claim_run(tracker, "spread", run, tags, settle=0.01) is None  # finished already
    since = int(time.time() * 1000) + 5
    time.sleep(0.02)  # a --rerun invocation that started after that run finished
    again = claim_run(tracker, "spread", run, tags, settle=0.01, since_ms=since, rerun=True)
    assert again is not None and again.run_id != first.run_id
    tracker.end_run(again.run_id, "FAILED")  # failed during the invocation: not again
    assert claim_run(tracker, "spread", run, tags, settle=0.01, since_ms=since, rerun=True) is None
    # a continuation's claim is a run of its own, tagged with the run it continues; a
    # second continuation of the same stopped run loses to it
    other = expand(load_grid(grid))[1]
    stopped = claim_run(tracker, "spread", other, tags, settle=0.01).run_id
    tracker.end_run(stopped, "KILLED")
    claim = claim_run(tracker, "spread", other, tags, settle=0.01, continues=stopped)
    assert claim is not None and claim.run_id != stopped
    assert claim_run(tracker, "spread", other, tags, settle=0.01, continues=stopped) is None
    record = next(r for r in tracker.previous_runs("spread", "vaebench.run_key", other.key)
                  if r.run_id == claim.run_id)
    assert record.tags[CLAIM_TAG] == stopped


def test_a_retried_task_takes_over_the_runs_its_dead_attempt_left():
    """A Ray task run again gets the same name: a run held by another process under that
    name is abandoned at once, whatever host held it; another task's run is not."""
    far = str(time.time() + 3600)
    set_task("parent-3")
    try:
        assert abandoned(lease_tags()) is None  # this attempt's own lease
        attempt = {OWNER_TAG: "node-b:1234:99:parent-3", EXPIRES_TAG: far}
        assert "earlier attempt of task parent-3 (node-b:1234) ended" in abandoned(attempt)
        assert abandoned({OWNER_TAG: "node-b:1234:99:parent-4", EXPIRES_TAG: far}) is None
    finally:
        set_task(None)
    assert abandoned({OWNER_TAG: "node-b:1234:99:parent-3", EXPIRES_TAG: far}) is None


def test_a_live_process_on_this_host_keeps_its_run_though_its_lease_expired():
    """On this host a live owner is asked directly (a lease is renewed only between
    epochs); on another host an expired lease is all there is to go by."""
    late = str(time.time() - 1)
    assert abandoned({**lease_tags(), EXPIRES_TAG: late}) is None
    assert "expired" in abandoned({OWNER_TAG: "node-b:1234:99", EXPIRES_TAG: late})


# ---------------------------------------------------------------------------
# whole grids, real processes


def assert_one_parent_holds_every_run(runs: list) -> None:
    parents = [r for r in runs if "vaebench.run_key" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = {r.data.tags.get("mlflow.parentRunId") for r in children(runs)}
    assert nested == {parents[0].info.run_id}


@pytest.mark.slow
def test_two_workers_train_every_run_once_under_one_parent(tmp_path, mnist_root):
    (tmp_path / "grid.yaml").write_text(GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = Command(grid_args(tmp_path, uri, mnist_root, "--workers", "2"), tmp_path)
    assert command.finish() == 0, command.stderr
    runs = all_runs(uri, "spread")
    assert_each_variant_finished_once(runs, VARIANTS)
    assert_one_parent_holds_every_run(runs)
    assert len(children(runs)) == VARIANTS  # no leftover claim
    for worker in ("w0", "w1"):  # each worker trained, and said which run
        assert any(line.startswith(f"{worker} [") and " epoch 2/2 " in line
                   for line in command.lines), command.stderr
    counts = re.findall(r"^grid spread: (\d+) of (\d+) runs done", command.stderr, re.M)
    assert counts == [(str(n), str(VARIANTS)) for n in range(1, VARIANTS + 1)]
    table = pd.read_csv(tmp_path / "results" / "spread.csv")
    assert list(table["status"]) == ["FINISHED"] * VARIANTS
    assert table["test_elbo"].notna().all()


@pytest.mark.slow
def test_a_failing_run_fails_once_and_no_other_worker_trains_it(tmp_path, mnist_root):
    """Two of four runs diverge (lr 1e12): each is FAILED once, in one run; the workers that
    come to it later skip it as failed during this invocation; exit status 1."""
    grid = GRID.replace("  loss.beta: [1, 4]", "  optim.lr: [1.0e-3, 1.0e12]")
    (tmp_path / "grid.yaml").write_text(grid)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = Command(grid_args(tmp_path, uri, mnist_root, "--workers", "2"), tmp_path)
    assert command.finish() == 1, command.stderr
    runs = all_runs(uri, "spread")
    keys = [r.data.tags["vaebench.run_key"] for r in children(runs)]
    assert len(keys) == len(set(keys)) == VARIANTS  # one run per key, claims deleted
    statuses = sorted(r.info.status for r in children(runs))
    assert statuses == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    table = pd.read_csv(tmp_path / "results" / "spread.csv")
    assert sorted(table["status"]) == statuses
    assert command.stdout.count("FAILED ") >= 2


@pytest.mark.slow
def test_two_invocations_of_one_grid_at_once_train_every_run_once(tmp_path, mnist_root):
    (tmp_path / "grid.yaml").write_text(GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # both on a fresh SQLite file: they take turns creating its schema (a lock file)
    first, second = (
        Command(grid_args(tmp_path, uri, mnist_root, "--results-dir", str(tmp_path / name)),
                tmp_path)
        for name in ("first", "second")
    )
    assert first.finish() == 0, first.stderr
    assert second.finish() == 0, second.stderr
    runs = all_runs(uri, "spread")
    finished = assert_each_variant_finished_once(runs, VARIANTS)
    assert len(children(runs)) == VARIANTS
    trained_by = [
        {r.info.run_id for r in finished.values()
         if r.data.tags["mlflow.parentRunId"] == parent.info.run_id}
        for parent in runs if "vaebench.run_key" not in parent.data.tags
    ]
    assert sum(len(ids) for ids in trained_by) == VARIANTS
    skipped = first.stderr.count(" skipped: ") + second.stderr.count(" skipped: ")
    assert skipped == VARIANTS  # each run trained by one, skipped by the other


# ---------------------------------------------------------------------------
# PostgreSQL behind an MLflow server, and an Optuna study on PostgreSQL


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server with a database for MLflow and one for Optuna, and an MLflow
    server whose backend store is the first; all on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("pg-mlflow")
    with postgres_server(("mlflow", "optuna")) as urls:
        with mlflow_server(urls["mlflow"], folder / "server.log", cwd=folder) as server_url:
            yield {**urls, "server": server_url, "folder": folder}


def assert_loopback_only(postgres) -> None:
    ports = {int(postgres["port"]), int(postgres["server"].rsplit(":", 1)[1])}
    addresses = addresses_on(ports)
    assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), addresses


@pytest.mark.slow
def test_two_workers_on_a_postgresql_backed_server_train_every_run_once(
    tmp_path, mnist_root, postgres
):
    (tmp_path / "grid.yaml").write_text(GRID)
    uri = postgres["server"]
    command = Command(grid_args(tmp_path, uri, mnist_root, "--workers", "2"), tmp_path)
    assert_loopback_only(postgres)
    assert command.finish() == 0, command.stderr
    runs = all_runs(uri, "spread")
    assert_each_variant_finished_once(runs, VARIANTS)
    assert_one_parent_holds_every_run(runs)
    assert len(children(runs)) == VARIANTS
    for run in children(runs):  # the artifacts went through the server
        names = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
        assert "config.yaml" in names


@pytest.mark.slow
def test_two_tune_processes_share_one_study_on_postgresql(tmp_path, mnist_root, postgres):
    (tmp_path / "study.yaml").write_text(STUDY)
    args = [
        "tune", str(tmp_path / "study.yaml"), "--tracking-uri", postgres["server"],
        "--data-root", str(mnist_root), "--storage", postgres["optuna"], "--n-trials", "2",
    ]
    # the study is created by the first; the second joins it (create_study load_if_exists)
    commands = [
        Command([*args, "--results-dir", str(tmp_path / name)], tmp_path) for name in "ab"
    ]
    assert_loopback_only(postgres)
    for command in commands:
        assert command.finish() == 0, command.stderr
    study = optuna.load_study(study_name="shared-pg", storage=postgres["optuna"])
    assert len(study.trials) == 4
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    runs = all_runs(postgres["server"], "shared-pg")
    parents = [r for r in runs if r.data.tags.get("vaebench.run_key") is None
               and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    trial_runs = {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(trial_runs) == 4
    for trial in study.trials:  # each trial is exactly one FINISHED MLflow run, and agrees
        run = trial_runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val_elbo"] == pytest.approx(trial.value)
