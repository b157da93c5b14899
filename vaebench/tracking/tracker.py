"""Where runs are recorded: the Tracker interface and MLflow's implementation; ``import mlflow``
happens only when an MLflowTracker is made (the GPU machines and benchmarks do without)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from vaebench.signals import deferred_signals
from vaebench.spec.config import DiskFull, VaebenchError, first_line
from vaebench.tracking import registry, searches
from vaebench.tracking.schema import open_store, template
from vaebench.tracking.searches import (  # noqa: F401 - RunRecord, RUN_KEY_TAG: the Tracker's
    OLDEST_FIRST,
    RUN_KEY_TAG,
    RunRecord,
    record_of,
    tagged,
)
from vaebench.tracking.store import HTTP_LIMITS, check_server, sqlite_path, while_locked

if TYPE_CHECKING:  # the record's type only: tracking imports no torch
    from vaebench.data import SplitRecord

T = TypeVar("T")

MAX_TAG_LENGTH = 5000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI
MODEL_TRAINING_KIND = "custom_model_development"
ERROR_TAG = "vaebench.error"
SYSTEM_METRICS_ENV = "VAEBENCH_SYSTEM_METRICS"  # "0": no system metrics
SYSTEM_METRICS_SECONDS_ENV = "VAEBENCH_SYSTEM_METRICS_SECONDS"
SYSTEM_METRICS_SECONDS = 10.0  # MLflow's default interval: a sample costs milliseconds


class TrackingError(VaebenchError):
    """The tracking store failed in the middle of the work (a server gone, a disk full)."""

    # the grid stops, and its rerun continues it (sysexits' EX_TEMPFAIL: retry later)
    exit_status = 75


class Tracker(Protocol):
    """How runs are recorded; the execution layer and the invocations use nothing else. Any call
    may raise :class:`TrackingError`."""

    uri: str  # the store's, for another process (a background finisher) or a report to open
    experiment_id: str | None  # set by start_grid or join_grid
    parent_id: str | None  # the invocation's parent run

    def start_grid(self, name: str, run_name: str, tags: Mapping[str, str]) -> str: ...
    def join_grid(self, experiment_id: str, parent_id: str) -> None: ...
    def start_run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str: ...
    def reopen_run(self, run_id: str, tags: Mapping[str, str]) -> None: ...
    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None: ...
    def logged_steps(self, run_id: str, metric: str) -> set[int]: ...
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None: ...
    def log_artifacts(self, run_id: str, folder: Path) -> None: ...
    def end_run(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None: ...
    def delete_run(self, run_id: str) -> None: ...
    def log_inputs(self, run_id: str, splits: Sequence[SplitRecord]) -> None: ...
    def system_metrics(self, run_id: str) -> contextlib.AbstractContextManager[None]: ...
    def previous_runs(
        self, name: str, tag: str, value: str, *, begun_since_ms: int = 0,
        unfinished_only: bool = False,
    ) -> list[RunRecord]: ...
    def latest_finished(
        self, name: str, tag: str, value: str, keys: Collection[str]
    ) -> list[RunRecord]: ...
    def run_record(self, run_id: str) -> RunRecord | None: ...
    def artifact_bytes(self, run_id: str, path: str) -> bytes: ...
    def register_model(
        self, run_id: str, module: Any, example: Any, step: int, name: str,
        tags: Mapping[str, str], description: str,
    ) -> tuple[int, bool]: ...


class StoreDiskFull(TrackingError, DiskFull):
    """The store's disk is full: a failing store (nothing more is written to it) whose runs
    stop as on any full disk (KILLED once space is freed and the rerun recovers them)."""


def _store_error(uri: str, exc: BaseException) -> TrackingError:
    """One error for a failing store: a full disk names the file it could not write."""
    full = DiskFull.behind(exc)
    if full is not None:
        return StoreDiskFull(getattr(full, "filename", None) or sqlite_path(uri) or uri)
    return TrackingError(f"tracking store {uri} failed ({first_line(exc)})")


def _store_call(method: Callable[..., T]) -> Callable[..., T]:
    """Turn a failing store (MLflow's errors, a refused connection, a full disk) into one
    TrackingError naming the store; a signal that arrives during the call waits for its end,
    so an interruption never cuts a store write in half."""

    @functools.wraps(method)
    def call(self: MLflowTracker, *args: Any, **kwargs: Any) -> T:
        with deferred_signals():
            try:
                return while_locked(self.uri, lambda: method(self, *args, **kwargs))
            except (TrackingError, DiskFull):  # DiskFull: a checkpoint or a file written here
                raise
            except Exception as exc:  # noqa: BLE001 - MlflowException, requests, OSError, ...
                raise _store_error(self.uri, exc) from exc

    return call


class MLflowTracker:
    """One experiment per grid, a parent run per invocation, a nested child run per variant.
    Creating it creates the store (schema included); a bad URI is a VaebenchError."""

    def __init__(self, uri: str):
        from mlflow.exceptions import MlflowException

        self.uri = uri
        # MLflow's download bars would interleave with vaebench's own lines, and a failing
        # SQLite store is one line of vaebench's, not MLflow's logged traceback as well
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        db = sqlite_path(uri)
        if db is not None and db.parent and not db.parent.exists():
            raise VaebenchError(f"tracking URI {uri}: folder {db.parent} does not exist")
        if uri.startswith(("http://", "https://")):
            for name, value in HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
            check_server(uri)
        try:
            self.client = while_locked(uri, lambda: open_store(uri, db))
        except Exception as exc:
            if "database is locked" in str(exc) or DiskFull.behind(exc):  # may pass: exit 75
                raise _store_error(uri, exc) from None
            if not isinstance(exc, MlflowException | OSError | ValueError):
                raise
            raise VaebenchError(f"tracking URI {uri}: {first_line(exc)}") from None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None

    def _ensure_experiment(self, name: str) -> str:
        """The experiment, made if missing, with MLflow 3's experiment kind set to model
        training (what the UI's own kind selector would set), so the UI treats it as one."""
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        db = sqlite_path(self.uri)  # beside a local SQLite file, artifacts go to mlartifacts/
        folder = None if db is None else (db.resolve().parent / "mlartifacts" / name).as_uri()
        if existing is None:
            try:
                return self.client.create_experiment(  # folder None: a tracking server chooses
                    name, artifact_location=folder, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
                )
            except MlflowException:  # another process created it meanwhile
                existing = self.client.get_experiment_by_name(name)
                if existing is None:
                    raise
        if existing.lifecycle_stage == "deleted":
            self.client.restore_experiment(existing.experiment_id)
        if EXPERIMENT_KIND_TAG not in existing.tags:
            self.client.set_experiment_tag(
                existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
            )
        return existing.experiment_id

    @_store_call
    def start_grid(self, name: str, run_name: str, tags: Mapping[str, str]) -> str:
        self.experiment_id = self._ensure_experiment(name)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.parent_id = run.info.run_id
        return self.parent_id

    def join_grid(self, experiment_id: str, parent_id: str) -> None:
        """Log under a parent run another process started (a ``--workers`` process)."""
        self.experiment_id, self.parent_id = experiment_id, parent_id

    @_store_call
    def start_run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        assert self.experiment_id is not None, "start_grid first"
        all_tags = {**tags, **({MLFLOW_PARENT_RUN_ID: self.parent_id} if self.parent_id else {})}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        texts = [Param(k, "null" if v is None else str(v)) for k, v in params.items()]
        self.client.log_batch(run.info.run_id, params=texts)
        return run.info.run_id

    @_store_call
    def reopen_run(self, run_id: str, tags: Mapping[str, str]) -> None:
        """A KILLED run continues: its ``tags`` (this process's lease) first, then RUNNING
        again, under this invocation's parent run."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        parent = {MLFLOW_PARENT_RUN_ID: self.parent_id} if self.parent_id else {}
        self.set_tags(run_id, {**tags, **parent})
        self.client.update_run(run_id, status="RUNNING")
        if ERROR_TAG in self.client.get_run(run_id).data.tags:  # the reason it was stopped
            self.client.delete_tag(run_id, ERROR_TAG)

    @_store_call
    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """All of an epoch's metrics (and tags, such as the lease) in one call."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        texts = [RunTag(k, v) for k, v in (tags or {}).items()]
        self.client.log_batch(run_id, metrics=batch, tags=texts)

    @_store_call
    def logged_steps(self, run_id: str, metric: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, metric)}

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.log_metrics(run_id, {}, tags=tags)  # one batch of tags alone

    @_store_call
    def log_artifacts(self, run_id: str, folder: Path) -> None:
        self.client.log_artifacts(run_id, str(folder))

    @_store_call
    def end_run(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        if error is not None:
            self.client.set_tag(run_id, ERROR_TAG, error[:MAX_TAG_LENGTH])
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def system_metrics(self, run_id: str) -> Iterator[None]:
        """MLflow's system metrics monitor on ``run_id`` while the block runs. It publishes a
        sample only once its interval has passed and the run is still RUNNING: a run shorter
        than the interval would have none, so what it sampled is published last."""
        if os.environ.get(SYSTEM_METRICS_ENV, "1") == "0":
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start lines
        seconds = float(os.environ.get(SYSTEM_METRICS_SECONDS_ENV, SYSTEM_METRICS_SECONDS))
        monitor = SystemMetricsMonitor(run_id, sampling_interval=seconds, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
        # the block ended well (a run whose store failed is left as it is): if the monitor
        # published nothing, what it sampled (or a sample taken now) is, at step 0; best effort,
        # never the run's error (nothing where a version of MLflow's monitor lacks these)
        if getattr(monitor, "_logging_step", None) != 0 or not hasattr(monitor, "monitors"):
            return
        with contextlib.suppress(Exception):
            if not any(getattr(part, "_metrics", None) for part in monitor.monitors):
                monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()

    @_store_call
    def log_inputs(self, run_id: str, splits: Sequence[SplitRecord]) -> None:
        """The splits as MLflow dataset inputs (the runs table's Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [
            DatasetInput(
                Dataset(
                    name=split.name, digest=split.digest, source_type="local",
                    source=json.dumps({"uri": split.source}),
                    profile=json.dumps({"num_rows": split.rows}),
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, split.context)],
            )
            for split in splits
        ]
        for attempt in range(DATASET_ATTEMPTS):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except Exception as exc:
                text = str(exc).lower()
                if attempt == DATASET_ATTEMPTS - 1 or "unique" not in text or "dataset" not in text:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @_store_call
    def delete_run(self, run_id: str) -> None:
        """Soft-delete the run (a claim that lost): searches no longer return it."""
        self.client.delete_run(run_id)

    @_store_call
    def run_record(self, run_id: str) -> RunRecord | None:
        """The run as the store holds it now (None if deleted)."""
        run = self.client.get_run(run_id)
        return None if run.info.lifecycle_stage == "deleted" else record_of(run)

    # artifact_bytes and register_model run after the runs are tracked, and their callers
    # report what fails in one line (a missing artifact, an invalid name): not TrackingErrors
    def artifact_bytes(self, run_id: str, path: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="vaebench-artifact-") as scratch:
            return Path(self.client.download_artifacts(run_id, path, scratch)).read_bytes()

    def register_model(
        self, run_id: str, module: Any, example: Any, step: int, name: str,
        tags: Mapping[str, str], description: str,
    ) -> tuple[int, bool]:
        """A new version of registered model ``name``, logging ``module`` first (with the run's
        metrics at ``step``) unless an earlier invocation did; (the version, whether reused)."""
        model_id = registry.logged_model_of(self.client, run_id)
        reused = model_id is not None
        if not reused:
            model_id = registry.log_model(self.client, self.uri, run_id, module, example, step)
        version = registry.register(
            self.client, self.uri, name, model_id, run_id, dict(tags), description
        )
        return version, reused

    @_store_call
    def previous_runs(
        self, name: str, tag: str, value: str, *, begun_since_ms: int = 0,
        unfinished_only: bool = False,
    ) -> list[RunRecord]:
        """Every run of experiment ``name`` whose tag ``tag`` is ``value``, oldest first;
        only those begun at ``begun_since_ms`` or later (0: all), only those not FINISHED
        (``unfinished_only``), as the store filters them."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return []
        condition = tagged(tag, value, begun_since_ms=begun_since_ms,
                           unfinished_only=unfinished_only)
        found = searches.runs_found(self.client, experiment.experiment_id, condition,
                                    OLDEST_FIRST)
        return [record_of(run) for run in found]

    @_store_call
    def latest_finished(
        self, name: str, tag: str, value: str, keys: Collection[str]
    ) -> list[RunRecord]:
        """Each of ``keys``' latest FINISHED run among the runs of experiment ``name`` whose
        tag ``tag`` is ``value``; none for a key never finished. Not the whole history of a
        grid rerun many times (:func:`~vaebench.tracking.searches.latest_finished`)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return []
        return searches.latest_finished(self.client, experiment.experiment_id, tag, value, keys)


# MLflow's SQL store looks a dataset up, then inserts it: two processes logging the same
# split into one experiment at once (workers of a grid) can both miss it, and the second
# insert breaks the table's key (seen on PostgreSQL). Its next try finds the dataset.
DATASET_ATTEMPTS = 3


def tracker_opened_during(uri: str, work: Callable[[], None]) -> MLflowTracker:
    """``MLflowTracker(uri)``, opened in a thread while ``work`` (loading the data) runs:
    importing MLflow takes seconds, as long as the data. A new SQLite store is made only once
    ``work`` succeeded (its error leaves no empty store behind); meanwhile the thread imports
    MLflow and makes the template the store is copied from."""
    db = sqlite_path(uri)
    fresh = db is not None and not db.exists()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaebench-store") as pool:
        pending = pool.submit(template) if fresh else pool.submit(MLflowTracker, uri)
        work()
        if not fresh:
            return pending.result()
    return MLflowTracker(uri)  # a template that failed: MLflow makes the store itself
