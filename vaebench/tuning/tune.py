"""Optuna studies: ``python -m vaebench tune study.yaml``. How a study maps onto MLflow and
how ``--workers`` processes share it: docs/tuning.md."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import optuna

from vaebench.data import resolve_root
from vaebench.execution.invocation import StudyInvocation
from vaebench.execution.worker_plan import cores, run_processes
from vaebench.execution.worker_processes import worker_process
from vaebench.lifecycle.claims import KEEPER, RunLease, lease_tags, recover_abandoned
from vaebench.lifecycle.post_run import end_quietly
from vaebench.lifecycle.preflight import check_output_folder
from vaebench.lifecycle.provenance import base_tags
from vaebench.lifecycle.workspace import Workspace
from vaebench.reporting.best_models import register_best
from vaebench.signals import Interrupted, deferred_signals, interruptible
from vaebench.spec.config import VaebenchError, first_line
from vaebench.spec.study import StudySpec, load_study
from vaebench.tracking.store import resolve_tracking_uri
from vaebench.tracking.tracker import MLflowTracker, Tracker, TrackingError, tracker_opened_during
from vaebench.tuning.outputs import (
    TuneOutcome,
    best_runs,
    invocation_metrics,
    print_outcome,
    write_outputs,
)
from vaebench.tuning.samplers import make_pruner, make_sampler
from vaebench.tuning.storage import (
    MEMORY,
    check_storage,
    display_storage,
    open_storage,
    resolve_storage,
)
from vaebench.tuning.trial import (
    StaleTrials,
    TrialObjective,
    fail_abandoned_trials,
    trial_run,
    trials_done,
)
from vaebench.tuning.trial_stack import optimize_in_stacks, stack_problem

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # Optuna -> MLflow
STUDY_TAG = "vaebench.study"


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
    max_stack: int = 1  # the most trials one stack trains (1: each alone)


def _quiet_optuna() -> None:
    """Optuna's own warnings off: a failed trial is listed by vaebench, with its MLflow run,
    instead of a traceback in Optuna's log."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # stacked trials are asked and told: the lease keeper beats for them (TrialLease)
    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with")


def optimize(
    job: WorkerJob, n_trials: int, worker: int, tracker: Tracker,
    storage: optuna.storages.BaseStorage | None = None, workspace: Workspace | None = None,
) -> None:
    """A failing trial is FAIL, no more; a failing store stops the study (TrackingError)."""
    _quiet_optuna()
    # a distinct stream per worker and per continuation, reproducible from the study seed
    seed = None if job.spec.seed is None else job.spec.seed + job.seed_offset + 1000 * worker
    storage = storage or open_storage(job.storage, StaleTrials(tracker))
    study = optuna.load_study(study_name=job.spec.name, storage=storage,
                              sampler=make_sampler(job.spec, seed), pruner=make_pruner(job.spec))
    workspace = workspace or Workspace(job.data_root, checkpoints=None)
    objective = TrialObjective(job.spec, tracker, job.tags, workspace, job.total)
    if job.max_stack > 1:  # run_study checked that the study's trials stack
        optimize_in_stacks(study, objective, n_trials, job.timeout, job.max_stack)
        return
    study.optimize(objective, n_trials=n_trials, timeout=job.timeout, catch=(Exception,))
    if objective.store_failure is not None:
        raise objective.store_failure


def worker_main(job: WorkerJob, n_trials: int, worker: int) -> None:
    with worker_process(worker, job.threads):
        tracker = MLflowTracker(job.tracking_uri)
        tracker.join_grid(job.experiment_id, job.parent_id)
        optimize(job, n_trials, worker, tracker)


def _shared_study(spec: StudySpec, ref: str, storage) -> optuna.Study:
    try:
        existing = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        directions = [d.name.lower() for d in existing.directions]
        names = existing.metric_names or spec.metrics
        if directions != spec.directions or list(names) != spec.metrics:
            held = ", ".join(f"{d} {m}" for m, d in zip(names, directions, strict=False))
            raise VaebenchError(f"storage {display_storage(ref)} already holds a study "
                                f"{spec.name!r} that asks to {held}; give the study another name "
                                "or use another storage")
    study = optuna.create_study(storage=storage, study_name=spec.name,
                                directions=spec.directions, load_if_exists=True)
    if existing is None:
        study.set_metric_names(spec.metrics)
    return study


def _trials_per_stack(spec: StudySpec, max_stack: int, stack_everywhere: bool) -> int:
    """The most trials one stack trains (1: each alone), and a line saying so."""
    if max_stack < 2:
        return 1
    problem = stack_problem(spec, max_stack, stack_everywhere)
    if problem is not None:
        print(f"study {spec.name}: trials train one by one: {problem}", file=sys.stderr)
        return 1
    print(f"study {spec.name}: up to {max_stack} trials at a time train as one stack "
          "(--stack off: one by one)", file=sys.stderr)
    return max_stack


def run_study(
    study_path: str | Path, invocation: StudyInvocation | None = None, stream: TextIO | None = None
) -> TuneOutcome:
    """Run the study's trials still to do (the file's ``n_trials`` minus those done), or
    ``invocation.n_trials`` more; record and report them."""
    invocation = invocation or StudyInvocation()
    stream = stream or sys.stdout
    study_run = _StudyRun.open(Path(study_path), invocation)
    spec, study = study_run.spec, study_run.study
    n_trials = invocation.n_trials
    if n_trials is None:
        n_trials = spec.n_trials - trials_done(study)
        if n_trials <= 0:
            print(f"study {spec.name}: {spec.n_trials} of n_trials: {spec.n_trials} done; "
                  "nothing to do (--n-trials N adds N more)", file=stream)
            return TuneOutcome(study=study, storage=study_run.ref, parent_id=None)
    outcome = study_run.run(n_trials, min(invocation.workers, n_trials))
    print_outcome(spec, outcome, display_storage(study_run.ref), stream)
    if invocation.register and outcome.best:
        best = best_runs(spec, outcome.best, study_run.tracker)
        images = study_run.workspace.test_images
        outcome.registered = register_best(study_run.tracker, spec.name, best, images,
                                           outcome.parent_id, stream)
    return outcome


@dataclass
class _StudyRun:
    path: Path
    spec: StudySpec
    invocation: StudyInvocation
    uri: str
    ref: str  # the Optuna storage
    workspace: Workspace
    tracker: Tracker
    storage: optuna.storages.BaseStorage
    study: optuna.Study

    @classmethod
    def open(cls, path: Path, invocation: StudyInvocation) -> _StudyRun:
        """Every error a user can cause is raised before either store is created."""
        _quiet_optuna()
        spec = load_study(path)
        if invocation.n_trials is not None and invocation.n_trials < 1:
            raise VaebenchError("--n-trials: must be >= 1")
        if invocation.workers < 1:
            raise VaebenchError("--workers: must be >= 1")
        uri = resolve_tracking_uri(invocation.tracking_uri)
        ref = resolve_storage(invocation.storage or spec.storage, uri)
        if ref == MEMORY and invocation.workers > 1:
            raise VaebenchError("--workers: several processes need a shared storage (an SQLite "
                                "file, a SQLAlchemy URL or a journal file), not memory")
        make_sampler(spec, spec.seed)
        make_pruner(spec)
        check_storage(ref)
        check_output_folder(Path(invocation.results_dir))
        workspace = Workspace(resolve_root(invocation.data_root), checkpoints=None)
        base = [trial_run(spec, "base", {})]
        workspace.check(base)
        tracker = tracker_opened_during(uri, lambda: workspace.prepare(base))
        storage = open_storage(ref, StaleTrials(tracker))
        study = _shared_study(spec, ref, storage)
        # the runs still RUNNING count (abandoned ones recovered, live ones left): the
        # store filters out the study's finished trials, however many there are
        previous = tracker.previous_runs(spec.name, STUDY_TAG, spec.name, unfinished_only=True)
        now = recover_abandoned(tracker, previous, sys.stderr)
        others_live = any(record.status == "RUNNING" for record in now)
        fail_abandoned_trials(study, StaleTrials(tracker), others_live)
        return cls(path, spec, invocation, uri, ref, workspace, tracker, storage, study)

    def job(self, n_trials: int, workers: int) -> WorkerJob:
        spec, tracker = self.spec, self.tracker
        tags = base_tags(**{
            STUDY_TAG: spec.name, "vaebench.study_file": str(self.path), "optuna.study": spec.name,
            "optuna.storage": display_storage(self.ref),
        })
        started = time.strftime("%Y%m%d-%H%M%S")
        parent = tracker.start_grid(spec.name, f"{spec.name}-{started}", {
            **tags, "vaebench.trials": str(n_trials), "vaebench.workers": str(workers),
            **lease_tags(),
        })
        KEEPER.hold(RunLease(tracker, parent))  # let go once it ends (no longer RUNNING)
        existing, told = len(self.study.trials), self.invocation
        timeout = told.timeout if told.timeout is not None else spec.timeout
        return WorkerJob(
            spec, self.ref, self.uri, tracker.experiment_id, parent, tags, self.workspace.data_root,
            existing + n_trials, timeout, existing, max(1, cores() // workers),
            _trials_per_stack(spec, told.max_stack, told.stack_everywhere),
        )

    def run(self, n_trials: int, workers: int) -> TuneOutcome:
        job = self.job(n_trials, workers)
        spec, study, tracker, parent = self.spec, self.study, self.tracker, job.parent_id
        outcome = TuneOutcome(study=study, storage=self.ref, parent_id=parent)
        folder = Path(self.invocation.results_dir) / spec.name
        ended = False
        with interruptible():
            try:
                if workers == 1:
                    optimize(job, n_trials, 0, tracker, self.storage, self.workspace)
                else:
                    outcome.worker_errors = fan_out(job, n_trials, workers)
                write_outputs(spec, study, outcome, folder)
                tracker.log_metrics(parent, invocation_metrics(spec, outcome))
                tracker.log_artifacts(parent, folder)
                with deferred_signals():
                    tracker.end_run(parent, "FINISHED")
                    ended = True
            except Interrupted as exc:
                if not ended:
                    end_quietly(tracker, parent, "KILLED",
                                f"{exc}; rerun the same command to continue")
                    write_outputs(spec, study, outcome, folder)  # what is known so far
                raise
            except TrackingError as exc:
                raise TrackingError(f"{exc}; the study stopped. Rerun the same command once the "
                                    "store answers: it fails the stopped trials and runs those "
                                    "still to do") from None
            except BaseException as exc:
                end_quietly(tracker, parent, "FAILED", first_line(exc))
                raise
        return outcome


def fan_out(job: WorkerJob, n_trials: int, workers: int) -> list[str]:
    shares = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
    arguments = {index: (job, share, index) for index, share in enumerate(shares) if share}
    return run_processes(worker_main, arguments, "tune-")
