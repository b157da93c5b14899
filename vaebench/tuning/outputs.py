"""What a ``tune`` invocation leaves: the best trials, ``trials.csv``, Optuna's figures,
the parent run's metrics and the summary printed at the end."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable
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
PARENT_ATTR = "mlflow_parent_run_id"  # which `tune` invocation ran the trial
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


def write_outputs(
    spec: StudySpec, study: optuna.Study, outcome: TuneOutcome, folder: Path
) -> None:
    trials = study.get_trials(deepcopy=False)
    outcome.trials = [t for t in trials if t.user_attrs.get(PARENT_ATTR) == outcome.parent_id]
    outcome.best = best_trials(study)
    outcome.csv_path = write_trials(study, outcome.best, folder)
    outcome.figures = write_figures(study, spec, folder)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
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
            how = "the Pareto front"
            value = _pairs(zip(spec.metrics, trial.values, strict=True), " ", ", ")
        else:
            how, value = spec.metrics[0], _format(trial.value)
        chosen.append(BestRun(record.run_id, record.name, ALL_RUNS, how,
                              f"{value}, trial {trial.number}"))
    return chosen


def write_trials(study: optuna.Study, best: list[FrozenTrial], folder: Path) -> Path:
    """Optuna's trials dataframe, the test scores beside the objectives, the MLflow run ids and
    a ``best`` column."""
    folder.mkdir(parents=True, exist_ok=True)
    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs",
                                          "datetime_start", "datetime_complete", "duration"))
    table = table.rename(columns=lambda c: c.removeprefix("user_attrs_"))
    table = table.drop(columns=[c for c in table if c.startswith(LEASE_PREFIX)])
    if "number" in table:
        table["best"] = table["number"].isin({t.number for t in best})
    path = folder / "trials.csv"
    write_text(path, table.to_csv(index=False))
    return path


FIGURE_PATTERNS = ("optimization_history*.png", "param_importances*.png",
                   "intermediate_values.png", "pareto_front.png")


def write_figures(study: optuna.Study, spec: StudySpec, folder: Path) -> list[Path]:
    """Optuna's matplotlib figures of the study as PNG files; one Optuna cannot draw is
    skipped."""
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
    makers: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
    for index, metric in enumerate(spec.metrics):
        suffix = "" if len(spec.metrics) == 1 else f"_{metric}"
        target = {"target": lambda t, i=index: t.values[i], "target_name": metric}
        makers.append((f"optimization_history{suffix}.png", figures.plot_optimization_history,
                       target))
        if len(complete) >= 2 and len(spec.space) >= 2:
            makers.append((f"param_importances{suffix}.png", figures.plot_param_importances,
                           target))
    if len(spec.metrics) == 1 and any(t.intermediate_values for t in trials):
        makers.append(("intermediate_values.png", figures.plot_intermediate_values, {}))
    if len(spec.metrics) == 2:
        makers.append(("pareto_front.png", figures.plot_pareto_front,
                       {"target_names": spec.metrics}))
    written = []
    for name, plot, options in makers:
        try:
            # Optuna's figures set the ggplot style for the whole process (plt.style.use):
            # undone after each, so that the pictures drawn later are drawn as always
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")
                axes = plot(study, **options)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                figure.savefig(folder / name, bbox_inches="tight", dpi=100)
            plt.close(figure)
            written.append(folder / name)
        except Exception as exc:  # noqa: BLE001 - e.g. importances of parameters that never vary
            print(f"vaebench: figure {name} skipped: {first_line(exc)}", file=sys.stderr)
            plt.close("all")
    return written


COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _counts(trials: list[FrozenTrial]) -> dict[TrialState, int]:
    return {state: sum(t.state == state for t in trials) for state in COUNTED}


def _tested(trial: FrozenTrial) -> dict[str, Any]:
    return {k: v for k, v in trial.user_attrs.items() if k.startswith("test_")}


def invocation_metrics(spec: StudySpec, outcome: TuneOutcome) -> dict[str, float]:
    counted = _counts(outcome.trials).items()
    counts = {f"trials_{state.name.lower()}": float(count) for state, count in counted}
    if len(outcome.best) == 1 and not spec.multi_objective:
        best = outcome.best[0]
        counts[f"best_{spec.metrics[0]}"] = float(best.value)
        counts.update({f"best_{k}": float(v) for k, v in _tested(best).items()})
    return counts


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _pairs(items: Iterable[tuple[str, Any]], between: str = "=", joiner: str = " ") -> str:
    return joiner.join(f"{k}{between}{_format(v)}" for k, v in items)


def print_outcome(spec: StudySpec, outcome: TuneOutcome, storage: str, stream: TextIO) -> None:
    complete, pruned, failed = _counts(outcome.trials).values()
    total = len(outcome.study.get_trials(deepcopy=False))
    print(f"study {spec.name}: {total} trials in {storage}; this run: {len(outcome.trials)} "
          f"({complete} complete, {pruned} pruned, {failed} failed)", file=stream)
    goals = ", ".join(f"{o.direction} {o.metric}" for o in spec.objectives)
    if not outcome.best:
        print(f"no complete trial yet ({goals})", file=stream)
    elif spec.multi_objective:
        print(f"Pareto front on validation ({len(outcome.best)} trials; {goals}), "
              "test scores beside:", file=stream)
    else:
        print(f"best trial, chosen on validation ({goals}), test scores beside:", file=stream)
    for trial in outcome.best:
        values = _pairs(zip(spec.metrics, trial.values, strict=True))
        tested = _pairs(_tested(trial).items())
        values = f"{values}  [{tested}]" if tested else values
        print(f"  trial {trial.number}: {values}  {_pairs(trial.params.items())}  "
              f"(mlflow run {_run_id(trial)})", file=stream)
    print(f"trials: {outcome.csv_path}", file=stream)
    if outcome.figures:
        names = ", ".join(p.name for p in outcome.figures)
        print(f"figures: {names} in {outcome.csv_path.parent}", file=stream)
    for line in outcome.worker_errors:
        print(f"vaebench: {line}", file=sys.stderr)
    for trial in outcome.failed:
        print(f"FAILED trial {trial.number}: see its MLflow run {_run_id(trial)} "
              "(tag vaebench.error)", file=stream)


def _run_id(trial: FrozenTrial) -> str:
    return trial.user_attrs.get(RUN_ID_ATTR, "-")
