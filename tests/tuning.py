"""What the tests of ``tune`` share: a tiny base config, writing a study file, running
``tune`` into a folder's stores, and reading both stores back."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from vaebench.cli import main
from vaebench.tuning.storage import open_storage
from vaebench.tuning.tune import STATUS

TINY_BASE = """\
base:
  data: {subset: 256, validation: 1000}
  model: {arch: mlp, hidden: [16], z_dim: 2}
  train: {epochs: 2, batch_size: 64, eval_batch_size: 5000, device: cpu}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def tune(study: Path, folder: Path, mnist_root: Path, *extra: str) -> int:
    return main([
        "tune", str(study), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--data-root", str(mnist_root), "--results-dir", str(folder / "results"), *extra,
    ])


def load(folder: Path, name: str, storage: str | None = None) -> optuna.Study:
    ref = storage or f"sqlite:///{folder / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=open_storage(ref))


def mlflow_runs(folder: Path, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of an experiment in the folder's MLflow store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def assert_trials_match_runs(study: optuna.Study, children: list) -> None:
    """One MLflow child run per trial, the same number, state and run id on both sides."""
    by_id = {run.info.run_id: run for run in children}
    trials = study.get_trials()
    assert len(children) == len(trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    for trial in trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == STATUS[trial.state.name]
        assert run.info.run_name == f"trial-{trial.number:04d}"
        assert run.data.tags["mlflow.parentRunId"] == trial.user_attrs["mlflow_parent_run_id"]
