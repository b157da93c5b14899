"""What a ``tune`` invocation leaves: the best trials, ``trials.csv``, Optuna's figures,
the parent run's metrics and the summary printed at the end."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from vaebench.atomic import write_text
from vaebench.reporting.best_models import BestRun, Registered
from vaebench.reporting.table import ALL_RUNS
from vaebench.spec.config import first_line
from vaebench.spec.study import StudySpec
from vaebench.tracking.tracker import Tracker

RUN_ID_ATTR = "mlflow_run_id"  # the trial's user attribute holding its MLflow run id


LEASE_PREFIX = "vaebench.lease_"  # a running trial's owner: not a result


@dataclass
class TuneOutcome:
    study: optuna.Study
    storage: str
    parent_id: str | None
    trials: list[FrozenTrial] = field(default_factory=list)  # the trials this invocation ran
    best: list[FrozenTrial] = field(default_factory=list)  # best trial, or the Pareto front
    csv_path: Path | None = None
    figures: list[Path] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)
    registered: list[Registered] = field(default_factory=list)  # the best runs' models

    @property
    def failed(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.FAIL]


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best complete trial of a single-objective study, or the Pareto front."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    return [study.best_trial]


def best_runs(spec: StudySpec, best: list[FrozenTrial], tracker: Tracker) -> list[BestRun]:
    """The best trials' MLflow runs, to register. A trial whose run is not FINISHED in this
    store (another store's trial, a run deleted, the store failing) is left out with one line:
    the study is done by now."""
    chosen = []
    for trial in best:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        try:
            record = tracker.run_record(run_id) if run_id else None
        except Exception as exc:  # noqa: BLE001 - see the docstring
            record, why = None, first_line(exc)
        else:
            why = "no FINISHED MLflow run in this store"
        if record is None or record.status != "FINISHED":
            print(f"vaebench: trial {trial.number} not registered: {why}", file=sys.stderr)
            continue
        if spec.multi_objective:
            values = ", ".join(
                f"{m} {_format(v)}" for m, v in zip(spec.metrics, trial.values, strict=True)
            )
            how, value = "the Pareto front", f"{values}, trial {trial.number}"
        else:
            how, value = spec.metrics[0], f"{_format(trial.value)}, trial {trial.number}"
        chosen.append(BestRun(record.run_id, record.name, ALL_RUNS, how, value))
    return chosen


def write_trials(study: optuna.Study, best: list[FrozenTrial], folder: Path) -> Path:
    """``trials.csv``: Optuna's trials dataframe (objectives on validation), each trial's test
    scores beside them, the MLflow run ids and a ``best`` column."""
    folder.mkdir(parents=True, exist_ok=True)
    table = study.trials_dataframe(
        attrs=(
            "number",
            "value",
            "state",
            "params",
            "user_attrs",
            "datetime_start",
            "datetime_complete",
            "duration",
        )
    )
    table = table.rename(columns=lambda c: c.removeprefix("user_attrs_"))
    table = table.drop(columns=[c for c in table if c.startswith(LEASE_PREFIX)])
    if "number" in table:
        numbers = {t.number for t in best}
        table["best"] = table["number"].isin(numbers)
    path = folder / "trials.csv"
    write_text(path, table.to_csv(index=False))
    return path


FIGURE_PATTERNS = (
    "optimization_history*.png",
    "param_importances*.png",
    "intermediate_values.png",
    "pareto_front.png",
)


def write_figures(study: optuna.Study, spec: StudySpec, folder: Path) -> list[Path]:
    """Optuna's matplotlib figures of the study, as PNG files under ``folder``.

    Optimization history (one per objective), parameter importances (at least two
    complete trials and two parameters), intermediate values (single objective),
    Pareto front (two objectives). A figure Optuna cannot draw is skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as figures

    for pattern in FIGURE_PATTERNS:  # drop the previous invocation's pictures
        for old in folder.glob(pattern):
            old.unlink()
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    makers: dict[str, Any] = {}
    for index, metric in enumerate(spec.metrics):
        suffix = "" if len(spec.metrics) == 1 else f"_{metric}"

        def target(t: FrozenTrial, i: int = index) -> float:
            return t.values[i]

        makers[f"optimization_history{suffix}.png"] = lambda m=metric, f=target: (
            figures.plot_optimization_history(study, target=f, target_name=m)
        )
        if len(complete) >= 2 and len(spec.space) >= 2:
            makers[f"param_importances{suffix}.png"] = lambda m=metric, f=target: (
                figures.plot_param_importances(study, target=f, target_name=m)
            )
    if len(spec.metrics) == 1 and any(t.intermediate_values for t in trials):
        makers["intermediate_values.png"] = lambda: figures.plot_intermediate_values(study)
    if len(spec.metrics) == 2:
        makers["pareto_front.png"] = lambda: figures.plot_pareto_front(
            study, target_names=spec.metrics
        )
    written = []
    for name, make in makers.items():
        try:
            # Optuna's figures set the ggplot style for the whole process (plt.style.use):
            # undone after each, so that the pictures drawn later are drawn as always
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")
                axes = make()
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                figure.savefig(folder / name, bbox_inches="tight", dpi=100)
            plt.close(figure)
            written.append(folder / name)
        except Exception as exc:  # noqa: BLE001 - e.g. importances of parameters that never vary
            print(f"vaebench: figure {name} skipped: {first_line(exc)}", file=sys.stderr)
            plt.close("all")
    return written


def invocation_metrics(spec: StudySpec, outcome: TuneOutcome) -> dict[str, float]:
    counts = {
        f"trials_{state.name.lower()}": float(sum(t.state == state for t in outcome.trials))
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    if len(outcome.best) == 1 and not spec.multi_objective:
        best = outcome.best[0]
        counts[f"best_{spec.metrics[0]}"] = float(best.value)
        counts.update(
            {f"best_{k}": float(v) for k, v in best.user_attrs.items() if k.startswith("test_")}
        )
    return counts


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def print_outcome(spec: StudySpec, outcome: TuneOutcome, storage: str, stream: TextIO) -> None:
    """The invocation's summary; ``storage`` is the study's storage as shown to the user."""
    ours = outcome.trials
    states = {
        s: sum(t.state == s for t in ours)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    total = len(outcome.study.get_trials(deepcopy=False))
    print(
        f"study {spec.name}: {total} trials in {storage}; this run: "
        f"{len(ours)} ({states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} "
        f"pruned, {states[TrialState.FAIL]} failed)",
        file=stream,
    )
    goals = ", ".join(f"{o.direction} {o.metric}" for o in spec.objectives)
    if not outcome.best:
        print(f"no complete trial yet ({goals})", file=stream)
    elif spec.multi_objective:
        print(
            f"Pareto front on validation ({len(outcome.best)} trials; {goals}), "
            "test scores beside:",
            file=stream,
        )
    else:
        print(f"best trial, chosen on validation ({goals}), test scores beside:", file=stream)
    for trial in outcome.best:
        values = " ".join(
            f"{m}={_format(v)}" for m, v in zip(spec.metrics, trial.values, strict=True)
        )
        tested = " ".join(
            f"{k}={_format(v)}" for k, v in trial.user_attrs.items() if k.startswith("test_")
        )
        values = f"{values}  [{tested}]" if tested else values
        params = " ".join(f"{k}={_format(v)}" for k, v in trial.params.items())
        print(
            f"  trial {trial.number}: {values}  {params}  (mlflow run "
            f"{trial.user_attrs.get(RUN_ID_ATTR, '-')})",
            file=stream,
        )
    print(f"trials: {outcome.csv_path}", file=stream)
    if outcome.figures:
        print(
            f"figures: {', '.join(p.name for p in outcome.figures)} in {outcome.csv_path.parent}",
            file=stream,
        )
    for line in outcome.worker_errors:
        print(f"vaebench: {line}", file=sys.stderr)
    for trial in outcome.failed:
        print(
            f"FAILED trial {trial.number}: see its MLflow run "
            f"{trial.user_attrs.get(RUN_ID_ATTR, '-')} (tag vaebench.error)",
            file=stream,
        )
