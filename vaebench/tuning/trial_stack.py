"""Trials of a study trained as stacks: ask Optuna for up to K trials at once, train them as a
batch, tell each its own result. Which studies stack, and why only those: docs/scaling.md."""

from __future__ import annotations

import time

import optuna
from optuna.trial import TrialState

from vaebench.execution.dry_run import trains_on_cpu
from vaebench.signals import deferred_signals
from vaebench.spec.config import VaebenchError
from vaebench.spec.study import StudySpec
from vaebench.stacking.plan import MEMBER_KEYS, config_problem
from vaebench.tuning.trial import TrialObjective, TrialWork, trial_run

# measured on a 2-core CPU (docs/performance.md, "A study's trials stacked"): 27.7 to 31.5 s
# stacked against 27.8 to 34.2 s one by one, the pruner stopping 9 trials one by one, 6 stacked
PRUNED_ON_CPU = ("on the CPU a study with a pruner trains its trials one by one: there a stack "
                 "was measured no faster, its members never compared with each other by the pruner")


def stack_problem(spec: StudySpec, max_stack: int, everywhere: bool = False) -> str | None:
    """Why the study's trials train one by one, or None; ``everywhere`` (``--stack on``): also
    where the CPU's measurements say one by one."""
    if max_stack < 2:
        return "--stack off"
    if spec.sampler == "grid":  # it stops the study when done, which only optimize allows
        return "its grid sampler stops the study from inside Optuna's optimize"
    varied = sorted(set(spec.space) - set(MEMBER_KEYS))
    if varied:
        return f"its space varies {', '.join(varied)} (stacks vary only {', '.join(MEMBER_KEYS)})"
    try:
        config = trial_run(spec, "base", {}).config
    except VaebenchError as exc:  # the base is valid only with sampled values
        return f"its base config alone is no valid run ({exc})"
    on_cpu = not everywhere and trains_on_cpu(config)
    if on_cpu and spec.pruner != "none":
        return PRUNED_ON_CPU
    return config_problem(config, on_cpu)


def optimize_in_stacks(
    study: optuna.Study, objective: TrialObjective, n_trials: int, timeout: float | None,
    max_stack: int,
) -> None:
    """Start no batch after ``timeout`` seconds. A signal or a failing store stops the study
    (every trial asked and not yet told is FAIL, marked stopped). Each trial is told as soon
    as its run ends, while the rest of its stack may still train."""
    started = time.monotonic()
    done = 0

    def tell(work: TrialWork, error: BaseException | None) -> None:
        with deferred_signals():  # told once: a signal waits until the tell is recorded
            state = objective.settle(work, error)
            values = work.values() if state == TrialState.COMPLETE else None
            study.tell(work.trial, values, state=state)
            work.told = True

    while done < n_trials:
        if timeout is not None and time.monotonic() - started >= timeout:
            return
        works: list[TrialWork] = []
        optuna.storages.fail_stale_trials(study)  # as Optuna's optimize does before each ask
        try:
            for _ in range(min(max_stack, n_trials - done)):
                works.append(objective.work_for(study.ask()))
                done += 1
            for work in works:
                objective.own(work, runs_at_once=len(works))
            objective.train(works, max_stack, tell)
        except BaseException as exc:  # a signal, the store: no trial may stay RUNNING
            for work in works:
                if not work.told:
                    tell(work, exc)
            raise
