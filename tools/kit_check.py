"""Checks the GPU kit (tools/gpu-kit.sh) in a Python that has the device image's packages:
MLflow's SQLite store, a metric search, a registered model, pydantic and Optuna, and vaebench's
grid files; all but torch, which the device has. Usage, from the repository root, with the kit
installed as tools/gpu-check.sh installs it:
    PYTHONPATH=<the kit's target folder>:. python3.12 tools/kit_check.py
"""

import sys
import tempfile
import time

import mlflow
import optuna
import pydantic
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from vaebench.spec.grid import expand, load_grid

uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
client = MlflowClient(uri)
run = client.create_run(client.create_experiment("kit"))
client.log_batch(run.info.run_id, metrics=[Metric("val_elbo", -100.0, int(time.time() * 1000), 1)])
client.set_terminated(run.info.run_id)
client.create_registered_model("kit")
mlflow.set_tracking_uri(uri)
found = mlflow.search_runs(experiment_names=["kit"])["metrics.val_elbo"].tolist()
assert found == [-100.0], found
runs = expand(load_grid("experiments/mlp16.yaml"))
print(f"kit works: {len(runs)} runs of mlp16; python {sys.version.split()[0]}, mlflow "
      f"{mlflow.__version__}, pydantic {pydantic.__version__}, optuna {optuna.__version__}")
