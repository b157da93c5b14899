"""Continuing a stopped run in its own MLflow run: its checkpoint, if it continues exactly this
run with this code, and the epochs the store missed."""

from __future__ import annotations

from typing import Any

from vaebench.lifecycle.provenance import code_version
from vaebench.lifecycle.workspace import Workspace
from vaebench.spec.grid import RunSpec
from vaebench.tracking.tracker import Tracker
from vaebench.training.trainer import EpochMetrics, resolve_device


def resumable_state(
    workspace: Workspace, run: RunSpec, run_id: str | None
) -> dict[str, Any] | None:
    """The checkpoint of ``run_id`` if it continues exactly this run with this code."""
    if run_id is None or workspace.checkpoints is None:
        return None
    state = workspace.checkpoints.load(run_id)
    if state is None:
        return None
    device = str(resolve_device(run.config.train.device))
    if (state.get("run_key"), state.get("code"), state.get("device")) != (
        run.key,
        code_version(),
        device,
    ):  # other settings, other code or another device: start over
        workspace.checkpoints.remove(run_id)
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
