"""Optuna studies: study-file validation, trials tracked in MLflow, pruning, resumption,
worker processes, Pareto fronts. Tiny runs on a real MNIST subset, temporary stores."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from torch import nn
from tuning import TINY_BASE, assert_trials_match_runs, load, mlflow_runs, tune, write

import vaebench.spec.config
from vaebench.models import MODELS, build_model
from vaebench.spec.config import ConfigError, ModelConfig
from vaebench.spec.study import load_study
from vaebench.stacking.plan import DEFAULT_MAX_STACK
from vaebench.tuning.storage import JOURNAL, MEMORY, resolve_storage
from vaebench.tuning.trial_stack import PRUNED_ON_CPU, stack_problem

# lr 1e-6 barely trains, so after the first complete trial the median pruner stops it
PRUNING_STUDY = f"""\
name: prune
{TINY_BASE}
space:
  optim.lr: {{type: categorical, choices: [1.0e-3, 1.0e-6]}}
  loss.beta: {{type: float, low: 0.5, high: 2.0}}
objectives: [{{metric: val_elbo, direction: maximize}}]
sampler: random
pruner: {{name: median, n_startup_trials: 1, n_warmup_steps: 0}}
n_trials: 4
seed: 0
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One temporary folder for this module's MLflow store (mlflow.db), Optuna storage
    (optuna.db beside it) and results; each test tunes a study of its own name."""
    return tmp_path_factory.mktemp("tune")


# ---------------------------------------------------------------------------
# study files


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_study(path)
    return info.value.problems


@pytest.mark.parametrize("name", ["../escape", "a/b", "/absolute", ".hidden", "back\\slash"])
def test_a_study_name_that_is_a_path_is_refused_before_anything_is_created(tmp_path, name):
    """A study's name names its MLflow experiment, its results folder and its Optuna study:
    checked as a grid's name is, one line, before either store exists."""
    path = write(tmp_path / "study.yaml", f"""\
        name: {json.dumps(name)}
        {textwrap.indent(TINY_BASE, "        ").strip()}
        space:
          loss.beta: {{type: float, low: 0.5, high: 4.0}}
        objectives:
          - {{metric: val_elbo, direction: maximize}}
        """)
    problems = problems_of(path)
    assert problems == [f"{path}: name: must not contain path separators or start with '.'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_every_problem_is_one_line_naming_file_and_key(tmp_path):
    path = write(tmp_path / "study.yaml", f"""\
        name: bad
        {textwrap.indent(TINY_BASE, "        ").strip()}
        space:
          optim.lr: {{type: float, low: 0.0, high: 1.0e-2, log: true}}
          loss.beta: {{type: float, low: 4, high: 1}}
          train.epochs: {{type: int, low: 1, high: 4, step: 1, log: true}}
          optim.name: {{type: categorical}}
          model.hidden: {{type: normal}}
          model.zdim: {{type: int, low: 2, high: 8}}
          model.arch: [mlp, nosuchmodel]
          model.z_dim: {{type: float, low: 2, high: 8}}
        objectives:
          - {{metric: test_elbow, direction: maximize}}
          - {{metric: val_nmi, direction: upwards}}
        sampler: annealing
        pruner: median
        n_trials: 0
        colour: blue
        """)
    problems = problems_of(path)
    expected = {
        "space.optim.lr": "log needs low > 0",
        "space.loss.beta": "low must be below high",
        "space.train.epochs.step": "cannot be combined with log",
        "space.optim.name.choices": "categorical needs a non-empty list",
        "space.model.hidden.type": "must be one of float, int, categorical",
        "space.model.zdim": "unknown key; valid keys in model:",
        "space.model.arch.choices[1]": "unknown model 'nosuchmodel'",
        "space.model.z_dim (a value between low and high)": "valid integer",
        "objectives[0].metric": "unknown metric 'test_elbow'",
        "objectives[1].direction": "must be one of maximize, minimize",
        "sampler": "unknown sampler 'annealing'",
        "pruner": "cannot prune a study with several objectives",
        "n_trials": "must be an integer >= 1",
        "colour": "unknown key",
    }
    for key, fragment in expected.items():
        lines = [p for p in problems if p.startswith(f"{path}: {key}:") and fragment in p]
        assert len(lines) == 1, (key, problems)
    assert len(problems) == len(expected), problems
    assert all("\n" not in line for line in problems)


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("space: {}\nobjectives: [{metric: val_elbo, direction: maximize}]",
         "space", "empty search space"),
        ("space: {loss.beta: {type: float, low: 1, high: 4}}\nsampler: grid\n"
         "objectives: [{metric: val_elbo, direction: maximize}]",
         "space.loss.beta", "grid sampler needs finite values"),
        ("space: {loss.beta: [1, 4]}\npruner: median\n"
         "objectives: [{metric: val_ari, direction: maximize}]",
         "pruner", "known only after the last epoch"),
        ("space: {loss.beta: [1, 4]}\nobjectives: [{metric: test_elbo, direction: maximize}]",
         "objectives[0].metric", "scored on the test split, which must not choose what it "
         "then reports (that is selecting on the test set); select on val_elbo"),
        ("space: {loss.beta: [1, 4]}\nobjectives: [{metric: test_nmi, direction: maximize}]",
         "objectives[0].metric", "select on val_nmi"),
        ("space: {model.arch: [mlp, cvae]}\n"
         "objectives: [{metric: val_elbo, direction: maximize}]",
         "objectives[0].metric", "not comparable across model.arch (cvae and unconditional"),
        ("space: {loss.recon: [bce, mse]}\nobjectives: [{metric: val_elbo, direction: maximize}]",
         "objectives[0].metric", "not comparable across loss.recon"),
        ("space: {train.epochs: {type: int, low: 1, high: 2}}\n"
         "objectives: [{metric: mean_epoch_seconds, direction: minimize}]",
         "objectives[0].metric", "train.epochs can be 1"),
        ("space: {data.validation: [0, 100]}\n"
         "objectives: [{metric: val_nmi, direction: maximize}]",
         "objectives[0].metric", "needs a validation split, and data.validation can be 0"),
        ("space: {model.categories: [10, 30]}\n"
         "objectives: [{metric: val_nmi, direction: maximize}]",
         "objectives[0].metric", "rises with the number of clusters"),
        ("space: {loss.beta: [1, 4]}\n"
         "objectives: [{metric: val_kl_z, direction: minimize}]",
         "objectives[0].metric", "not reported by mlp models"),
        ("space: {loss.recon: [bce, bce]}\nobjectives: [{metric: val_elbo, direction: maximize}]",
         "space.loss.recon.choices", "repeated choice"),
        ("space: {loss.beta: [1, 4]}\npruner: {name: median, patience: 2}\n"
         "objectives: [{metric: val_elbo, direction: maximize}]",
         "pruner.patience", "unknown option of median"),
    ],
)
def test_study_file_problems(tmp_path, mnist_root, capsys, body, key, fragment):
    path = write(tmp_path / "study.yaml", f"name: bad\n{TINY_BASE}{body}\n")
    assert tune(path, tmp_path, mnist_root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"vaebench: error: {path}: {key}:") and fragment in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # nothing created


def test_workers_need_a_shared_storage(tmp_path, mnist_root, capsys):
    path = write(tmp_path / "study.yaml", PRUNING_STUDY)
    assert tune(path, tmp_path, mnist_root, "--workers", "2", "--storage", "memory") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers" in err[0] and "memory" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_shipped_studies_validate():
    single, pareto = load_study(EXPERIMENTS / "study.yaml"), load_study(EXPERIMENTS / "pareto.yaml")
    assert single.metrics == ["val_elbo"] and single.pruner == "median"
    assert set(single.space) == {
        "loss.beta", "optim.lr", "model.z_dim", "model.hidden", "optim.name"
    }
    assert single.space["optim.lr"].log and single.base["data"]["subset"] <= 20000
    assert pareto.metrics == ["val_elbo", "val_nmi"] and pareto.pruner == "none"
    assert pareto.base["model"]["arch"] == "gumbel"
    stacked = load_study(EXPERIMENTS / "lr-beta.yaml")  # README: trials that stack
    assert stack_problem(stacked, DEFAULT_MAX_STACK, everywhere=True) is None
    assert stack_problem(stacked, DEFAULT_MAX_STACK) == PRUNED_ON_CPU


def test_storage_resolution():
    assert resolve_storage(None, "sqlite:////data/runs/mlflow.db") == "sqlite:////data/runs/optuna.db"
    assert resolve_storage(None, "sqlite:///mlflow.db") == "sqlite:///optuna.db"
    assert resolve_storage(None, "http://mlflow:5000") == "sqlite:///optuna.db"
    assert resolve_storage("studies.log", "sqlite:///mlflow.db") == JOURNAL + "studies.log"
    assert resolve_storage("journal:/x/j", "sqlite:///mlflow.db") == "journal:/x/j"
    assert resolve_storage("memory", "sqlite:///mlflow.db") == MEMORY
    url = "postgresql://tuner:secret@db.lab/optuna"
    assert resolve_storage(url, "sqlite:///mlflow.db") == url


# ---------------------------------------------------------------------------
# a pruned study, then continued


def snapshot(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.values, t.user_attrs) for t in study.trials]


@pytest.fixture(scope="module")
def pruned_then_resumed(store, mnist_root):
    """4 trials, a snapshot of them, then 2 more trials of the same study, each trial alone."""
    folder = store
    path = write(folder / "prune.yaml", PRUNING_STUDY)
    first = tune(path, folder, mnist_root, "--stack", "off")  # tests/test_trial_stack.py
    before = snapshot(load(folder, "prune"))
    _, children_before = mlflow_runs(folder, "prune")
    second = tune(path, folder, mnist_root, "--n-trials", "2", "--stack", "off")
    return folder, (first, second), before, len(children_before)


def test_trials_and_mlflow_runs_agree(pruned_then_resumed):
    folder, statuses, before, children_before = pruned_then_resumed
    assert statuses == (0, 0)
    assert len(before) == 4 and children_before == 4
    study = load(folder, "prune")
    parents, children = mlflow_runs(folder, "prune")
    assert len(parents) == 2  # one per invocation
    assert_trials_match_runs(study, children)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    for trial in study.trials:
        run = next(r for r in children if r.info.run_id == trial.user_attrs["mlflow_run_id"])
        assert run.data.params["optim.lr"] == str(trial.params["optim.lr"])
        assert run.data.params["loss.beta"] == str(trial.params["loss.beta"])
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert run.data.metrics["objective.val_elbo"] == pytest.approx(trial.value)
            assert run.data.metrics["val_elbo"] == pytest.approx(trial.value)
            assert run.data.metrics["test_elbo"] == pytest.approx(trial.user_attrs["test_elbo"])
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert max(trial.intermediate_values) < 2  # stopped before the last epoch


def test_rerun_adds_trials_and_leaves_earlier_ones_alone(pruned_then_resumed):
    folder, _, before, _ = pruned_then_resumed
    study = load(folder, "prune")
    assert len(study.trials) == 6
    assert snapshot(study)[:4] == before
    parents = {t.user_attrs["mlflow_parent_run_id"] for t in study.trials}
    assert len(parents) == 2


def test_trials_csv_and_figures(pruned_then_resumed, capsys):
    folder, _, _, _ = pruned_then_resumed
    study = load(folder, "prune")
    results = folder / "results" / "prune"
    table = pd.read_csv(results / "trials.csv")
    assert list(table["number"]) == list(range(6))
    assert list(table["mlflow_run_id"]) == [t.user_attrs["mlflow_run_id"] for t in study.trials]
    assert list(table["state"]) == [t.state.name for t in study.trials]
    assert list(table.loc[table["best"], "number"]) == [study.best_trial.number]
    # the best trial is the best on validation; its test score is beside it, not chosen on
    complete = table[table["state"] == "COMPLETE"]
    assert table.loc[table["best"], "value_val_elbo"].item() == complete["value_val_elbo"].max()
    assert complete["test_elbo"].notna().all()
    for figure in ("optimization_history.png", "intermediate_values.png"):
        assert (results / figure).stat().st_size > 0
    # Optuna's figures use the ggplot style; the pictures drawn after them in the same
    # process (a trial's latent.png, a report) keep matplotlib's default look
    assert matplotlib.rcParams["axes.facecolor"] == "white"
    parents, _ = mlflow_runs(folder, "prune")
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    latest = max(parents, key=lambda r: r.info.start_time)
    logged = {a.path for a in client.list_artifacts(latest.info.run_id)}
    assert {"trials.csv", "optimization_history.png"} <= logged
    assert latest.data.metrics["trials_complete"] + latest.data.metrics["trials_pruned"] == 2
    # each invocation registered the study's best trial (over both) as a new version
    versions = client.search_model_versions("name='prune'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    newest = max(versions, key=lambda v: int(v.version))
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    assert newest.run_id == best_run and newest.tags["vaebench.run_id"] == best_run
    assert newest.tags["vaebench.selected_on"] == "val_elbo"
    assert newest.tags["vaebench.invocation"] == latest.info.run_id


# ---------------------------------------------------------------------------
# failing trials, worker processes, several objectives


def _exploding_builder(config: ModelConfig, image_shape):
    class Exploding(nn.Module):
        def forward(self, x):
            raise RuntimeError("exploded on purpose")

    model = build_model(config.model_copy(update={"arch": "mlp"}), image_shape)
    model.decoder.append(Exploding())
    return model


def test_failing_trial_is_fail_and_failed_and_the_study_goes_on(
    store, mnist_root, monkeypatch, capsys
):
    monkeypatch.setitem(MODELS, "exploding", _exploding_builder)
    monkeypatch.setattr(vaebench.spec.config, "ARCHS", (*vaebench.spec.config.ARCHS, "exploding"))
    path = write(store / "boom.yaml", f"""\
        name: boom
        {textwrap.indent(TINY_BASE, "        ").strip()}
        space:
          model.arch: [exploding, mlp]
        objectives: [{{metric: val_elbo, direction: maximize}}]
        sampler: grid
        n_trials: 2
        """)
    assert tune(path, store, mnist_root) == 1
    assert "1 of 2 trials failed" in capsys.readouterr().err
    study = load(store, "boom")
    _, children = mlflow_runs(store, "boom")
    assert_trials_match_runs(study, children)
    by_arch = {t.params["model.arch"]: t for t in study.trials}
    assert by_arch["exploding"].state == optuna.trial.TrialState.FAIL
    assert by_arch["mlp"].state == optuna.trial.TrialState.COMPLETE
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "exploded on purpose" in failed.data.tags["vaebench.error"]


def test_two_workers_share_one_study(store, mnist_root):
    path = write(store / "shared.yaml", PRUNING_STUDY.replace("name: prune", "name: shared"))
    assert tune(path, store, mnist_root, "--workers", "2", "--no-register") == 0
    study = load(store, "shared")
    assert len(study.trials) == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    assert client.search_model_versions("name='shared'") == []  # --no-register
    parents, children = mlflow_runs(store, "shared")
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert_trials_match_runs(study, children)
    assert len({r.info.run_id for r in children}) == 4


def test_two_objectives_print_and_save_a_pareto_front(store, mnist_root, capsys):
    path = write(store / "front.yaml", """\
        name: front
        base:
          data: {subset: 256, validation: 1000}
          model: {arch: gumbel, hidden: [16], z_dim: 2, categories: 10}
          train: {epochs: 2, batch_size: 64, eval_batch_size: 5000, device: cpu}
        space:
          model.tau: [0.5, [1.0, 0.5]]
          loss.beta: {type: float, low: 0.5, high: 4.0, log: true}
        objectives:
          - {metric: val_elbo, direction: maximize}
          - {metric: val_nmi, direction: maximize}
        sampler: {name: nsga2, population_size: 4}
        n_trials: 3
        """)
    journal = store / "front.log"
    assert tune(path, store, mnist_root, "--storage", str(journal)) == 0
    out = capsys.readouterr().out
    study = load(store, "front", JOURNAL + str(journal))
    front = sorted(t.number for t in study.best_trials)
    goals = "maximize val_elbo, maximize val_nmi"
    assert f"Pareto front on validation ({len(front)} trials; {goals})" in out
    for number in front:
        assert f"  trial {number}: val_elbo=" in out
    assert out.count("[test_elbo=") == len(front)  # each chosen trial's test score beside it
    results = store / "results" / "front"
    table = pd.read_csv(results / "trials.csv")
    assert sorted(table.loc[table["best"], "number"]) == front
    columns = {"values_val_elbo", "values_val_nmi", "test_elbo", "test_nmi", "params_model.tau"}
    assert columns <= set(table.columns)
    assert (results / "pareto_front.png").stat().st_size > 0
    _, children = mlflow_runs(store, "front")
    assert_trials_match_runs(study, children)
    tau = {str(t.params["model.tau"]) for t in study.trials}
    assert tau <= {"0.5", "[1.0, 0.5]"}
    # each trial of the front is a version of the study's registered model
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    versions = client.search_model_versions("name='front'")
    fronts = {t.user_attrs["mlflow_run_id"] for t in study.best_trials}
    assert {v.run_id for v in versions} == fronts and len(versions) == len(front)
    assert {v.tags["vaebench.selected_on"] for v in versions} == {"the Pareto front"}
    assert out.count("registered model front version ") == len(front)


def test_a_best_trial_whose_run_cannot_be_read_is_one_line_and_the_study_exits_0(
    store, mnist_root, monkeypatch, capsys
):
    """The study is done before its best trial is registered: a store that fails to give
    the trial's run back then is one line, not a tracking error's exit status."""
    from vaebench.tracking.tracker import MLflowTracker

    path = write(store / "unread.yaml", f"""\
        name: unread
        {textwrap.indent(TINY_BASE, "        ").strip()}
        space:
          loss.beta: {{type: float, low: 0.5, high: 2.0}}
        objectives: [{{metric: val_elbo, direction: maximize}}]
        sampler: random
        n_trials: 1
        """)

    def unreadable(self, run_id):
        raise RuntimeError("store gone on purpose")

    monkeypatch.setattr(MLflowTracker, "run_record", unreadable)
    assert tune(path, store, mnist_root) == 0
    err = capsys.readouterr().err
    assert "vaebench: trial 0 not registered: store gone on purpose" in err
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    assert client.search_model_versions("name='unread'") == []


@pytest.mark.parametrize("creator_hours", [-12, 0, 12])
def test_a_trial_without_its_lease_yet_is_failed_only_when_no_invocation_runs(creator_hours):
    """Between Optuna creating a trial and its process setting the lease (its first user
    attribute) another process must not fail it: while another invocation of the study runs,
    a trial without a lease is left alone; with none running, it is failed. Its
    ``datetime_start``, in its creator's local time (here 12 h off either way, as from a host
    in another time zone), plays no part."""
    import datetime
    import io

    from vaebench.tuning.trial import StaleTrials, fail_abandoned_trials

    start = datetime.datetime.now() + datetime.timedelta(hours=creator_hours)
    study = optuna.create_study()
    study.add_trial(optuna.trial.FrozenTrial(
        number=0, state=optuna.trial.TrialState.RUNNING, value=None, values=None,
        datetime_start=start, datetime_complete=None, params={}, distributions={},
        user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=0,
    ))
    stream = io.StringIO()
    stale = StaleTrials(tracker=None, stream=stream)
    assert fail_abandoned_trials(study, stale, others_live=True) == 0
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING
    assert fail_abandoned_trials(study, stale, others_live=False) == 1
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert "no lease" in stream.getvalue()
    assert study.trials[1].state == optuna.trial.TrialState.WAITING  # its values again
