"""Trials of a study trained as stacks: the pruner masks a member, the others finish; each
trial's Optuna state, MLflow run and values are what a trial alone records. Tiny runs on a
real MNIST subset, real Optuna and MLflow stores in a temporary folder."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from tuning import TINY_BASE, assert_trials_match_runs, load, mlflow_runs, tune, write

from vaebench.lifecycle.execute import STACK_MEMBERS_TAG, STACK_SIZE_TAG
from vaebench.spec.study import load_study
from vaebench.stacking.plan import DEFAULT_MAX_STACK
from vaebench.tuning.storage import open_storage
from vaebench.tuning.trial_stack import PRUNED_ON_CPU, stack_problem

STACKED_STUDY = f"""\
name: stacked
{TINY_BASE}
space:
  optim.lr: {{type: categorical, choices: [1.0e-3, 1.0e-6]}}
  loss.beta: {{type: categorical, choices: [1.0, 2.0]}}
objectives: [{{metric: val_elbo, direction: maximize}}]
sampler: random
pruner: {{name: median, n_startup_trials: 1, n_warmup_steps: 0}}
n_trials: 4
seed: 0
"""


def test_a_pruned_member_is_masked_and_the_others_of_its_stack_finish(
    tmp_path, mnist_root, capsys
):
    path = write(tmp_path / "stacked.yaml", STACKED_STUDY)
    # first two trials, one stack, nothing completed before them: neither can be pruned
    study = optuna.create_study(
        study_name="stacked", storage=open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"),
        direction="maximize",
    )
    study.set_metric_names(["val_elbo"])
    study.enqueue_trial({"optim.lr": 1e-3, "loss.beta": 1.0})
    study.enqueue_trial({"optim.lr": 1e-3, "loss.beta": 2.0})
    # --stack on: on the CPU a study with a pruner trains its trials one by one by default
    on = ("--stack", "on", "--no-register")
    assert tune(path, tmp_path, mnist_root, "--n-trials", "2", *on) == 0
    assert "up to 8 trials at a time train as one stack" in capsys.readouterr().err
    study = load(tmp_path, "stacked")
    first = study.get_trials()
    assert [t.state for t in first] == [TrialState.COMPLETE, TrialState.COMPLETE]
    best = max(first, key=lambda t: t.value)
    # then the better of them again beside a trial that barely trains: the median pruner
    # stops the latter after its first epoch; the former finishes as it did before
    study.enqueue_trial(best.params)
    study.enqueue_trial({"optim.lr": 1e-6, "loss.beta": 1.0})
    assert tune(path, tmp_path, mnist_root, "--n-trials", "2", *on) == 0
    study = load(tmp_path, "stacked")
    again, slow = study.get_trials()[2:]
    assert again.state == TrialState.COMPLETE and slow.state == TrialState.PRUNED
    assert list(slow.intermediate_values) == [1]  # stopped after epoch 1 of 2
    assert slow.datetime_complete < again.datetime_complete  # told then, not at the stack's end
    assert list(again.intermediate_values) == [1, 2]
    assert again.value == pytest.approx(best.value, rel=1e-5)  # its own numbers, not its stack's
    _, children = mlflow_runs(tmp_path, "stacked")
    assert_trials_match_runs(study, children)  # states, statuses, numbers, run ids
    by_name = {run.info.run_name: run for run in children}
    for trials in (first, [again, slow]):
        names = {f"trial-{t.number:04d}" for t in trials}
        for name in names:
            run = by_name[name]
            assert run.data.tags[STACK_SIZE_TAG] == "2"
            assert set(run.data.tags[STACK_MEMBERS_TAG].split(",")) == names
    pruned = by_name[f"trial-{slow.number:04d}"]
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["vaebench.error"] == "pruned after epoch 1"
    finished = by_name[f"trial-{again.number:04d}"]
    assert finished.data.metrics["objective.val_elbo"] == pytest.approx(again.value)
    assert finished.data.metrics["test_elbo"] == pytest.approx(again.user_attrs["test_elbo"])


def test_which_studies_stack_their_trials(tmp_path):
    path = write(tmp_path / "stacked.yaml", STACKED_STUDY)
    spec = load_study(path)
    assert stack_problem(spec, DEFAULT_MAX_STACK) == PRUNED_ON_CPU  # device: cpu
    assert stack_problem(spec, DEFAULT_MAX_STACK, everywhere=True) is None  # --stack on
    assert stack_problem(spec, 1) == "--stack off"
    unpruned_text = STACKED_STUDY.replace(
        "pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}", "pruner: none"
    )
    unpruned = load_study(write(tmp_path / "unpruned.yaml", unpruned_text))
    assert stack_problem(unpruned, DEFAULT_MAX_STACK) is None
    wider = write(tmp_path / "wider.yaml", STACKED_STUDY.replace(
        "space:\n", "space:\n  model.z_dim: {type: int, low: 2, high: 4}\n"
    ))
    assert "varies model.z_dim" in stack_problem(load_study(wider), DEFAULT_MAX_STACK)
    gmvae = write(tmp_path / "gmvae.yaml", unpruned_text.replace(
        "arch: mlp", "arch: gmvae, categories: 3"
    ))
    assert "CUDA only" in stack_problem(load_study(gmvae), DEFAULT_MAX_STACK)


def test_tune_says_whether_its_trials_stack_and_why_not(tmp_path, capsys):
    from vaebench.tuning.tune import _trials_per_stack

    spec = load_study(write(tmp_path / "stacked.yaml", STACKED_STUDY))
    assert _trials_per_stack(spec, DEFAULT_MAX_STACK, stack_everywhere=False) == 1
    assert capsys.readouterr().err == f"study stacked: trials train one by one: {PRUNED_ON_CPU}\n"
    assert _trials_per_stack(spec, 4, stack_everywhere=True) == 4
    assert "up to 4 trials at a time train as one stack" in capsys.readouterr().err
    assert _trials_per_stack(spec, 1, stack_everywhere=True) == 1  # --stack off: nothing to say
    assert capsys.readouterr().err == ""


def test_a_grid_sampled_study_that_stacks_ends_when_its_grid_is_done(tmp_path, mnist_root):
    """Optuna's grid sampler stops the study once every point is tried, which Optuna allows
    only inside ``optimize``: the study trains its trials one by one, and ends cleanly."""
    study = STACKED_STUDY.replace("sampler: random", "sampler: grid").replace(
        "pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}", "pruner: none")
    path = write(tmp_path / "stacked.yaml", study)
    assert stack_problem(load_study(path), DEFAULT_MAX_STACK, everywhere=True) is not None
    assert tune(path, tmp_path, mnist_root, "--stack", "on", "--no-register") == 0
    assert [t.state for t in load(tmp_path, "stacked").trials] == [TrialState.COMPLETE] * 4
