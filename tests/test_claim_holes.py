"""Holes in the claims that let work be lost or done twice, each closed (issue 28)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from vaebench.cli import main
from vaebench.lifecycle import claims
from vaebench.lifecycle.claims import CLAIM_TAG, EXPIRES_TAG, OWNER_TAG, abandoned, lease_tags
from vaebench.lifecycle.exactly_once import ClaimLost, claim_run
from vaebench.lifecycle.execute import Member, RunContext, execute
from vaebench.lifecycle.workspace import Workspace
from vaebench.spec.grid import expand, load_grid
from vaebench.tracking.tracker import RUN_KEY_TAG, MLflowTracker
from vaebench.training.checkpoint import CheckpointStore, default_folder
from vaebench.tuning import storage
from vaebench.tuning.trial import StaleTrials, TrialLease, fail_abandoned_trials, trials_done

GRID = """
name: holes
base:
  data: {subset: 256, validation: 256}
  model: {hidden: [16], z_dim: 2}
  train: {epochs: 2, batch_size: 128, device: cpu}
seeds: [0]
"""


def test_a_checkpoint_that_a_live_claim_names_is_kept(tmp_path: Path, mnist_root):
    """Another invocation has claimed a KILLED run to continue it (its claim run RUNNING,
    with a live lease): planning the grid again leaves that run to the claimant, and its
    checkpoint where the claimant will read it."""
    (tmp_path / "holes.yaml").write_text(GRID)
    [run] = expand(load_grid(tmp_path / "holes.yaml"))
    db = tmp_path / "mlflow.db"
    tracker = MLflowTracker(f"sqlite:///{db}")
    tracker.start_grid("holes", "earlier", {"vaebench.grid": "holes"})
    stopped = tracker.start_run(run.name, run.params, {"vaebench.grid": "holes",
                                                       RUN_KEY_TAG: run.key})
    tracker.end_run(stopped, "KILLED", "interrupted")
    checkpoints = CheckpointStore(default_folder(db))
    assert checkpoints.save(stopped, {"epoch": 1})
    claim_tags = {"vaebench.grid": "holes", RUN_KEY_TAG: run.key, CLAIM_TAG: stopped}
    tracker.start_run(run.name, {}, {**claim_tags, **lease_tags()})  # this process: alive

    status = main(["run", str(tmp_path / "holes.yaml"), "--tracking-uri", f"sqlite:///{db}",
                   "--data-root", str(mnist_root), "--results-dir", str(tmp_path / "results"),
                   "--no-report", "--no-register"])
    assert status == 0
    assert checkpoints.path(stopped).exists()


def stopped_run_and_claim(tmp_path: Path):
    """A grid's KILLED run and this process's claim to continue it."""
    (tmp_path / "holes.yaml").write_text(GRID)
    [run] = expand(load_grid(tmp_path / "holes.yaml"))
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_grid("holes", "earlier", {"vaebench.grid": "holes"})
    tags = {"vaebench.grid": "holes", RUN_KEY_TAG: run.key}
    stopped = tracker.start_run(run.name, run.params, tags)
    tracker.end_run(stopped, "KILLED", "interrupted")
    claim = tracker.start_run(run.name, {}, {**tags, CLAIM_TAG: stopped, **lease_tags()})
    return run, tracker, stopped, claim


@pytest.mark.parametrize("meanwhile", ["continued elsewhere", "claim taken away"])
def test_a_run_is_reopened_only_while_it_is_killed_and_the_claim_stands(
    meanwhile, tmp_path: Path, mnist_root
):
    """Between claiming a stopped run and reopening it, another host may have continued it
    (its claim judged abandoned, say): this process lets go and writes nothing to it."""
    run, tracker, stopped, claim = stopped_run_and_claim(tmp_path)
    other = {OWNER_TAG: "another-host:4242:1", EXPIRES_TAG: "9999999999"}
    if meanwhile == "continued elsewhere":
        tracker.reopen_run(stopped, other)
    else:
        tracker.delete_run(claim)
    before = tracker.run_record(stopped)
    workspace = Workspace(mnist_root, CheckpointStore(tmp_path / "checkpoints"))
    member = Member(run, continue_id=stopped, continue_claim=claim)
    with pytest.raises(ClaimLost):
        execute([member], tracker, workspace, RunContext({}, 1, 1))
    after = tracker.run_record(stopped)
    assert (after.status, after.tags) == (before.status, before.tags)


def test_a_claim_waiting_for_its_turn_keeps_its_lease(tmp_path: Path, monkeypatch):
    """A claimed run that waits (behind its group, or while its members are scored) is
    renewed without an epoch: its lease has not run out when another host looks."""
    monkeypatch.setattr(claims, "LEASE_SECONDS", 1.5)  # renewed every 0.5 s
    (tmp_path / "holes.yaml").write_text(GRID)
    [run] = expand(load_grid(tmp_path / "holes.yaml"))
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_grid("holes", "invocation", {"vaebench.grid": "holes"})
    claim = claim_run(tracker, "holes", run, {"vaebench.grid": "holes"}, settle=0.01)
    assert claim is not None
    time.sleep(3.0)  # two leases' worth of waiting
    tags = tracker.run_record(claim.run_id).tags
    assert float(tags[EXPIRES_TAG]) >= time.time()
    assert abandoned(tags, now=time.time()) is None
    tracker.end_run(claim.run_id, "FINISHED")
    time.sleep(1.0)  # the keeper lets go of a run that no longer runs
    assert claim.run_id not in claims.KEEPER.held


def _in_python(prefix: list[str], code: str) -> str:
    done = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip()


HIDDEN_PROC = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /proc && exec "$0" "$@"']
NEW_PID_NAMESPACE = ["unshare", "-p", "-f", "--mount-proc"]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare (util-linux) to hide /proc or start a pid namespace",
)


@needs_root
def test_liveness_without_proc():
    """Where /proc cannot be read (macOS; here: a tmpfs mounted over it), a live owner on
    this host still counts as alive, and a gone one as gone."""
    code = textwrap.dedent("""
        import json, subprocess, sys
        from vaebench.lifecycle.claims import abandoned, lease_tags, OWNER_TAG
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        mine = lease_tags()
        host, _, rest = mine[OWNER_TAG].partition(":")
        gone = {**mine, OWNER_TAG: f"{host}:{child.pid}:{rest.split(':', 1)[1]}"}
        print(json.dumps([abandoned(mine), abandoned(gone)]))
    """)
    alive, gone = json.loads(_in_python(HIDDEN_PROC, code))
    assert alive is None
    assert "is gone" in gone


@needs_root
def test_an_owner_in_another_container_with_the_same_host_name_is_judged_by_its_lease():
    """A process in another pid namespace (a container sharing this host name) is not looked
    up in this process table: its lease decides."""
    code = "import json; from vaebench.lifecycle.claims import lease_tags; " \
           "print(json.dumps(lease_tags()))"
    tags = json.loads(_in_python(NEW_PID_NAMESPACE, code))
    assert abandoned(tags) is None  # its lease runs: it may still be working
    assert "lease" in abandoned(tags, now=float(tags[EXPIRES_TAG]) + 1)


def _heartbeat_study(tmp_path: Path, monkeypatch) -> optuna.Study:
    """A study on a real RDB storage (SQLite) whose trials beat every second, stale after 3."""
    monkeypatch.setattr(storage, "HEARTBEAT_SECONDS", 1)
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    opened = storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", StaleTrials(tracker))
    return optuna.create_study(study_name="beats", storage=opened)


def test_a_stacked_trial_beats_while_held_and_goes_stale_when_let_go(tmp_path, monkeypatch):
    """Trials of a stack are asked and told (no Optuna heartbeat thread): the lease keeper
    beats for them, through waits and scoring; a trial nobody beats for is failed by Optuna's
    stale-trial handling and its values are tried again."""
    study = _heartbeat_study(tmp_path, monkeypatch)
    trial = study.ask()
    trial.suggest_float("loss.beta", 0.5, 4.0)
    lease = TrialLease(trial.storage, trial._trial_id)
    claims.KEEPER.hold(lease)
    trial.storage.record_heartbeat(trial._trial_id)
    time.sleep(4.5)  # longer than the grace period: alive only by the keeper's beats
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING
    claims.KEEPER.let_go(lease.key)
    time.sleep(4.5)
    stream = io.StringIO()
    fail_abandoned_trials(study, StaleTrials(None, stream), others_live=False)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == first.params
    assert trials_done(study) == 0  # a lost trial is not done: its retry is still to do


def test_a_trial_of_a_process_known_gone_fails_at_once_and_others_wait_for_optuna(
    tmp_path, monkeypatch
):
    """On an RDB storage the trial's owner is kept beside Optuna's heartbeat: a process gone
    on this host fails its trial without waiting out the grace period; a trial owned on
    another host is left to the heartbeat."""
    study = _heartbeat_study(tmp_path, monkeypatch)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for owner in (f"{claims.this_host()}:{gone.pid}:1.00", "elsewhere/1:4242:1.00"):
        trial = study.ask()
        trial.set_user_attr(OWNER_TAG, owner)
        trial.storage.record_heartbeat(trial._trial_id)
    stream = io.StringIO()
    assert fail_abandoned_trials(study, StaleTrials(None, stream), others_live=False) == 1
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING", "WAITING"]
    assert f"its process {gone.pid}" in stream.getvalue()
    assert EXPIRES_TAG not in study.trials[1].user_attrs  # no lease of ours: Optuna's beat
