"""Grows a grid's history in an MLflow store, to time an invocation against a long one
(docs/performance.md, "Reads that do not grow with the store"): copies of the grid's child
runs (their tags but MLflow's own, params and latest metrics), FINISHED, begun a day ago
(a millisecond apart), with no parent run. Usage, in the folder of the store
(sqlite:///mlflow.db), with vaebench importable:
    python tools/grow_history.py GRID_NAME COPIES
"""

import sys
import time

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from vaebench.execution.grid_work import GRID_TAG
from vaebench.tracking.searches import RUN_KEY_TAG

DAY_MS = 86_400_000


def main(name: str, copies: int) -> None:
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name(name).experiment_id
    children = [
        run for run in client.search_runs(
            [experiment], filter_string=f"tags.`{GRID_TAG}` = '{name}'", max_results=1000
        ) if RUN_KEY_TAG in run.data.tags and run.info.status == "FINISHED"
    ]
    keys = {run.data.tags[RUN_KEY_TAG]: run for run in children}  # one run per key
    sources = list(keys.values())
    started = time.perf_counter()
    day_ago = int(time.time() * 1000) - DAY_MS
    for number in range(copies):
        source = sources[number % len(sources)]
        tags = {k: v for k, v in source.data.tags.items() if not k.startswith("mlflow.")}
        begun = day_ago + number
        run = client.create_run(experiment, run_name=source.info.run_name, tags=tags,
                                start_time=begun)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, begun, 1) for k, v in source.data.metrics.items()],
            params=[Param(k, v) for k, v in source.data.params.items()],
        )
        client.set_terminated(run.info.run_id, "FINISHED", end_time=begun + 1)
    print(f"{copies} runs of {len(sources)} keys added to {name} "
          f"in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
