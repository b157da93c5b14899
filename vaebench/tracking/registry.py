"""The Tracker's model half: a run's model logged with MLflow's PyTorch flavor, and registered
(see docs/tracking.md#registered-models). Its pip requirements are given: inferring them loads
the model in a subprocess."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import vaebench

MODEL_NAME = "model"  # the logged model's name, as the run's Models column shows it
SERVED_TAG = "vaebench.served"  # on logged models vaebench made: "reconstruction"
REQUIRED = ("torch", "pydantic", "pyyaml", "numpy")  # what unpickling the model imports
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def logged_model_of(client: Any, run_id: str) -> str | None:
    """The id of a READY model vaebench logged from ``run_id`` before, if any (one deleted
    since is passed over)."""
    from mlflow.exceptions import MlflowException

    outputs = client.get_run(run_id).outputs
    for output in (outputs.model_outputs if outputs else None) or []:
        try:
            model = client.get_logged_model(output.model_id)
        except MlflowException:
            continue
        if model.tags.get(SERVED_TAG) and str(model.status).endswith("READY"):
            return model.model_id
    return None


def log_model(client: Any, uri: str, run_id: str, module: Any, example: Any, step: int) -> str:
    """The id of ``module`` logged as a model of ``run_id``, with its metrics at ``step``."""
    import mlflow
    import mlflow.pytorch
    import torch

    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, output)
    run = client.get_run(run_id)
    model = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
        tags={SERVED_TAG: "reconstruction"}, params=dict(run.data.params),
    )
    # the installed versions (torch without its local "+cpu")
    required = [f"{name}=={version(name).split('+')[0]}" for name in REQUIRED]
    # pickling is chosen on purpose (docs/tracking.md): no warning about it per model
    logger = logging.getLogger("mlflow.pytorch")
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with fluent_api_on(uri):
            mlflow.pytorch.log_model(
                module, name=MODEL_NAME, run_id=run_id, model_id=model.model_id, step=step,
                signature=signature, input_example=example, pip_requirements=required,
                code_paths=[str(Path(vaebench.__file__).parent)],
                serialization_format="pickle",  # the module itself, encode and decode with it
            )
    finally:
        logger.setLevel(saved)
    return model.model_id


@contextlib.contextmanager
def fluent_api_on(uri: str) -> Iterator[None]:
    """MLflow's fluent API on ``uri`` for the block, and what that changes put back after: the
    tracking URI, ``$MLFLOW_TRACKING_URI`` (later subprocesses would inherit it) and
    ``sys.path`` (checking a logged model's input example loads it with its code folder)."""
    import mlflow

    saved_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    saved_env = os.environ.get(TRACKING_URI_ENV)
    saved_path = list(sys.path)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        mlflow.set_tracking_uri(saved_uri)
        os.environ.pop(TRACKING_URI_ENV, None)
        if saved_env is not None:
            os.environ[TRACKING_URI_ENV] = saved_env


def register(
    client: Any, uri: str, name: str, model_id: str, run_id: str, tags: dict[str, str],
    description: str,
) -> int:
    """A new version of registered model ``name`` (made if missing) from the logged model
    (its ``models:/`` source is resolved in the store MLflow's fluent API points at)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="vaebench: the best run of a grid or study, a version each time"
            )
        except MlflowException:  # another process registered it meanwhile
            client.get_registered_model(name)
    with fluent_api_on(uri):
        version = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
            description=description, model_id=model_id,
        )
    return int(version.version)
