"""A grid's (or study's) runs read back from MLflow into a RunSet (a *variant* is every param
but the seed: its runs are its seeds), and a best run's pictures out of its artifacts."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vaebench.lifecycle.artifacts import LATENT_FILE
from vaebench.lifecycle.run_figures import KL_PICTURE, LATENT_PICTURE
from vaebench.plots import save_latent_scatter
from vaebench.spec.catalogue import CONDITIONAL, REPORTED
from vaebench.spec.catalogue import METRICS as CATALOGUE
from vaebench.spec.config import VaebenchError
from vaebench.tracking import searches
from vaebench.tracking.registry import fluent_api_on
from vaebench.tracking.searches import NEWEST_FIRST, PARENT_TAG
from vaebench.tracking.store import sqlite_path

METRICS = {name: CATALOGUE[name] for name in REPORTED}
BEST_PICTURES = (
    "samples.png", "reconstructions.png", LATENT_PICTURE, "digits.png", KL_PICTURE
)
TSNE_PICTURE = "latent_tsne.png"  # drawn by the report on request (--tsne)
# a cvae's ELBO bounds log p(x|y): the label is given, worth up to ln 10 nats, so it is
# ranked apart from models that bound log p(x)
BOUND_COLUMN = "likelihood_of"
# a run name's seed token, with the "-<key>" a grid adds to names that would repeat
SEED_SUFFIX = re.compile(r"(^|-)s-?\d+(-[0-9a-f]{6})?$")
LATEST_PAGE = 100  # runs read at once, newest first, looking for the latest invocation


@dataclass
class RunSet:
    """The runs a report covers, one row each, with short metric names as columns."""

    experiment: str
    experiment_id: str
    uri: str
    parents: pd.DataFrame  # the invocations covered (parent runs)
    runs: pd.DataFrame  # their child runs, every status
    param_columns: list[str]  # "params.*" columns that define a variant (all but the seed)
    repeats: int = 0  # finished reruns of the same config and seed, left out
    client: Any = None  # the MlflowClient the runs were read with

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "FINISHED"]

    @property
    def report_parent(self) -> str:
        """The invocation the report files are logged to: the latest covered."""
        return str(self.parents.iloc[-1]["run_id"])  # parents are sorted by start time


def open_client(uri: str):
    """An MlflowClient on an existing store; reading never creates an empty SQLite file."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise VaebenchError(f"no MLflow store at {db} (tracking URI {uri})")
    return MlflowClient(tracking_uri=uri)


def select_runs(
    uri: str, name: str, all_invocations: bool = False, parent_id: str | None = None
) -> RunSet:
    """The child runs of one invocation (``parent_id``, else the latest) or of all of them."""
    import mlflow

    client = open_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        known = ", ".join(names) if names else "none"
        raise VaebenchError(f"no experiment named {name!r} in {uri}; experiments: {known}")
    if not all_invocations and parent_id is None:
        parent_id = latest_parent(client, experiment.experiment_id)
    with fluent_api_on(uri):
        frame = stored_frame(mlflow.search_runs, experiment.experiment_id,
                             None if all_invocations else parent_id)
    run_set = run_set_from_frame(
        frame, name, experiment.experiment_id, uri, all_invocations, parent_id
    )
    return replace(run_set, client=client)


def latest_parent(client: Any, experiment_id: str) -> str | None:
    """The id of the experiment's latest invocation, its latest started run without a parent:
    read newest first, so that it takes as many runs as began since (its children). None: no
    such run."""
    for run in searches.runs_found(client, experiment_id, "", NEWEST_FIRST, LATEST_PAGE):
        if PARENT_TAG not in run.data.tags:
            return run.info.run_id
    return None


def stored_frame(search: Any, experiment_id: str, parent_id: str | None) -> pd.DataFrame:
    """``mlflow.search_runs``' table of the experiment, or of the invocation ``parent_id``
    alone (its parent run and its children): read by those two filters, so that one
    invocation's report takes as long however many invocations the experiment holds. Rows
    in MLflow's own order (the latest started first)."""
    if parent_id is None:
        return search(experiment_ids=[experiment_id])
    frames = [
        search(experiment_ids=[experiment_id], filter_string=text) for text in (
            f"attributes.run_id IN ('{parent_id}')", f"tags.{PARENT_TAG} = '{parent_id}'"
        )
    ]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True)
    if f"tags.{PARENT_TAG}" not in frame:  # the parent alone: an invocation without runs
        frame[f"tags.{PARENT_TAG}"] = None
    return frame.sort_values(["start_time", "run_id"], ascending=[False, True],
                             ignore_index=True)


def run_set_from_frame(
    frame: pd.DataFrame, name: str, experiment_id: str, uri: str,
    all_invocations: bool = False, parent_id: str | None = None,
) -> RunSet:
    """``mlflow.search_runs``' table -> the covered parents and their children, each child with
    its short metric columns and its variant label."""
    parent_column = f"tags.{PARENT_TAG}"
    if frame.empty or parent_column not in frame:
        raise VaebenchError(f"experiment {name!r} has no runs of a vaebench invocation")
    parents = frame[frame[parent_column].isna()].sort_values("start_time")
    if parent_id is not None:
        parents = parents[parents["run_id"] == parent_id]
    elif not all_invocations:
        parents = parents.tail(1)
    runs = frame[frame[parent_column].isin(parents["run_id"])].copy()
    if CLAIM_COLUMN in runs:  # a claim left by a stopped process is no run of a variant
        runs = runs[runs[CLAIM_COLUMN].isna()]
    if runs.empty:
        raise VaebenchError(f"experiment {name!r}: the invocation has no runs")
    runs["name"] = runs["tags.mlflow.runName"]
    for metric in METRICS:
        runs[metric] = runs.get(f"metrics.{metric}", np.nan)
    arch = runs.get("params.model.arch", pd.Series("", index=runs.index))
    runs[BOUND_COLUMN] = np.where(arch.isin(CONDITIONAL), "p(x|y)", "p(x)")
    params = sorted(c for c in runs if c.startswith("params.") and c != "params.seed")
    runs[params] = runs[params].astype(object).fillna("")
    runs = runs.sort_values("start_time").reset_index(drop=True)
    runs, repeats = drop_repeats(runs)
    runs["variant"] = variant_labels(runs, params)
    return RunSet(name, experiment_id, uri, parents, runs, params, repeats)


CLAIM_COLUMN = "tags.vaebench.claim_for"  # vaebench.lifecycle.claims.CLAIM_TAG

RERUN_TAGS = [
    f"tags.vaebench.{tag}" for tag in ("run_key", "device", "device_name", "code", "subnormals")
]


def drop_repeats(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the latest finished run of each config, seed, device, processor, code version and
    handling of subnormal floats: a deterministic rerun there is not a new sample, and counted
    twice would shrink the spread (``--all`` over a grid run twice); on another device or code
    floating-point paths differ."""
    if RERUN_TAGS[0] not in runs:
        return runs, 0
    keys = runs.reindex(columns=RERUN_TAGS).astype(object).fillna("").agg("|".join, axis=1)
    finished = runs["status"] == "FINISHED"
    earlier = keys[finished].duplicated(keep="last")
    repeated = earlier.reindex(runs.index, fill_value=False) & runs[RERUN_TAGS[0]].notna()
    return runs[~repeated].reset_index(drop=True), int(repeated.sum())


def variant_labels(runs: pd.DataFrame, params: list[str]) -> pd.Series:
    """A readable label per run, equal for runs that differ only in their seed: the run name
    without its ``-s<seed>`` ending; variants that would share a label (runs of different grid
    versions under ``--all``) get ``#2``, ``#3``."""
    keys = pd.Series("", index=runs.index)
    if params:
        keys = runs[params].astype(str).agg("\x1f".join, axis=1)
    labels: dict[str, str] = {}
    for key, name in zip(keys, runs["name"], strict=True):
        if key in labels:
            continue
        label = SEED_SUFFIX.sub("", str(name)) or "all seeds"
        candidate, count = label, 1
        while candidate in labels.values():
            count += 1
            candidate = f"{label} #{count}"
        labels[key] = candidate
    return keys.map(labels)


def fetch_best_pictures(
    run_set: RunSet, run: pd.Series, folder: Path, groups: int, tsne: bool = False
) -> list[Path]:
    """Copy a best run's (of ``groups`` comparison groups) pictures from its MLflow artifacts as
    ``<prefix><name>.png`` (:func:`picture_prefix`); with ``tsne``, draw
    ``<prefix>latent_tsne.png`` from the run's latent means (``latent.npz``)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, run_id = run_set.client, str(run["run_id"])
    prefix = picture_prefix(run["compared_within"], groups)
    available = {a.path for a in client.list_artifacts(run_id)}
    copied = []
    with tempfile.TemporaryDirectory(prefix="vaebench-report-") as scratch:
        for name in BEST_PICTURES:
            if name in available:
                local = client.download_artifacts(run_id, name, scratch)
                copied.append(Path(shutil.copyfile(local, folder / f"{prefix}{name}")))
        if tsne and LATENT_FILE in available:
            with np.load(client.download_artifacts(run_id, LATENT_FILE, scratch)) as latent:
                means, labels = latent["means"], latent["labels"]
            path = folder / f"{prefix}{TSNE_PICTURE}"
            copied.append(save_latent_scatter(path, means, labels, str(run["name"]), method="tsne"))
    return copied


def picture_prefix(group: str, groups: int) -> str:
    """``best_`` for a single comparison group, else ``best_<values>_`` (``best_bce_``)."""
    if groups == 1:
        return "best_"
    values = [part.split("=", 1)[-1] for part in group.split(", ")]
    return "best_" + re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(values)) + "_"
