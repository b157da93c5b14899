"""Continuing a stopped run in its own MLflow run: whether this process's claim to it still
stands, its checkpoint, if it continues exactly this run with this code, and the epochs the
store missed."""

from __future__ import annotations

from typing import Any

from vaebench.lifecycle.claims import OWNER_TAG, owner
from vaebench.lifecycle.provenance import code_version
from vaebench.lifecycle.workspace import Workspace
from vaebench.spec.grid import RunSpec
from vaebench.tracking.tracker import Tracker
from vaebench.training.trainer import EpochMetrics, resolve_device


class ClaimLost(Exception):
    """The stopped run this process claimed to continue is no longer its to continue (another
    process continued it, or the claim was taken away as abandoned): it lets go, writing
    nothing to that run."""


def check_continuation(tracker: Tracker, run_id: str | None, claim_id: str | None) -> None:
    """:class:`ClaimLost` unless this process may continue the stopped run ``run_id`` under its
    claim run ``claim_id`` (if it continues one under a claim) now: the run must still be
    KILLED and the claim RUNNING under this process's lease, read just before it is reopened."""
    if run_id is None or claim_id is None:
        return
    run = tracker.run_record(run_id)
    if run is None or run.status != "KILLED":
        status = "deleted" if run is None else run.status
        raise ClaimLost(f"run {run_id} is {status} (another process continued it)")
    claim = tracker.run_record(claim_id)
    if claim is None or claim.status != "RUNNING" or claim.tags.get(OWNER_TAG) != owner():
        raise ClaimLost(f"its claim {claim_id} was taken away (recovered as abandoned)")


def checkpoint_identity(run: RunSpec) -> dict[str, str]:
    """What a checkpoint of ``run`` holds, and continues only with: its settings, this code
    and its device."""
    device = str(resolve_device(run.config.train.device))
    return {"run_key": run.key, "code": code_version(), "device": device}


def resumable_state(
    workspace: Workspace, run: RunSpec, run_id: str | None
) -> dict[str, Any] | None:
    """The checkpoint of ``run_id`` if it continues exactly this run with this code."""
    if run_id is None or workspace.checkpoints is None:
        return None
    state = workspace.checkpoints.load(run_id)
    if state is not None and any(state.get(k) != v for k, v in checkpoint_identity(run).items()):
        workspace.checkpoints.remove(run_id)  # other settings, code or device: start over
        return None
    return state


def log_missing_epochs(tracker: Tracker, run_id: str, state: dict[str, Any]) -> None:
    """Epochs the checkpoint holds that the store missed (the process stopped between
    writing the checkpoint and logging the epoch): logged now, so the series has no gap."""
    logged = tracker.logged_steps(run_id, "train_loss")
    for record in state["history"]:
        metrics = EpochMetrics(**record)
        if metrics.epoch not in logged:
            tracker.log_metrics(run_id, metrics.as_dict(), step=metrics.epoch)
