"""What a trained run hands to its finisher (:mod:`vaebench.lifecycle.post_run`), and the
line that says it is finished."""

from __future__ import annotations

import sys
from concurrent.futures import Future
from functools import partial

from vaebench.lifecycle.artifacts import picture_arrays, weights_bytes
from vaebench.lifecycle.post_run import FinishJob, RunOutcome
from vaebench.lifecycle.workspace import Workspace
from vaebench.spec.config import first_line
from vaebench.spec.grid import RunSpec
from vaebench.tracking.tracker import TrackingError
from vaebench.training.trainer import TrainResult


def finish_job(
    run: RunSpec, run_id: str, result: TrainResult, workspace: Workspace, pictures: bool = True
) -> FinishJob:
    """What finishing a trained run (:mod:`vaebench.lifecycle.post_run`) needs of its model,
    taken now on its device: the scores the model family adds, the parameter count, its
    weights and, with ``pictures``, its pictures' arrays."""
    model = result.model
    classifier = partial(workspace.classifiers.get, run.config.data.dataset, model.device)
    summary = {
        **result.summary,
        **model.extra_scores(classifier),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }
    return FinishJob(
        run=run,
        run_id=run_id,
        summary=summary,
        last=result.final.as_dict(),
        seconds=result.seconds,
        clusters=result.clusters,
        weights=weights_bytes(model),
        pictures=picture_arrays(model, workspace.load_splits(run)) if pictures else None,
        checkpoints=workspace.checkpoints,
    )


def say_finished(label: str, finishing: Future[RunOutcome]) -> None:
    """The line of a run finished in the background, once it is."""
    error = finishing.exception()
    status = "FINISHED" if error is None else f"FAILED after training: {first_line(error)}"
    if isinstance(error, TrackingError):  # the run keeps its lease: a rerun finishes it
        status = f"STOPPED (tracking store failed: {first_line(error)})"
    print(f"{label} {status}", file=sys.stderr, flush=True)
