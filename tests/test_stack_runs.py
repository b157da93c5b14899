"""Grids whose runs share a shape train as stacks, and record what the runs alone record."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from vaebench.cli import main
from vaebench.lifecycle.execute import STACK_MEMBERS_TAG, STACK_SIZE_TAG, STACK_TIMING_TAG
from vaebench.models import build_model
from vaebench.spec.config import ModelConfig
from vaebench.spec.grid import expand, load_grid
from vaebench.stacking.plan import config_problem, plan_stacks

GRID = """
name: stacks
base:
  data: {{subset: 600, validation: 500}}
  model: {{arch: mlp, hidden: [64], z_dim: 4}}
  train: {{epochs: 2, batch_size: 100, eval_batch_size: 2500, device: cpu}}
matrix:
  loss.beta: [1, 4]
  optim.lr: [1.0e-3, {second_lr}]
include:
  - {{model.arch: gumbel}}
seeds: [0]
"""


def run(tmp_path: Path, mnist_root: Path, store: str, *extra: str, second_lr: str = "3.0e-3"):
    grid = tmp_path / "stacks.yaml"
    grid.write_text(GRID.format(second_lr=second_lr))
    uri = f"sqlite:///{tmp_path / store}"
    status = main([
        "run", str(grid), "--tracking-uri", uri, "--data-root", str(mnist_root),
        "--results-dir", str(tmp_path / f"results-{store}"), "--no-report", *extra,
    ])
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["stacks"])
    return status, uri, runs[runs["tags.mlflow.parentRunId"].notna()].set_index(
        "tags.mlflow.runName")


def test_dry_run_shows_which_runs_stack(tmp_path, mnist_root, capsys):
    (tmp_path / "stacks.yaml").write_text(GRID.format(second_lr="3.0e-3"))
    assert main(["run", str(tmp_path / "stacks.yaml"), "--dry-run", "--stack", "auto"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("5 runs, 1 stacks")
    assert sum(" s1/4 " in line for line in lines) == 4
    assert any(" - " in line and "gumbel" in line for line in lines)
    assert main(["run", str(tmp_path / "stacks.yaml"), "--dry-run", "--stack", "auto",
                 "--max-stack", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("5 runs, 1 stacks")  # 3 stacked, the fourth alone
    assert sum(" s1/3 " in line for line in lines) == 3


@pytest.mark.parametrize(
    ("model", "stacks_on_cpu"),
    [("{arch: conv, channels: [8, 16]}", True),
     ("{arch: gmvae, hidden: [32], categories: 3}", False)],
)
def test_conv_runs_stack_everywhere_and_gmvae_runs_on_cuda_only(
    model, stacks_on_cpu, tmp_path, capsys
):
    grid = tmp_path / "families.yaml"
    grid.write_text(
        f"name: families\nbase:\n  model: {model}\n"
        "  train: {epochs: 1, device: cpu}\nmatrix:\n  loss.beta: [1, 4]\nseeds: [0]\n"
    )
    assert main(["run", str(grid), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # on this CPU
    assert lines[0].startswith("2 runs, 1 stack" if stacks_on_cpu else "2 runs, 0 stacks")
    assert main(["run", str(grid), "--dry-run", "--stack", "on"]) == 0  # on any device
    assert capsys.readouterr().out.startswith("2 runs, 1 stack")
    configs = [run.config for run in expand(load_grid(grid))]
    assert plan_stacks(configs, 8, lambda config: False) == [[0, 1]]  # on CUDA, one stack
    problem = config_problem(configs[0], on_cpu=True)
    assert problem is None if stacks_on_cpu else "CUDA only" in problem


def test_a_stacked_grid_records_what_the_runs_alone_record(tmp_path, mnist_root):
    status, uri, stacked = run(tmp_path, mnist_root, "stacked.db", "--stack", "auto")
    assert status == 0
    status_off, _, alone = run(tmp_path, mnist_root, "alone.db", "--stack", "off")
    assert status_off == 0
    assert sorted(stacked.index) == sorted(alone.index) and len(stacked) == 5
    members = [name for name in stacked.index if not name.startswith("gumbel")]
    assert (stacked.loc[members, f"tags.{STACK_SIZE_TAG}"] == "4").all()
    assert set(stacked.loc[members[0], f"tags.{STACK_MEMBERS_TAG}"].split(",")) == set(members)
    assert stacked.loc[members[0], f"tags.{STACK_TIMING_TAG}"].startswith("epoch_seconds, ")
    assert f"tags.{STACK_SIZE_TAG}" not in alone.columns or alone[
        f"tags.{STACK_SIZE_TAG}"].isna().all()
    for name in stacked.index:
        mine, theirs = stacked.loc[name], alone.loc[name]
        assert mine["status"] == "FINISHED"
        assert mine["tags.vaebench.run_key"] == theirs["tags.vaebench.run_key"]
        params = [c for c in stacked.columns if c.startswith("params.")]
        assert mine[params].to_dict() == theirs[params].to_dict()
        assert abs(mine["metrics.test_elbo"] - theirs["metrics.test_elbo"]) < 0.05, name
        # k-means on latents that differ by float32 rounding: near-ties may flip a point
        assert mine["metrics.val_nmi"] == pytest.approx(theirs["metrics.val_nmi"], abs=0.05)
    # every epoch logged once, and the state_dict is the member's own model
    client = MlflowClient(uri)
    run_id = stacked.loc[members[1], "run_id"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_elbo")) == [1, 2]
    folder = client.download_artifacts(run_id, "state_dict.pt", str(tmp_path))
    model = build_model(ModelConfig(arch="mlp", hidden=[64], z_dim=4), (1, 28, 28))
    model.load_state_dict(torch.load(folder, weights_only=True))


def test_a_diverging_member_fails_alone(tmp_path, mnist_root, capsys):
    status, _, runs = run(
        tmp_path, mnist_root, "diverge.db", "--stack", "auto", second_lr="1.0e12"
    )
    assert status == 1
    failed = sorted(runs.index[runs["status"] == "FAILED"])
    assert failed == ["mlp-b1-lr1.0e12-s0", "mlp-b4-lr1.0e12-s0"]
    assert (runs["status"] == "FINISHED").sum() == 3  # their stack's other members, and gumbel
    assert "training loss is nan" in runs.loc[failed[0], "tags.vaebench.error"]
    assert "TrainingDiverged" in capsys.readouterr().out


def test_the_stacks_epoch_that_renews_a_grids_lease_is_k_members_shares():
    from vaebench.lifecycle.execute import stack_epoch
    from vaebench.training.trainer import EpochMetrics

    share = EpochMetrics(3, 100.0, epoch_seconds=2.5, eval_seconds=0.5, images_per_second=8.0,
                         values={"val_elbo": -100.0})
    whole = stack_epoch(share, 8)
    assert (whole.epoch_seconds, whole.eval_seconds) == (20.0, 4.0)
    assert (whole.epoch, whole.train_loss, whole.values) == (3, 100.0, {"val_elbo": -100.0})
    assert share.epoch_seconds == 2.5  # the member's own record is left as it is
