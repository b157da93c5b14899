"""One run life for K >= 1 members: a run alone is a stack of one, through the same execute."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vaebench.lifecycle.claims import EXPIRES_TAG
from vaebench.lifecycle.execute import (
    STACK_MEMBERS_TAG,
    STACK_SIZE_TAG,
    STACK_TIMING_TAG,
    Member,
    RunContext,
    execute,
)
from vaebench.lifecycle.workspace import Workspace
from vaebench.spec.grid import expand, load_grid
from vaebench.tracking.tracker import MLflowTracker
from vaebench.training.checkpoint import CheckpointStore

GRID = """
name: life
base:
  data: {subset: 600, validation: 500}
  model: {arch: mlp, hidden: [64], z_dim: 4}
  train: {epochs: 2, batch_size: 100, eval_batch_size: 2500, device: cpu}
matrix:
  loss.beta: [1, 2, 4]
seeds: [0]
"""
TIMING = ("epoch_seconds", "eval_seconds", "images_per_second", "seconds",
          "first_epoch_seconds", "mean_epoch_seconds", "mean_images_per_second")
STACK_TAGS = (STACK_SIZE_TAG, STACK_MEMBERS_TAG, STACK_TIMING_TAG)


def test_a_run_alone_and_in_a_stack_of_three_leave_the_same_record(tmp_path: Path, mnist_root):
    (tmp_path / "life.yaml").write_text(GRID)
    runs = expand(load_grid(tmp_path / "life.yaml"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri)
    workspace = Workspace(mnist_root, CheckpointStore(tmp_path / "checkpoints"))
    workspace.prepare(runs)
    tracker.start_grid("life", "invocation", {"vaebench.grid": "life"})
    context = RunContext({"vaebench.grid": "life"}, number=1, total=4)

    [alone] = execute([Member(runs[0])], tracker, workspace, context)
    stacked = execute([Member(run) for run in runs], tracker, workspace, replace(context, number=2))

    client = MlflowClient(uri)
    mine = client.get_run(alone.result().run_id)
    theirs = client.get_run(stacked[0].result().run_id)
    assert mine.info.run_id != theirs.info.run_id
    assert mine.info.status == theirs.info.status == "FINISHED"
    assert mine.info.run_name == theirs.info.run_name == runs[0].name
    assert mine.data.params == theirs.data.params
    # tags: the same but the lease's expiry (a time) and the stack's own three
    assert not any(tag in mine.data.tags for tag in STACK_TAGS)
    assert theirs.data.tags[STACK_SIZE_TAG] == "3"
    same_tags = {k: v for k, v in theirs.data.tags.items() if k not in STACK_TAGS}
    same_tags.pop(EXPIRES_TAG)
    mine_tags = dict(mine.data.tags)
    mine_tags.pop(EXPIRES_TAG)
    assert mine_tags == same_tags
    # every metric key, with the same steps, and the same values but timing
    assert mine.data.metrics.keys() == theirs.data.metrics.keys()
    for key in mine.data.metrics:
        mine_history = client.get_metric_history(mine.info.run_id, key)
        their_history = client.get_metric_history(theirs.info.run_id, key)
        assert [m.step for m in mine_history] == [m.step for m in their_history], key
        if key in TIMING or key.startswith("system/"):  # seconds, and the machine's load
            continue
        # the stack's batched products round apart from the run's own in float32; k-means
        # on such latents may flip a near-tie (test_stacked.py holds the float64 exactness)
        tolerance = 0.05 if key.endswith(("nmi", "ari", "accuracy")) else 1e-3
        for a, b in zip(mine_history, their_history, strict=True):
            assert a.value == pytest.approx(b.value, rel=tolerance, abs=tolerance), key
    # each run's artifacts: the same files
    listed = sorted(a.path for a in client.list_artifacts(mine.info.run_id))
    assert listed == sorted(a.path for a in client.list_artifacts(theirs.info.run_id))
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # finished: none kept
