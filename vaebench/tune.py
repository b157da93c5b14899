"""Optuna studies: ``python -m vaebench tune study.yaml``.

A trial is one run: the study's base config plus the values Optuna samples,
trained by the grid's trainer (:func:`vaebench.train.fit`). Every epoch the
trial logs its metrics to its own MLflow child run and, in a single-objective
study, reports the objective to the pruner (``trial.report`` /
``should_prune``). The MLflow side mirrors a grid: the study is an experiment,
each ``tune`` invocation a parent run, each trial a nested child run tagged
with its Optuna trial number and final state; the child's run id is stored on
the trial as the user attribute ``mlflow_run_id``.

Optuna trial states map onto MLflow run statuses as ``STATUS`` says: COMPLETE
-> FINISHED, PRUNED -> KILLED (stopped early on purpose), FAIL -> FAILED; the
tag ``optuna.state`` holds Optuna's name.

Both stores are created once, in the calling process, before ``--workers``
processes are started; each worker opens the same stores, logs its trials under
the one parent run and asks the shared study for parameters.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from vaebench.catalogue import METRICS
from vaebench.claims import abandoned, lease_tags, recover_abandoned
from vaebench.config import ConfigError, RunConfig, VaebenchError, run_config_problems, set_dotted
from vaebench.data import resolve_root
from vaebench.execute import Workspace, execute, record_invalid
from vaebench.grid import RunSpec, run_key
from vaebench.preflight import check_output_folder
from vaebench.provenance import base_tags
from vaebench.signals import Interrupted, interruptible, register_child
from vaebench.study import Param, StudySpec, load_study
from vaebench.tracking import (
    MLflowTracker,
    Tracker,
    TrackingError,
    resolve_tracking_uri,
    sqlite_path,
)
from vaebench.train import EpochMetrics

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # Optuna -> MLflow
RUN_ID_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"  # which `tune` invocation ran the trial
STUDY_TAG = "vaebench.study"
STOPPED_ATTR = "stopped"  # why a trial FAILED without being at fault: a signal, a lost owner
MEMORY = "memory"
JOURNAL = "journal:"
SQLITE_TIMEOUT_S = 60  # several processes share one SQLite file; wait for the lock


# ---------------------------------------------------------------------------
# storage


def resolve_storage(chosen: str | None, tracking_uri: str) -> str:
    """The study's storage as one string: a SQLAlchemy URL, ``journal:<file>`` or ``memory``.

    Default: ``optuna.db`` beside the MLflow SQLite file, else (a tracking server)
    in the working folder. A name ending in ``.log`` is an Optuna journal file; any
    other bare file name is an SQLite file.
    """
    if not chosen:
        db = sqlite_path(tracking_uri)
        return f"sqlite:///{(db.parent if db is not None else Path('.')) / 'optuna.db'}"
    chosen = chosen.strip()
    if chosen in (MEMORY, ":memory:"):
        return MEMORY
    if chosen.startswith(JOURNAL) or "://" in chosen:
        return chosen
    if chosen.endswith(".log"):
        return JOURNAL + chosen
    return f"sqlite:///{chosen}"


def display_storage(ref: str) -> str:
    """The storage with any password hidden, for messages and tags."""
    if "://" not in ref:
        return ref
    from sqlalchemy.engine import make_url

    try:
        return make_url(ref).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given
        return ref


def check_storage(ref: str) -> None:
    """Problems with a storage that show before anything is created: folders, URL, driver."""
    if ref == MEMORY:
        return
    path = Path(ref.removeprefix(JOURNAL)) if ref.startswith(JOURNAL) else sqlite_path(ref)
    if path is not None:
        if not path.expanduser().resolve().parent.is_dir():
            raise VaebenchError(f"storage {ref}: folder {path.parent} does not exist")
        return
    from sqlalchemy.engine import make_url

    try:
        make_url(ref).get_dialect().import_dbapi()
    except ImportError as exc:
        raise VaebenchError(
            f"storage {display_storage(ref)}: {_first_line(exc)} (install the database driver; "
            'for postgresql+psycopg:// URLs: pip install "psycopg[binary]")'
        ) from None
    except Exception as exc:  # noqa: BLE001 - unparsable URL, unknown dialect
        raise VaebenchError(f"storage {display_storage(ref)}: {_first_line(exc)}") from None


def open_storage(ref: str) -> optuna.storages.BaseStorage:
    """The Optuna storage ``ref`` names (tables are created on first use)."""
    if ref == MEMORY:
        return optuna.storages.InMemoryStorage()
    if ref.startswith(JOURNAL):
        path = Path(ref.removeprefix(JOURNAL)).expanduser()
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.journal.JournalStorage(backend)
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if ref.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(ref, engine_kwargs=engine)
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad credentials, ...
        raise VaebenchError(f"storage {display_storage(ref)}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------
# samplers and pruners


SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}


def make_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(spec.grid_space(), seed=seed)
    if spec.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise VaebenchError(
                f"{spec.source}: sampler: cmaes needs the cmaes package (pip install cmaes)"
            ) from None
    try:
        return SAMPLERS[spec.sampler](seed=seed, **spec.sampler_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"{spec.source}: sampler: {_first_line(exc)}"]) from None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    try:
        return PRUNERS[spec.pruner](**spec.pruner_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"{spec.source}: pruner: {_first_line(exc)}"]) from None


def sampler_seed(spec: StudySpec, offset: int) -> int | None:
    """A distinct stream per worker and per continuation, reproducible from the study seed."""
    return None if spec.seed is None else spec.seed + offset


# ---------------------------------------------------------------------------
# one trial


def suggest(trial: optuna.Trial, key: str, param: Param) -> Any:
    """The value of one dimension for this trial; Optuna's parameter name is the dotted key."""
    if param.type == "float":
        return trial.suggest_float(key, param.low, param.high, log=param.log, step=param.step)
    if param.type == "int":
        step = int(param.step or 1)
        return trial.suggest_int(key, int(param.low), int(param.high), step=step, log=param.log)
    return param.decode(trial.suggest_categorical(key, param.optuna_choices()))


def trial_run(spec: StudySpec, name: str, sampled: dict[str, Any]) -> RunSpec:
    """Base config plus sampled values as a run; VaebenchError if they make no valid config."""
    tree = copy.deepcopy(spec.base)
    for key, value in sampled.items():
        set_dotted(tree, key, value)
    problems = run_config_problems(tree)
    if problems:
        raise VaebenchError("; ".join(f"{key}: {message}" for key, message in problems))
    config = RunConfig.model_validate(tree)
    return RunSpec(name, run_key(config), config, tuple(sampled.items()))


def reported_beside(spec: StudySpec, final: dict[str, float]) -> dict[str, float]:
    """The test scores shown beside a trial's validation objectives: each objective's test
    counterpart, the test ELBO and, where estimated, the test NLL."""
    names = [METRICS[m].counterpart for m in spec.metrics] + ["test_elbo", "test_nll"]
    return {name: float(final[name]) for name in dict.fromkeys(names) if name in final}


def objective_values(spec: StudySpec, final: dict[str, float]) -> list[float]:
    values = []
    for metric in spec.metrics:
        if metric not in final:
            raise VaebenchError(f"objective {metric}: this run does not report it")
        value = float(final[metric])
        if not math.isfinite(value):
            raise VaebenchError(f"objective {metric}: the run ended with {value}")
        values.append(value)
    return values


class TrialObjective:
    """Optuna's objective: sample a run and hand it to the execution layer, one MLflow child
    run per trial; pruning is its epoch hook, the objectives its extra metrics."""

    def __init__(
        self, spec: StudySpec, tracker: Tracker, tags: dict[str, str], workspace: Workspace,
        total: int,
    ):
        self.spec = spec
        self.tracker = tracker
        self.tags = tags
        self.workspace = workspace
        self.total = total
        self.store_failure: TrackingError | None = None

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        trial.set_user_attr(PARENT_ATTR, self.tracker.parent_id)  # first: marks it ours
        _renew_lease(trial)
        sampled = {key: suggest(trial, key, param) for key, param in self.spec.space.items()}
        name = f"trial-{trial.number:04d}"
        tags = {**self.tags, "optuna.trial_number": str(trial.number), "optuna.state": "RUNNING"}
        run_id: str | None = None

        def on_start(started: str) -> None:
            nonlocal run_id
            run_id = started
            trial.set_user_attr(RUN_ID_ATTR, started)

        state = "FAIL"
        try:
            try:
                run = trial_run(self.spec, name, sampled)
            except VaebenchError as exc:
                on_start(record_invalid(self.tracker, name, sampled, tags, str(exc)))
                print(f"[{trial.number + 1}/{self.total}] {name} FAIL: {exc}", file=sys.stderr)
                raise
            objectives: list[float] = []

            def score(final: dict[str, float]) -> dict[str, float]:
                objectives.extend(objective_values(self.spec, final))
                for key, value in reported_beside(self.spec, final).items():
                    trial.set_user_attr(key, value)
                return {
                    f"objective.{m}": v
                    for m, v in zip(self.spec.metrics, objectives, strict=True)
                }

            execute(
                run,
                self.tracker,
                self.workspace,
                tags,
                trial.number + 1,
                self.total,
                on_start=on_start,
                epoch_hook=self._epoch_hook(trial),
                extra_metrics=score,
                stopped_early=(optuna.TrialPruned,),
                pictures=self.spec.artifacts,
            )
            state = "COMPLETE"
            return objectives[0] if len(objectives) == 1 else tuple(objectives)
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except KeyboardInterrupt as exc:
            trial.set_user_attr(STOPPED_ATTR, str(exc) or "interrupted")
            raise
        except TrackingError as exc:  # no point in the next trial: stop the study
            self.store_failure = exc
            trial.study.stop()
            raise
        finally:
            if run_id is not None and self.store_failure is None:
                self.tracker.set_tags(run_id, {"optuna.state": state})

    def _epoch_hook(self, trial: optuna.Trial):
        """Renew the trial's lease; report the objective to the pruner, which may stop the
        trial. Optuna prunes single-objective studies only; a metric known only after the
        last epoch (e.g. val_ari) is never reported, so never pruned (study files with such
        a pruner are rejected)."""
        pruned_on = None if self.spec.multi_objective else self.spec.metrics[0]

        def hook(metrics: EpochMetrics) -> None:
            longest = metrics.epoch_seconds + metrics.eval_seconds
            _renew_lease(trial, longest)
            self.tracker.set_tags(self.tracker.parent_id, lease_tags(longest))
            values = metrics.as_dict()
            if pruned_on in values:
                trial.report(values[pruned_on], metrics.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {metrics.epoch}")

        return hook


def _renew_lease(trial: optuna.Trial, longest_epoch_seconds: float = 0.0) -> None:
    for key, value in lease_tags(longest_epoch_seconds).items():
        trial.set_user_attr(key, value)


def fail_abandoned_trials(study: optuna.Study, tracker: Tracker, stream: TextIO) -> int:
    """Trials a killed invocation left RUNNING (their owner process is gone or its lease
    expired): FAIL in Optuna, marked stopped, their MLflow runs KILLED. Returns how many."""
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = abandoned(trial.user_attrs)
        if reason is None:
            continue
        storage = study._storage  # noqa: SLF001 - Optuna has no public call for another's trial
        storage.set_trial_user_attr(trial._trial_id, STOPPED_ATTR, f"abandoned: {reason}")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            tracker.end_run(run_id, "KILLED", f"abandoned: {reason}")
            tracker.set_tags(run_id, {"optuna.state": "FAIL"})
        print(f"trial {trial.number} was left RUNNING ({reason}): marked FAIL", file=stream)
        count += 1
    return count


def trials_done(study: optuna.Study) -> int:
    """Trials that count toward the file's ``n_trials``: complete, pruned, or failed by their
    own fault (not those stopped by a signal or a lost process)."""
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and STOPPED_ATTR not in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


# ---------------------------------------------------------------------------
# a study invocation


@dataclass
class WorkerJob:
    """What a worker process needs to join the study (plain data: it crosses a spawn)."""

    spec: StudySpec
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_id: str
    tags: dict[str, str]
    data_root: Path
    total: int
    timeout: float | None
    seed_offset: int
    threads: int | None = None


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

    @property
    def failed(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.FAIL]


def _quiet_optuna() -> None:
    """Optuna's own warnings off: a failed trial is listed by vaebench, with its MLflow run,
    instead of a traceback in Optuna's log."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def optimize(
    job: WorkerJob,
    n_trials: int,
    worker: int,
    tracker: Tracker,
    storage: optuna.storages.BaseStorage | None = None,
    workspace: Workspace | None = None,
) -> None:
    """Run ``n_trials`` trials of the study in this process; a failing trial is FAIL, no more;
    a failing store stops the study (TrackingError)."""
    _quiet_optuna()
    study = optuna.load_study(
        study_name=job.spec.name,
        storage=storage or open_storage(job.storage),
        sampler=make_sampler(job.spec, sampler_seed(job.spec, job.seed_offset + 1000 * worker)),
        pruner=make_pruner(job.spec),
    )
    workspace = workspace or Workspace(job.data_root, checkpoints=None)
    objective = TrialObjective(job.spec, tracker, job.tags, workspace, job.total)
    study.optimize(objective, n_trials=n_trials, timeout=job.timeout, catch=(Exception,))
    if objective.store_failure is not None:
        raise objective.store_failure


def worker_main(job: WorkerJob, n_trials: int, worker: int) -> None:
    """Entry point of a ``--workers`` process: its own tracker on the one parent run.

    In a process group of its own, so that a terminal's Ctrl-C reaches the parent alone,
    which passes it on (a signal sent to the parent's pid reaches the workers the same way).
    """
    os.setpgrp()
    if job.threads:
        torch.set_num_threads(job.threads)
    with interruptible():
        try:
            tracker = MLflowTracker(job.tracking_uri)
            tracker.join_grid(job.experiment_id, job.parent_id)
            optimize(job, n_trials, worker, tracker)
        except Interrupted as exc:
            sys.exit(exc.exit_status)
        except VaebenchError as exc:
            print(f"vaebench: worker {worker}: {exc}", file=sys.stderr)
            sys.exit(exc.exit_status)


def _shared_study(spec: StudySpec, ref: str, storage) -> optuna.Study:
    """Create the study, or load it and check it asks the same questions."""
    _quiet_optuna()
    try:
        existing = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        directions = [d.name.lower() for d in existing.directions]
        names = existing.metric_names or spec.metrics
        if directions != spec.directions or list(names) != spec.metrics:
            held = ", ".join(f"{d} {m}" for m, d in zip(names, directions, strict=False))
            raise VaebenchError(
                f"storage {display_storage(ref)} already holds a study {spec.name!r} that "
                f"asks to {held}; give the study another name or use another storage"
            )
    study = optuna.create_study(
        storage=storage,
        study_name=spec.name,
        directions=spec.directions,
        load_if_exists=True,
    )
    if existing is None:
        study.set_metric_names(spec.metrics)
    return study


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_study(
    study_path: str | Path,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    storage: str | None = None,
    tracking_uri: str | None = None,
    data_root: str | Path | None = None,
    results_dir: str | Path = "results",
    stream: TextIO | None = None,
) -> TuneOutcome:
    """Check a study file and run its trials still to do (the file's ``n_trials`` minus those
    done), or ``n_trials`` more; record and report them.

    Trials a killed invocation left RUNNING are failed first. Ctrl-C and SIGTERM stop
    the study cleanly (trials FAIL in Optuna, KILLED in MLflow, the parent KILLED).
    """
    stream = stream or sys.stdout
    study_path = Path(study_path)
    spec = load_study(study_path)
    if n_trials is not None and n_trials < 1:
        raise VaebenchError("--n-trials: must be >= 1")
    if workers < 1:
        raise VaebenchError("--workers: must be >= 1")
    timeout = timeout if timeout is not None else spec.timeout
    uri = resolve_tracking_uri(tracking_uri)
    ref = resolve_storage(storage or spec.storage, uri)
    if ref == MEMORY and workers > 1:
        raise VaebenchError(
            "--workers: several processes need a shared storage (an SQLite file, a SQLAlchemy "
            "URL or a journal file), not memory"
        )
    # everything a user can get wrong fails here, before either store is created
    make_sampler(spec, spec.seed)
    make_pruner(spec)
    check_storage(ref)
    check_output_folder(Path(results_dir))
    workspace = Workspace(resolve_root(data_root), checkpoints=None)
    workspace.prepare([trial_run(spec, "base", {})])

    tracker = MLflowTracker(uri)
    shared = open_storage(ref)
    study = _shared_study(spec, ref, shared)
    recover_abandoned(tracker, tracker.previous_runs(spec.name, STUDY_TAG, spec.name), sys.stderr)
    fail_abandoned_trials(study, tracker, sys.stderr)
    existing = len(study.trials)
    if n_trials is None:
        n_trials = spec.n_trials - trials_done(study)
        if n_trials <= 0:
            print(
                f"study {spec.name}: {spec.n_trials} of n_trials: {spec.n_trials} done; "
                "nothing to do (--n-trials N adds N more)",
                file=stream,
            )
            return TuneOutcome(study=study, storage=ref, parent_id=None)
    workers = min(workers, n_trials)
    tags = base_tags(
        **{
            STUDY_TAG: spec.name,
            "vaebench.study_file": str(study_path),
            "optuna.study": spec.name,
            "optuna.storage": display_storage(ref),
        }
    )
    started = time.strftime("%Y%m%d-%H%M%S")
    parent = tracker.start_grid(
        spec.name,
        f"{spec.name}-{started}",
        {
            **tags,
            "vaebench.trials": str(n_trials),
            "vaebench.workers": str(workers),
            **lease_tags(),
        },
    )
    job = WorkerJob(
        spec=spec,
        storage=ref,
        tracking_uri=uri,
        experiment_id=tracker.experiment_id,
        parent_id=parent,
        tags=tags,
        data_root=workspace.data_root,
        total=existing + n_trials,
        timeout=timeout,
        seed_offset=existing,
        threads=max(1, _cores() // workers),
    )
    outcome = TuneOutcome(study=study, storage=ref, parent_id=parent)
    with interruptible():
        try:
            if workers == 1:
                optimize(job, n_trials, 0, tracker, shared, workspace)
            else:
                outcome.worker_errors = fan_out(job, n_trials, workers)
            trials = study.get_trials(deepcopy=False)
            outcome.trials = [t for t in trials if t.user_attrs.get(PARENT_ATTR) == parent]
            outcome.best = best_trials(study)
            folder = Path(results_dir) / spec.name
            outcome.csv_path = write_trials(study, outcome.best, folder)
            outcome.figures = write_figures(study, spec, folder)
            tracker.log_metrics(parent, invocation_metrics(spec, outcome))
            tracker.log_artifacts(parent, folder)
        except Interrupted as exc:
            tracker.end_run(parent, "KILLED", f"{exc}; rerun the same command to continue")
            raise
        except TrackingError as exc:
            raise TrackingError(
                f"{exc}; the study stopped. Rerun the same command once the store answers: "
                "it fails the stopped trials and runs those still to do"
            ) from None
        except BaseException as exc:
            tracker.end_run(parent, "FAILED", _first_line(exc))
            raise
        tracker.end_run(parent, "FINISHED")
    print_outcome(spec, outcome, stream)
    return outcome


def fan_out(job: WorkerJob, n_trials: int, workers: int) -> list[str]:
    """``workers`` spawned processes share ``n_trials``; returns a line per worker that died.

    Spawned, not forked: a forked child inherits torch's thread pools and locks. A signal
    that stops this process is passed on to the workers, which end their trials cleanly.
    """
    context = multiprocessing.get_context("spawn")
    shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    processes = [
        context.Process(target=worker_main, args=(job, share, index), name=f"tune-{index}")
        for index, share in enumerate(shares)
        if share
    ]
    for process in processes:
        process.start()
        register_child(process.pid)
    try:
        for process in processes:
            process.join()
    except Interrupted as exc:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, exc.signum)
        for process in processes:
            process.join(timeout=60)
        raise
    return [
        f"worker {index} exited with status {process.exitcode}"
        for index, process in enumerate(processes)
        if process.exitcode != 0
    ]


# ---------------------------------------------------------------------------
# outputs


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best complete trial of a single-objective study, or the Pareto front."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    return [study.best_trial]


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
    if "number" in table:
        numbers = {t.number for t in best}
        table["best"] = table["number"].isin(numbers)
    path = folder / "trials.csv"
    table.to_csv(path, index=False)
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = make()
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.savefig(folder / name, bbox_inches="tight", dpi=100)
            plt.close(figure)
            written.append(folder / name)
        except Exception as exc:  # noqa: BLE001 - e.g. importances of parameters that never vary
            print(f"vaebench: figure {name} skipped: {_first_line(exc)}", file=sys.stderr)
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


def print_outcome(spec: StudySpec, outcome: TuneOutcome, stream: TextIO) -> None:
    ours = outcome.trials
    states = {
        s: sum(t.state == s for t in ours)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    total = len(outcome.study.get_trials(deepcopy=False))
    print(
        f"study {spec.name}: {total} trials in {display_storage(outcome.storage)}; this run: "
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
