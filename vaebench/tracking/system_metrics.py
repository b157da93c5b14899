"""MLflow's system metrics monitor around a run: ``system/cpu_utilization_percentage``,
memory, disk, network and, with ``nvidia-ml-py``, GPU use, sampled in a thread.

MLflow's monitor publishes a sample only once its interval has passed and the run is still
RUNNING: a run shorter than the interval (10 s here, MLflow's default) would have no system
metrics at all. What the monitor sampled is therefore published when the run's block ends if
it published nothing, so that every run has its machine's figures. This module is the
Tracker's (:mod:`vaebench.tracking.tracker`): nothing else reaches MLflow's monitor.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

SYSTEM_METRICS_ENV = "VAEBENCH_SYSTEM_METRICS"  # "0": no system metrics
SYSTEM_METRICS_SECONDS_ENV = "VAEBENCH_SYSTEM_METRICS_SECONDS"
SYSTEM_METRICS_SECONDS = 10.0  # MLflow's default interval: a sample costs milliseconds


@contextlib.contextmanager
def monitored(run_id: str, tracking_uri: str) -> Iterator[None]:
    """The monitor on ``run_id`` while the block runs, sampling every
    :data:`SYSTEM_METRICS_SECONDS` (``$VAEBENCH_SYSTEM_METRICS_SECONDS``); off with
    ``$VAEBENCH_SYSTEM_METRICS=0`` (``--no-system-metrics``)."""
    if os.environ.get(SYSTEM_METRICS_ENV, "1") == "0":
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start lines
    seconds = float(os.environ.get(SYSTEM_METRICS_SECONDS_ENV, SYSTEM_METRICS_SECONDS))
    monitor = SystemMetricsMonitor(run_id, sampling_interval=seconds, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
    # the block ended well (a run whose store failed is left as it is). If the stopped monitor
    # published no sample, what it sampled (or a sample taken now) is published at step 0:
    # best effort, as MLflow's own samples are, never the run's error. Where a version of
    # MLflow's monitor lacks these attributes, nothing is done.
    if getattr(monitor, "_logging_step", None) != 0 or not hasattr(monitor, "monitors"):
        return
    with contextlib.suppress(Exception):
        if not any(getattr(part, "_metrics", None) for part in monitor.monitors):
            monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
