"""An invocation's reads of the store stay as short as the invocation, however many runs of
its grid the store holds (issue 30): a rerun's plan and claims read only the runs they count,
and the report of one invocation reads that invocation. Each on a real SQLite store, the
decisions compared with those made from the whole history."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from vaebench.cli import main
from vaebench.execution.grid_work import GRID_TAG
from vaebench.lifecycle.claims import KEEPER, lease_tags, plan
from vaebench.lifecycle.exactly_once import (
    CLAIMED_AT_TAG,
    CLOCK_MARGIN_MS,
    claim_run,
    counted_since,
)
from vaebench.reporting import runs as report_runs
from vaebench.spec.grid import expand, load_grid
from vaebench.tracking import searches
from vaebench.tracking.searches import PARENT_TAG
from vaebench.tracking.tracker import RUN_KEY_TAG, MLflowTracker, RunRecord

GRID = """
name: history
base:
  data: {subset: 256, validation: 256}
  model: {hidden: [16], z_dim: 2}
  train: {epochs: 1, batch_size: 128, device: cpu}
seeds: [0, 1]
"""
HOUR_MS = 3_600_000


def stored(
    tracker: MLflowTracker, key: str, status: str, started_ms: int, tags: dict | None = None
) -> str:
    """A run of ``key`` in the grid's experiment, begun at ``started_ms``, ended ``status``."""
    run = tracker.client.create_run(
        tracker.experiment_id, start_time=started_ms,
        tags={GRID_TAG: "history", RUN_KEY_TAG: key, **(tags or {})},
    )
    if status != "RUNNING":
        tracker.client.set_terminated(run.info.run_id, status, end_time=started_ms + 1000)
    return run.info.run_id


def runs_built(monkeypatch) -> list[str]:
    """The ids of the runs vaebench's searches take from MLflow from now on, as read."""
    built: list[str] = []
    runs_found = searches.runs_found

    def counted(*args):
        for run in runs_found(*args):
            built.append(run.info.run_id)
            yield run

    monkeypatch.setattr(searches, "runs_found", counted)
    return built


@pytest.fixture
def store(tmp_path: Path) -> MLflowTracker:
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_grid("history", "earlier", {GRID_TAG: "history"})
    return tracker


def test_previous_runs_reads_only_the_runs_asked_for(store: MLflowTracker):
    now = int(time.time() * 1000)
    old = [stored(store, "k", status, now - 2 * HOUR_MS + number)
           for number, status in enumerate(("FINISHED", "KILLED", "FAILED", "RUNNING"))]
    new = [stored(store, "k", status, now + 10 + number)
           for number, status in enumerate(("FINISHED", "KILLED"))]
    every = [r.run_id for r in store.previous_runs("history", RUN_KEY_TAG, "k")]
    assert every == old + new  # oldest first
    since = store.previous_runs("history", RUN_KEY_TAG, "k", begun_since_ms=now)
    assert [r.run_id for r in since] == new
    unfinished = store.previous_runs("history", RUN_KEY_TAG, "k", unfinished_only=True)
    assert [r.run_id for r in unfinished] == [old[1], old[2], old[3], new[1]]
    assert store.previous_runs("history", RUN_KEY_TAG, "other") == []


def test_only_a_rerun_counts_from_its_start_less_the_clock_margin():
    assert counted_since(10 * HOUR_MS, rerun=True) == 10 * HOUR_MS - CLOCK_MARGIN_MS
    assert counted_since(10 * HOUR_MS, rerun=False) == 0
    assert counted_since(0, rerun=True) == 0  # the invocation's start unknown: all


# each case: the runs of the key already stored (status, ms before the invocation began)
HISTORIES = {
    "finished long ago": [("FINISHED", 2 * HOUR_MS)] * 5,
    "finished within the margin": [("FINISHED", CLOCK_MARGIN_MS // 2)],
    "finished during the invocation": [("FINISHED", 2 * HOUR_MS), ("FINISHED", -50)],
    "failed long ago and during it": [("FAILED", HOUR_MS), ("FAILED", -50)],
    "a live claim stamped during it": [("RUNNING", -50)],
    "killed and finished long ago": [("KILLED", 2 * HOUR_MS), ("FINISHED", HOUR_MS)],
}


def claim_decided(tmp_path: Path, history: str, rerun: bool, filtered: bool, monkeypatch):
    """Whether a claim of the grid's first run wins on a store holding ``history``, and how
    many runs its reading returned; ``filtered`` False: reading the key's whole history."""
    tmp_path.mkdir()
    (tmp_path / "history.yaml").write_text(GRID)
    run = expand(load_grid(tmp_path / "history.yaml"))[0]
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_grid("history", "invocation", {GRID_TAG: "history"})
    since_ms = int(time.time() * 1000) - 1000
    for status, before in HISTORIES[history]:
        live = {**lease_tags(), CLAIMED_AT_TAG: str((since_ms - before) * 1000)}
        stored(tracker, run.key, status, since_ms - before, live if status == "RUNNING" else {})
    read: list[int] = []
    previous_runs = tracker.previous_runs

    def reading(name, tag, value, **filters):
        records = previous_runs(name, tag, value, **(filters if filtered else {}))
        read.append(len(records))
        return records

    monkeypatch.setattr(tracker, "previous_runs", reading)
    # as a worker plans the run again just before claiming it (grid_work.as_stored_now)
    counted = reading("history", RUN_KEY_TAG, run.key,
                      begun_since_ms=counted_since(since_ms, rerun))
    action = plan([run], counted, rerun, since_ms)[0].action
    claim = claim_run(tracker, "history", run, {GRID_TAG: "history"}, 0.0, since_ms, rerun)
    if claim is not None:
        KEEPER.let_go(claim.run_id)
    return (action, claim is not None), read


@pytest.mark.parametrize("rerun", [True, False])
@pytest.mark.parametrize("history", list(HISTORIES))
def test_a_claim_decides_as_it_would_on_the_whole_history(history, rerun, tmp_path, monkeypatch):
    """The same history in two stores: the claim that reads only what it counts decides as
    the one that reads every run of its key, and on a rerun reads fewer where runs are old."""
    wins, read = claim_decided(tmp_path / "filtered", history, rerun, True, monkeypatch)
    wins_whole, read_whole = claim_decided(tmp_path / "whole", history, rerun, False,
                                           monkeypatch)
    assert wins == wins_whole
    long_ago = sum(before > CLOCK_MARGIN_MS for _, before in HISTORIES[history])
    assert read == [n - (long_ago if rerun else 0) for n in read_whole]
    action, wins = wins
    assert wins == {  # the verdicts themselves, as the protocol states them
        "finished long ago": rerun, "finished within the margin": rerun,
        "finished during the invocation": False, "failed long ago and during it": False,
        "a live claim stamped during it": False, "killed and finished long ago": rerun,
    }[history]


def test_a_claim_begun_by_a_clock_behind_the_invocation_still_decides(store, tmp_path):
    """A worker whose clock runs behind the invocation's by more than the margin: its claim
    begins, by its clock, before the runs the rerun reads; it still finds itself and wins."""
    (tmp_path / "history.yaml").write_text(GRID)
    run = expand(load_grid(tmp_path / "history.yaml"))[0]
    ahead = int(time.time() * 1000) + 2 * CLOCK_MARGIN_MS  # the invocation's clock
    claim = claim_run(store, "history", run, {GRID_TAG: "history"}, 0.0, ahead, rerun=True)
    assert claim is not None
    KEEPER.let_go(claim.run_id)


def test_latest_finished_is_the_latest_the_whole_history_holds(store, monkeypatch):
    """Each key's latest FINISHED run, as the plan takes it from every run read oldest first
    (the last: latest start, then greatest run id), read without the whole history: a key
    finished long ago behind another's long history, one never finished, one whose latest
    runs began in the same millisecond, one finished during the last invocation."""
    now = int(time.time() * 1000)
    for number in range(40):
        stored(store, "often", "FINISHED", now - HOUR_MS + number)
    stored(store, "often", "FINISHED", now - 10)
    stored(store, "long ago", "FINISHED", now - 5 * HOUR_MS)
    stored(store, "long ago", "KILLED", now - 20)
    stored(store, "never", "KILLED", now - 30)
    for _ in range(3):
        stored(store, "same moment", "FINISHED", now - 40)
    stored(store, "same moment", "FINISHED", now - 2 * HOUR_MS)
    keys = ["often", "long ago", "never", "same moment"]
    every = store.previous_runs("history", GRID_TAG, "history")
    expected = {r.key: r.run_id for r in every if r.status == "FINISHED" and r.key in keys}

    built = runs_built(monkeypatch)
    latest = store.latest_finished("history", GRID_TAG, "history", keys)
    assert {r.key: r.run_id for r in latest} == expected
    assert set(expected) == {"often", "long ago", "same moment"}
    assert len(built) < len(every) // 2  # not the 40 runs of "often" before its latest


def test_a_rerun_and_its_report_read_the_invocation_not_the_history(
    tmp_path: Path, mnist_root, monkeypatch, capsys
):
    """A grid with a long history (30 earlier runs of each key, all FINISHED): a rerun trains
    every run again, its plan reads no finished run, its claims only runs of the invocation,
    and its report and registered model come from the invocation's runs alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = tmp_path / "history.yaml"
    grid.write_text(GRID)
    arguments = ["run", str(grid), "--tracking-uri", uri, "--data-root", str(mnist_root),
                 "--results-dir", str(tmp_path / "results")]
    assert main(arguments) == 0
    tracker = MLflowTracker(uri)
    tracker.experiment_id = tracker.client.get_experiment_by_name("history").experiment_id
    keys = [run.key for run in expand(load_grid(grid))]
    earlier = int(time.time() * 1000) - 2 * HOUR_MS
    history = {stored(tracker, key, "FINISHED", earlier + number)
               for key in keys for number in range(30)}

    reads: list[tuple[str, list[RunRecord]]] = []
    previous_runs = MLflowTracker.previous_runs

    def counting(self, name, tag, value, **filters):
        records = previous_runs(self, name, tag, value, **filters)
        reads.append((tag, records))
        return records

    frames: list[pd.DataFrame] = []
    stored_frame = report_runs.stored_frame

    def kept(*args):
        frames.append(stored_frame(*args))
        return frames[-1]

    monkeypatch.setattr(MLflowTracker, "previous_runs", counting)
    monkeypatch.setattr(report_runs, "stored_frame", kept)
    built = runs_built(monkeypatch)  # every run MLflow builds for vaebench's reads from now
    assert main([*arguments, "--rerun"]) == 0
    assert built and not history & set(built)

    [(_, planned_from)] = [(tag, records) for tag, records in reads if tag == GRID_TAG]
    assert planned_from == []  # the first invocation's parent and runs all FINISHED
    claim_reads = [records for tag, records in reads if tag == RUN_KEY_TAG]
    assert len(claim_reads) == 2 * len(keys)  # each key: planned again, then its claim
    # the first invocation's run of the key (a minute ago at most) and the claim; not the
    # 30 earlier runs
    assert all(len(records) <= 2 for records in claim_reads)
    assert not history & {r.run_id for records in claim_reads for r in records}

    mlflow.set_tracking_uri(uri)
    every = mlflow.search_runs(experiment_names=["history"])
    parents = every[every["tags.mlflow.parentRunId"].isna()
                    & every["tags.vaebench.runs"].notna()].sort_values("start_time")
    latest = parents["run_id"].iloc[-1]
    [frame] = frames
    children = every[every["tags.mlflow.parentRunId"] == latest]
    assert sorted(frame["run_id"]) == sorted([latest, *children["run_id"]])
    assert len(children) == len(keys) and (children["status"] == "FINISHED").all()
    whole = report_runs.run_set_from_frame(every, "history", "1", uri)  # the latest, by then
    alone = report_runs.run_set_from_frame(frame, "history", "1", uri, parent_id=latest)
    assert list(whole.parents["run_id"]) == list(alone.parents["run_id"]) == [latest]
    assert whole.repeats == alone.repeats == 0
    columns = [c for c in alone.runs.columns if c in whole.runs.columns]
    pd.testing.assert_frame_equal(
        alone.runs[columns].sort_values("run_id").reset_index(drop=True),
        whole.runs[columns].sort_values("run_id").reset_index(drop=True),
        check_dtype=False,
    )
    versions = tracker.client.search_model_versions("name='history'")
    assert max(versions, key=lambda v: int(v.version)).run_id in set(children["run_id"])

    # two worker processes: the rows this process reads back at the end are the rerun's,
    # read as the runs under its parent
    reads.clear()
    built.clear()
    assert main([*arguments, "--rerun", "--workers", "2", "--no-report", "--no-register"]) == 0
    [under] = [records for tag, records in reads if tag == PARENT_TAG]
    assert not history & set(built)
    assert sorted(r.key for r in under) == sorted(keys)
    [parent_id] = {r.tags[PARENT_TAG] for r in under}
    table = pd.read_csv(tmp_path / "results" / "history.csv")
    assert list(table["status"]) == ["FINISHED"] * len(keys)
    assert sorted(table["run_id"]) == sorted(r.run_id for r in under)

    # `vaebench report history`: the latest invocation, found reading the newest runs first
    frames.clear()
    assert main(["report", "history", "--tracking-uri", uri,
                 "--results-dir", str(tmp_path / "report")]) == 0
    [frame] = frames
    assert sorted(frame["run_id"]) == sorted([parent_id, *(r.run_id for r in under)])

    # the grid again without --rerun: nothing to train, learnt from each key's latest
    # FINISHED run, read newest first; the results table holds those runs
    built.clear()
    capsys.readouterr()
    assert main(arguments) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert built and not history & set(built)
    table = pd.read_csv(tmp_path / "results" / "history.csv")
    latest = {r.key: r for r in under}
    assert [latest[key].run_id for key in keys] == list(table["run_id"])
    assert list(table["status"]) == ["FINISHED"] * len(keys)
