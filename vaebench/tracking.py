"""Where runs are recorded: the Tracker interface, MLflow's implementation, a null tracker.

Trackers take plain dicts and file paths, so the trainer and the grid code
stay free of mlflow; ``import mlflow`` happens only when an MLflowTracker is
made (the GPU machines and the benchmarks do without it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from vaebench.config import VaebenchError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_TAG_LENGTH = 5000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI
MODEL_TRAINING_KIND = "custom_model_development"


class Tracker(Protocol):
    def start_grid(self, name: str, run_name: str, tags: Mapping[str, str]) -> str: ...
    def start_run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str: ...
    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None: ...
    def log_artifacts(self, run_id: str, folder: Path) -> None: ...
    def end_run(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None: ...


class NullTracker:
    """Records nothing; for benchmarks and machines without mlflow."""

    def __init__(self) -> None:
        self._count = 0

    def _new_id(self) -> str:
        self._count += 1
        return f"null-{self._count}"

    def start_grid(self, name: str, run_name: str, tags: Mapping[str, str]) -> str:
        return self._new_id()

    def start_run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        return self._new_id()

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        pass

    def log_artifacts(self, run_id: str, folder: Path) -> None:
        pass

    def end_run(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        pass


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).expanduser()


class MLflowTracker:
    """One experiment per grid, a parent run per invocation, a nested child run per variant.

    Creating the tracker creates the store (schema included) once, before any
    run is logged; a bad URI is a VaebenchError.
    """

    def __init__(self, uri: str):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._mlflow = mlflow
        db = sqlite_path(uri)
        if db is not None and db.parent and not db.parent.exists():
            raise VaebenchError(f"tracking URI {uri}: folder {db.parent} does not exist")
        if uri.startswith(("http://", "https://")):
            check_server(uri)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.client.search_experiments(max_results=1)  # creates the schema once
        except (MlflowException, OSError, ValueError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise VaebenchError(f"tracking URI {uri}: {message}") from None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None

    def _artifact_location(self, name: str) -> str | None:
        """Beside a local SQLite file, artifacts go to ``mlartifacts/`` next to it."""
        db = sqlite_path(self.uri)
        if db is None:
            return None  # a tracking server chooses
        return (db.resolve().parent / "mlartifacts" / name).as_uri()

    def _experiment(self, name: str) -> str:
        """The experiment, made if missing, with MLflow 3's experiment kind set to model
        training (what the UI's own kind selector would set), so the UI treats it as one."""
        existing = self.client.get_experiment_by_name(name)
        if existing is None:
            return self.client.create_experiment(
                name,
                artifact_location=self._artifact_location(name),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
            )
        if existing.lifecycle_stage == "deleted":
            self.client.restore_experiment(existing.experiment_id)
        if EXPERIMENT_KIND_TAG not in existing.tags:
            self.client.set_experiment_tag(
                existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
            )
        return existing.experiment_id

    def start_grid(self, name: str, run_name: str, tags: Mapping[str, str]) -> str:
        self.experiment_id = self._experiment(name)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.parent_id = run.info.run_id
        return self.parent_id

    def start_run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        assert self.experiment_id is not None, "start_grid first"
        all_tags = {**tags, **({MLFLOW_PARENT_RUN_ID: self.parent_id} if self.parent_id else {})}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, _param_text(v)) for k, v in params.items()])
        return run_id

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None
    ) -> None:
        """All of an epoch's metrics in one call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def log_artifacts(self, run_id: str, folder: Path) -> None:
        self.client.log_artifacts(run_id, str(folder))

    def end_run(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        if error is not None:
            self.client.set_tag(run_id, "vaebench.error", error[:MAX_TAG_LENGTH])
        self.client.set_terminated(run_id, status=status)


SERVER_PROBE_SECONDS = 5.0


def check_server(uri: str, timeout: float = SERVER_PROBE_SECONDS) -> None:
    """A tracking server must answer its ``/health`` within seconds; MLflow's own client
    retries for minutes before it reports one that is not running."""
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            if reply.status == 200:
                return
            reason = f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # refused, unreachable, timed out, malformed
        reason = str(getattr(exc, "reason", None) or exc)
    raise VaebenchError(
        f"tracking URI {uri}: no MLflow server answers at {url} within {timeout:g} s ({reason})"
    )


def _param_text(value: Any) -> str:
    return "null" if value is None else str(value)
