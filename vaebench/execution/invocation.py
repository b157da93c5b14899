"""What a ``run`` or ``tune`` invocation is told besides its file; the command line fills these
records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vaebench.execution.worker_plan import Execution

if TYPE_CHECKING:
    from vaebench.lifecycle.finishing_helper import FinishingHelper


@dataclass(frozen=True)
class Invocation:
    tracking_uri: str | None = None  # the MLflow store (None: sqlite:///mlflow.db)
    data_root: str | Path | None = None  # the datasets (None: $VAEBENCH_DATA or ./data)
    results_dir: str | Path = "results"
    register: bool = True  # the best runs become versions of a registered model
    max_stack: int = 1  # the most runs one stack trains (1: each alone)
    stack_everywhere: bool = False  # --stack on: also what stacks on CUDA only, on the CPU


@dataclass(frozen=True)
class GridInvocation(Invocation):
    """``run``: the report, whether FINISHED runs train again, the checkpoints' folder (None:
    beside the SQLite store) and who trains; ``finishing_helper``: a helper process started with
    the invocation, for the runs finished here (:func:`run_grid` closes it)."""

    report: bool = True
    rerun: bool = False
    checkpoint_dir: str | Path | None = None
    execution: Execution = field(default_factory=Execution)
    finishing_helper: FinishingHelper | None = None


@dataclass(frozen=True)
class StudyInvocation(Invocation):
    """``tune``: how many trials (None: the file's ``n_trials`` minus those done), for how
    long, in how many processes, in which Optuna storage (None: the file's)."""

    n_trials: int | None = None
    timeout: float | None = None
    workers: int = 1
    storage: str | None = None
