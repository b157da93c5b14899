"""Reports: a grid's (or study's) runs in MLflow -> leaderboard over seeds, figures, report.md/html.

Runs are read back with ``mlflow.search_runs``; a *variant* is every param but
the seed, so a variant's runs are its seeds. Only FINISHED runs are
aggregated. Statistics stay honest: the spread of one run is unknown, not
zero, and a variant within one standard deviation of the best is marked as a tie.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vaebench.catalogue import (
    CONDITIONAL,
    DEFAULT_RANKING,
    RANKABLE,
    REPORTED,
    MetricInfo,
    selection_problem,
)
from vaebench.catalogue import METRICS as CATALOGUE
from vaebench.config import VaebenchError
from vaebench.plots import Bars, Curve, save_bars, save_curves
from vaebench.tracking import resolve_tracking_uri, sqlite_path

METRICS = {name: CATALOGUE[name] for name in REPORTED}
DEFAULT_METRIC = DEFAULT_RANKING
BEST_PICTURES = ("samples.png", "reconstructions.png", "latent.png", "digits.png")
DOCUMENTS = ("leaderboard.csv", "report.md", "report.html")
FIGURES = ("rate_distortion.png", "elbo_by_epoch.png", "clustering.png", "epoch_seconds.png")
REPORT_ARTIFACT_PATH = "report"
# Settings across which numbers mean different things, so runs differing in them are ranked
# apart: the data (another test set), and for loss_units metrics the reconstruction loss
# (a BCE ELBO and an MSE one, SSE + KL, are on different scales).
DATA_PARAMS = ("params.data.dataset", "params.data.binarize", "params.data.validation")
LOSS_UNIT_PARAM = "params.loss.recon"
# a cvae's ELBO bounds log p(x|y): the label is given, worth up to ln 10 nats, so it is
# ranked apart from models that bound log p(x)
BOUND_COLUMN = "likelihood_of"
ALL_RUNS = "all runs"
# a run name's seed token, with the "-<key>" a grid adds to names that would repeat
SEED_SUFFIX = re.compile(r"(^|-)s-?\d+(-[0-9a-f]{6})?$")


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


@dataclass
class Report:
    folder: Path
    leaderboard: pd.DataFrame
    metric: MetricInfo
    files: list[Path] = field(default_factory=list)
    best_runs: list[str] = field(default_factory=list)  # one per comparison group


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
    mlflow.set_tracking_uri(uri)
    frame = mlflow.search_runs(experiment_ids=[experiment.experiment_id])
    run_set = run_set_from_frame(
        frame, name, experiment.experiment_id, uri, all_invocations, parent_id
    )
    run_set.client = client
    return run_set


def run_set_from_frame(
    frame: pd.DataFrame,
    name: str,
    experiment_id: str,
    uri: str,
    all_invocations: bool = False,
    parent_id: str | None = None,
) -> RunSet:
    """``mlflow.search_runs``' table -> the covered parents and their children, each child with
    its short metric columns and its variant label."""
    parent_column = "tags.mlflow.parentRunId"
    if frame.empty or parent_column not in frame:
        raise VaebenchError(f"experiment {name!r} has no runs of a vaebench invocation")
    parents = frame[frame[parent_column].isna()].sort_values("start_time")
    if parent_id is not None:
        parents = parents[parents["run_id"] == parent_id]
    elif not all_invocations:
        parents = parents.tail(1)
    runs = frame[frame[parent_column].isin(parents["run_id"])].copy()
    if runs.empty:
        raise VaebenchError(f"experiment {name!r}: the invocation has no runs")
    runs["name"] = runs["tags.mlflow.runName"]
    for metric in METRICS.values():
        column = f"metrics.{metric.name}"
        runs[metric.name] = runs[column] if column in runs else np.nan
    arch = runs.get("params.model.arch", pd.Series("", index=runs.index))
    runs[BOUND_COLUMN] = np.where(arch.isin(CONDITIONAL), "p(x|y)", "p(x)")
    params = sorted(c for c in runs if c.startswith("params.") and c != "params.seed")
    runs[params] = runs[params].astype(object).fillna("")
    runs = runs.sort_values("start_time").reset_index(drop=True)
    runs, repeats = drop_repeats(runs)
    runs["variant"] = variant_labels(runs, params)
    return RunSet(name, experiment_id, uri, parents, runs, params, repeats)


RERUN_TAGS = (
    "tags.vaebench.run_key",
    "tags.vaebench.device",
    "tags.vaebench.device_name",
    "tags.vaebench.code",
)


def drop_repeats(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the latest finished run of each config, seed, device, processor and code version.

    A deterministic rerun of the same seed on the same device and code is not a
    new sample: counted twice it would shrink the spread (``--all`` over a grid
    run twice). On another device or code version it is one: floating-point
    paths differ.
    """
    if RERUN_TAGS[0] not in runs:
        return runs, 0
    keys = runs.reindex(columns=list(RERUN_TAGS)).astype(object).fillna("").agg("|".join, axis=1)
    finished = runs["status"] == "FINISHED"
    earlier = keys[finished].duplicated(keep="last")
    repeated = earlier.reindex(runs.index, fill_value=False) & runs[RERUN_TAGS[0]].notna()
    return runs[~repeated].reset_index(drop=True), int(repeated.sum())


def variant_labels(runs: pd.DataFrame, params: list[str]) -> pd.Series:
    """A readable label per run, equal for runs that differ only in their seed.

    It is the run name without its ``-s<seed>`` ending; variants that would
    share a label (runs of different grid versions under ``--all``) get ``#2``, ``#3``.
    """
    if params:
        keys = runs[params].astype(str).agg("\x1f".join, axis=1)
    else:
        keys = pd.Series("", index=runs.index)
    labels: dict[str, str] = {}
    taken: set[str] = set()
    for key, name in zip(keys, runs["name"], strict=True):
        if key in labels:
            continue
        label = SEED_SUFFIX.sub("", str(name)) or "all seeds"
        candidate, count = label, 1
        while candidate in taken:
            count += 1
            candidate = f"{label} #{count}"
        labels[key] = candidate
        taken.add(candidate)
    return keys.map(labels)


def varied_params(runs: pd.DataFrame, params: list[str]) -> list[str]:
    return [p for p in params if runs[p].nunique() > 1]


def comparison_params(run_set: RunSet, metric: MetricInfo) -> list[str]:
    """The varied settings across which the metric's values are not comparable."""
    varied = varied_params(run_set.finished, [*run_set.param_columns, BOUND_COLUMN])
    keys = list(DATA_PARAMS)
    if metric.loss_units:
        keys += [LOSS_UNIT_PARAM, BOUND_COLUMN]
    return [k for k in keys if k in varied]


def groups_for(run_set: RunSet, runs: pd.DataFrame, metric: MetricInfo) -> pd.Series:
    """Each of ``runs``' comparison group for ``metric``."""
    return comparison_groups(runs, comparison_params(run_set, metric))


def comparison_groups(runs: pd.DataFrame, params: list[str]) -> pd.Series:
    """Each run's comparison group as text ("loss.recon=bce"), or "all runs"."""
    if not params:
        return pd.Series(ALL_RUNS, index=runs.index)
    return runs[params].astype(str).apply(
        lambda row: ", ".join(f"{k.removeprefix('params.')}={v}" for k, v in row.items()),
        axis=1,
    )


def present_metrics(runs: pd.DataFrame) -> list[MetricInfo]:
    return [m for m in METRICS.values() if runs[m.name].notna().any()]


def leaderboard(run_set: RunSet, metric: MetricInfo) -> pd.DataFrame:
    """One row per variant, best first: mean, standard deviation (NaN for one value) and
    count of every metric over the variant's finished runs, and whether the variant ties
    with the best within one std.

    Variants are ranked within their comparison group (``compared_within``): a BCE
    ELBO is not ranked against an MSE one, nor MNIST against Fashion-MNIST. A
    variant without a value of the metric (every run failed, say) is listed unranked.
    """
    finished = run_set.finished
    if finished.empty:
        raise VaebenchError(f"experiment {run_set.experiment!r}: no FINISHED runs to report on")
    if finished[metric.name].isna().all():
        known = [m.name for m in present_metrics(finished) if m.name in RANKABLE]
        why = " (absent with data.validation: 0)" if metric.needs_validation else ""
        others = f"rank on one of these: {', '.join(known)}" if known else "nothing to rank on"
        raise VaebenchError(f"no run has the metric {metric.name!r}{why}; {others}")
    varied = varied_params(finished, run_set.param_columns)
    metrics = [m.name for m in present_metrics(finished)]
    runs = run_set.runs.assign(
        compared_within=groups_for(run_set, run_set.runs, metric),
        finished=run_set.runs["status"] == "FINISHED",
    )
    stats = runs[runs["finished"]].groupby("variant")[metrics].agg(["mean", "std", "count"])
    stats.columns = [f"{name}_{stat}" for name, stat in stats.columns]
    every = runs.groupby("variant", sort=False)
    table = pd.concat(
        [
            every[[*varied, "compared_within"]]
            .first()
            .rename(columns=lambda c: c.removeprefix("params.")),
            every["finished"].sum().rename("runs"),
            (~runs["finished"]).groupby(runs["variant"]).sum().rename("not_finished"),
            stats,
        ],
        axis=1,
    )
    counts = [f"{name}_count" for name in metrics]
    table[counts] = table[counts].fillna(0).astype(int)
    table = table.sort_values(
        ["compared_within", f"{metric.name}_mean"],
        ascending=[True, not metric.higher_is_better],
        na_position="last",
    )
    table = table.rename_axis("variant").reset_index()
    ranked = table[f"{metric.name}_mean"].notna()
    table.insert(0, "rank", pd.Series(pd.NA, index=table.index, dtype="Int64"))
    table.loc[ranked, "rank"] = table[ranked].groupby("compared_within").cumcount() + 1
    table["ties_best"] = ""
    for _, rows in table[ranked].groupby("compared_within", sort=False):
        table.loc[rows.index, "ties_best"] = ties_with_best(rows, metric)
    return table


def ties_with_best(table: pd.DataFrame, metric: MetricInfo) -> list[str]:
    """"best" for the first row; "yes"/"no" for whether a variant's mean lies within one
    standard deviation (the larger of the two) of the best's; "" when either has a
    single value, whose spread is unknown."""
    mean, std = table[f"{metric.name}_mean"], table[f"{metric.name}_std"]
    best_mean, best_std = mean.iloc[0], std.iloc[0]
    marks = ["best"]
    for value, spread in zip(mean.iloc[1:], std.iloc[1:], strict=True):
        if np.isnan(spread) or np.isnan(best_std):
            marks.append("")
        else:
            marks.append("yes" if abs(value - best_mean) <= max(spread, best_std) else "no")
    return marks


# --- figures -----------------------------------------------------------------------------


def _line_label(row: pd.Series, columns: list[str]) -> str:
    return "-".join(str(row[c]) for c in columns) or "runs"


def rate_distortion_figure(run_set: RunSet, path: Path) -> Path | None:
    """KL against reconstruction, a point per run; a line joins the per-beta means of one
    architecture/loss/optimizer (every varied param but beta). A panel per reconstruction
    loss when the grid varies it, as BCE and MSE are in different units."""
    runs = run_set.finished.dropna(subset=["test_kl", "test_recon"])
    if runs.empty:
        return None
    varied = varied_params(run_set.finished, run_set.param_columns)
    panel_keys = comparison_params(run_set, METRICS["test_recon"])
    line_keys = [p for p in varied if p != "params.loss.beta" and p not in panel_keys]
    beta = "params.loss.beta" if "params.loss.beta" in runs else None
    panels: dict[str, list[Curve]] = {}
    points: dict[str, list[Curve]] = {}
    for title, in_panel in runs.groupby(comparison_groups(runs, panel_keys)):
        lines, dots = [], []
        for _, line in in_panel.groupby(line_keys, sort=False) if line_keys else [("", in_panel)]:
            label = _line_label(line.iloc[0], line_keys)
            by_beta = (
                line.assign(_beta=pd.to_numeric(line[beta], errors="coerce")).groupby("_beta")
                if beta
                else [(None, line)]
            )
            means = [(b, g["test_kl"].mean(), g["test_recon"].mean()) for b, g in by_beta]
            notes = [f"β={b:g}" if b is not None else "" for b, _, _ in means]
            lines.append(
                Curve(label, [m[1] for m in means], [m[2] for m in means], notes=notes)
            )
            dots.append(Curve(label, list(line["test_kl"]), list(line["test_recon"])))
        panels[title], points[title] = lines, dots
    return save_curves(
        path, panels, "KL (rate, nats)", "reconstruction (distortion)", points
    )


def elbo_curve_figure(run_set: RunSet, order: list[str], path: Path) -> Path | None:
    """Validation ELBO against epoch per variant (MLflow metric history): the mean over seeds
    with a band of one standard deviation when there are several."""
    client = run_set.client
    finished = run_set.finished
    group_of = dict(
        zip(
            finished["variant"],
            groups_for(run_set, finished, METRICS["val_elbo"]),
            strict=True,
        )
    )
    panels: dict[str, list[Curve]] = {}
    for variant in order:
        series = {}
        for run_id in finished.loc[finished["variant"] == variant, "run_id"]:
            history = client.get_metric_history(run_id, "val_elbo")
            series[run_id] = pd.Series({m.step: m.value for m in history})
        if not any(len(values) for values in series.values()):
            continue  # no validation split (data.validation: 0): no history to draw
        by_epoch = pd.DataFrame(series).sort_index()
        mean, std = by_epoch.mean(axis=1), by_epoch.std(axis=1)
        several = by_epoch.shape[1] > 1
        panels.setdefault(group_of[variant], []).append(
            Curve(
                variant,
                list(by_epoch.index),
                list(mean),
                list(mean - std) if several else None,
                list(mean + std) if several else None,
            )
        )
    if not panels:
        return None
    return save_curves(path, panels, "epoch", "validation ELBO", integer_x=True)


def bars_figure(table: pd.DataFrame, metrics: list[MetricInfo], path: Path) -> Path:
    labels = list(table["variant"])
    panels = {
        m.label: Bars(labels, list(table[f"{m.name}_mean"]), list(table[f"{m.name}_std"]))
        for m in metrics
    }
    return save_bars(path, panels)


def write_figures(run_set: RunSet, table: pd.DataFrame, folder: Path) -> list[Path]:
    """The figures the runs have data for (see FIGURES)."""
    present = {m.name for m in present_metrics(run_set.finished)}
    shown = table[table["runs"] > 0]
    figures = [
        rate_distortion_figure(run_set, folder / "rate_distortion.png"),
        elbo_curve_figure(run_set, list(shown["variant"]), folder / "elbo_by_epoch.png"),
    ]
    clustering = [METRICS[n] for n in ("test_nmi", "test_accuracy") if n in present]
    if clustering:
        figures.append(bars_figure(shown, clustering, folder / "clustering.png"))
    if "mean_epoch_seconds" in present:
        figures.append(
            bars_figure(shown, [METRICS["mean_epoch_seconds"]], folder / "epoch_seconds.png")
        )
    return [f for f in figures if f is not None]


def best_runs(run_set: RunSet, table: pd.DataFrame, metric: MetricInfo) -> list[pd.Series]:
    """Per comparison group, the best variant's run that scored best on the metric, with
    its group as ``compared_within``."""
    chosen = []
    for variant, group in table.loc[
        table["ties_best"] == "best", ["variant", "compared_within"]
    ].itertuples(index=False):
        runs = run_set.finished[run_set.finished["variant"] == variant]
        runs = runs.sort_values(metric.name, ascending=not metric.higher_is_better)
        chosen.append(pd.concat([runs.iloc[0], pd.Series({"compared_within": group})]))
    return chosen


def fetch_best_pictures(run_set: RunSet, run_id: str, folder: Path, prefix: str) -> list[Path]:
    """Copy a best run's pictures from its MLflow artifacts as ``<prefix><name>.png``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = run_set.client
    available = {a.path for a in client.list_artifacts(run_id)}
    copied = []
    with tempfile.TemporaryDirectory(prefix="vaebench-report-") as scratch:
        for name in BEST_PICTURES:
            if name in available:
                local = client.download_artifacts(run_id, name, scratch)
                copied.append(Path(shutil.copyfile(local, folder / f"{prefix}{name}")))
    return copied


def picture_prefix(group: str, groups: int) -> str:
    """``best_`` for a single comparison group, else ``best_<values>_`` (``best_bce_``)."""
    if groups == 1:
        return "best_"
    values = [part.split("=", 1)[-1] for part in group.split(", ")]
    return "best_" + re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(values)) + "_"


# --- documents ---------------------------------------------------------------------------


def display_table(table: pd.DataFrame, metric: MetricInfo) -> pd.DataFrame:
    """The leaderboard as text: "mean ± std" (just the mean for one run)."""
    rank = table["rank"].map(lambda r: "" if pd.isna(r) else str(r))
    shown = pd.DataFrame({"rank": rank, "variant": table["variant"]})
    if table["compared_within"].nunique() > 1:
        shown["ranked within"] = table["compared_within"]
    shown["runs"] = table["runs"].astype(str)
    for m in METRICS.values():
        if f"{m.name}_mean" not in table:
            continue
        shown[m.label] = [
            _mean_std(mean, std, m.digits) + (f" (n={n})" if 0 < n < runs else "")
            for mean, std, n, runs in zip(
                table[f"{m.name}_mean"], table[f"{m.name}_std"], table[f"{m.name}_count"],
                table["runs"], strict=True,
            )
        ]
    shown[f"ties best ({metric.name})"] = table["ties_best"]
    if table["not_finished"].any():
        shown["not finished"] = table["not_finished"].astype(str)
    return shown


def _mean_std(mean: float, std: float, digits: int) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def verdict(table: pd.DataFrame, metric: MetricInfo) -> str:
    """Who is best (per comparison group), who ties, and what cannot be judged."""
    direction = "higher" if metric.higher_is_better else "lower"
    ranked = table[table["rank"].notna()]
    groups = list(ranked.groupby("compared_within", sort=False))
    several = table["compared_within"].nunique() > 1
    sentences = [f"Ranked on {metric.label}, {direction} is better."]
    if several:
        names = table["compared_within"].unique()
        settings = " and ".join(dict.fromkeys(comparison_name(g) for g in names))
        sentences.append(
            f"Runs with different {settings} are ranked apart: their values are not comparable."
        )
    for group, rows in groups:
        best = rows.iloc[0]
        value = _mean_std(best[f"{metric.name}_mean"], best[f"{metric.name}_std"], metric.digits)
        among = f" among {group}" if several else ""
        text = f"Best{among}: **{best['variant']}**, {value} over {count(best['runs'], 'run')}."
        ties = list(rows.loc[rows["ties_best"] == "yes", "variant"])
        if ties:
            text += f" Within one standard deviation of it (a tie): {', '.join(ties)}."
        elif (rows["ties_best"] == "no").any():
            text += " No other variant lies within one standard deviation of it."
        sentences.append(text)
    if (ranked[f"{metric.name}_count"] == 1).any():
        sentences.append(
            "Variants with a single run show no spread: one run cannot estimate it, so"
            " ties with them cannot be judged."
        )
    if (table["rank"].isna()).any():
        unranked = ", ".join(table.loc[table["rank"].isna(), "variant"])
        sentences.append(f"Unranked, without a value of {metric.name}: {unranked}.")
    return " ".join(sentences)


def measurement_notes(run_set: RunSet, metric: MetricInfo) -> str:
    """What the numbers are: which split selects, which are bounds, and on what."""
    finished = run_set.finished
    notes = [
        f"Variants are ranked on {metric.name} (validation split, held out of the training "
        "images); test columns score the same runs on the test split once, after training, "
        "and are shown beside, never used to rank."
        if metric.split == "validation"
        else f"Variants are ranked on {metric.name}; test columns are shown beside."
    ]
    binarize = finished.get("params.data.binarize", pd.Series(dtype=object))
    recon = finished.get("params.loss.recon", pd.Series(dtype=object))
    if ((binarize == "none") & (recon == "bce")).any():
        notes.append(
            "ELBO and reconstruction of runs with data.binarize none are BCE on grey-level "
            "pixels: not a likelihood bound (grey-level pixels); compare them with each "
            "other, not with published log-likelihoods."
        )
    if (recon == "mse").any():
        notes.append("With loss.recon mse the ELBO is squared error plus KL: not a bound.")
    if (finished[BOUND_COLUMN] == "p(x|y)").any():
        notes.append(
            "cvae runs are given the label: their ELBO bounds log p(x|y), not log p(x), and "
            "their clusters are not scored."
        )
    with_nll = finished[finished["test_nll"].notna()]
    if not with_nll.empty:
        column = with_nll.get("params.eval.iwae_samples", pd.Series(dtype=object))
        samples = sorted({int(k) for k in column if str(k).isdigit()})
        images = with_nll.get("params.eval.iwae_images", pd.Series(dtype=object))
        subsets = sorted({int(n) for n in images if str(n).isdigit()})
        over = (
            f", over the first {' or '.join(map(str, subsets))} test images for runs that set "
            "eval.iwae_images (the others: all)"
            if subsets
            else ", over the whole test split"
        )
        notes.append(
            "test NLL: -log p(x) (-log p(x|y) for cvae runs) in nats per image, estimated by "
            "importance sampling (IWAE) with "
            f"K = {', '.join(map(str, samples))} samples on binary pixels{over}; the estimate "
            "is an upper bound on the NLL in expectation."
        )
    return " ".join(notes)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def comparison_name(group: str) -> str:
    """"loss.recon=bce, data.dataset=mnist" -> "loss.recon/data.dataset"."""
    return "/".join(part.split("=", 1)[0] for part in group.split(", "))


Block = tuple[str, Any]  # ("h1"|"h2"|"p", text) | ("table", DataFrame) | ("img", (path, caption))


def report_blocks(
    run_set: RunSet, table: pd.DataFrame, metric: MetricInfo, figures: list[Path],
    bests: list[tuple[pd.Series, list[Path]]],
) -> list[Block]:
    invocations = (
        f"invocation {run_set.parents.iloc[-1]['tags.mlflow.runName']}"
        if len(run_set.parents) == 1
        else f"all {len(run_set.parents)} invocations"
    )
    not_finished = int((run_set.runs["status"] != "FINISHED").sum())
    source = (
        f"Experiment {run_set.experiment} in {run_set.uri}, {invocations}: "
        f"{count(len(run_set.finished), 'finished run')} in {count(len(table), 'variant')}"
        + (f"; {count(not_finished, 'run')} not finished, left out" if not_finished else "")
        + (
            f"; {count(run_set.repeats, 'earlier rerun')} of the same config, seed, device and "
            "code, left out"
            if run_set.repeats
            else ""
        )
        + f". Made {time.strftime('%Y-%m-%d %H:%M')}."
    )
    captions = {
        "rate_distortion.png": "Rate and distortion: KL against reconstruction, a dot per run; "
        "lines join the per-β means of one setting.",
        "elbo_by_epoch.png": "Validation ELBO by epoch: the mean over seeds, with a band of one "
        "standard deviation where a variant has several.",
        "clustering.png": "Clustering on the test split: NMI and accuracy of the clusters "
        "(whiskers: one std).",
        "epoch_seconds.png": "Training seconds per epoch after the first (whiskers: one std).",
    }
    blocks: list[Block] = [
        ("h1", f"vaebench report: {run_set.experiment}"),
        ("p", source),
        ("h2", "Leaderboard"),
        ("p", verdict(table, metric)),
        ("p", measurement_notes(run_set, metric)),
        ("table", display_table(table, metric)),
    ]
    for figure in figures:
        blocks.append(("img", (figure, captions[figure.name])))
    for best, pictures in bests:
        among = f", among {best['compared_within']}" if len(bests) > 1 else ""
        blocks.append(("h2", f"Best variant{among}: {best['variant']} (run {best['name']})"))
        for picture in pictures:
            caption = f"{best['name']}: {picture.stem.rsplit('_', 1)[-1]}"
            blocks.append(("img", (picture, caption)))
    return blocks


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, value in blocks:
        if kind == "h1":
            out.append(f"# {value}")
        elif kind == "h2":
            out.append(f"## {value}")
        elif kind == "p":
            out.append(str(value))
        elif kind == "table":
            out.append("| " + " | ".join(_md_cell(c) for c in value.columns) + " |")
            out.append("|" + "---|" * len(value.columns))
            out.extend(
                "| " + " | ".join(_md_cell(v) for v in row) + " |"
                for row in value.itertuples(index=False)
            )
        elif kind == "img":
            path, caption = value
            out.append(f"![{path.stem}]({path.name})\n\n*{caption}*")
        out.append("")
    return "\n".join(out)


HTML_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3}td{text-align:right;white-space:nowrap}td:nth-child(2){text-align:left}
figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555;font-size:13px}
"""


def _bold(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def render_html(blocks: list[Block], title: str) -> str:
    """One self-contained page: the images are embedded as base64 data URIs."""
    out = [
        "<!doctype html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{HTML_STYLE}</style></head><body>",
    ]
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(str(value))}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_bold(str(value))}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in value.columns)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                for row in value.itertuples(index=False)
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            path, caption = value
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


# --- the command -------------------------------------------------------------------------


def make_report(
    name: str,
    tracking_uri: str | None = None,
    results_dir: str | Path = "results",
    metric: str = DEFAULT_METRIC,
    all_invocations: bool = False,
    parent_id: str | None = None,
    stream=None,
) -> Report:
    """Write ``results/<name>/``: leaderboard.csv, report.md, report.html and the figures,
    and log them as artifacts (under ``report/``) of the covered invocation's parent run."""
    stream = stream or sys.stdout
    if metric not in RANKABLE:
        why = selection_problem(metric) if metric in CATALOGUE else None
        raise VaebenchError(f"--metric {metric!r}: {why or 'choose one of ' + ', '.join(RANKABLE)}")
    chosen = METRICS[metric]
    uri = resolve_tracking_uri(tracking_uri)
    run_set = select_runs(uri, name, all_invocations, parent_id)
    table = leaderboard(run_set, chosen)
    folder = Path(results_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*DOCUMENTS, *FIGURES, *(p.name for p in folder.glob("best_*.png"))]:
        (folder / stale).unlink(missing_ok=True)  # an earlier report's, e.g. another group's
    table.to_csv(folder / "leaderboard.csv", index=False)
    figures = write_figures(run_set, table, folder)
    runs = best_runs(run_set, table, chosen)
    bests = [
        (
            run,
            fetch_best_pictures(
                run_set, run["run_id"], folder, picture_prefix(run["compared_within"], len(runs))
            ),
        )
        for run in runs
    ]
    blocks = report_blocks(run_set, table, chosen, figures, bests)
    (folder / "report.md").write_text(render_markdown(blocks))
    (folder / "report.html").write_text(render_html(blocks, f"vaebench report: {name}"))
    files = [folder / document for document in DOCUMENTS]
    files += figures + [picture for _, pictures in bests for picture in pictures]
    for path in files:
        run_set.client.log_artifact(run_set.report_parent, str(path), REPORT_ARTIFACT_PATH)
    report = Report(folder, table, chosen, files, [str(run["run_id"]) for run, _ in bests])
    print_report(report, stream)
    return report


def print_report(report: Report, stream) -> None:
    shown = display_table(report.leaderboard.head(10), report.metric)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(shown.to_string(index=False), file=stream)
    if len(report.leaderboard) > 10:
        print(f"... {len(report.leaderboard) - 10} more variants in leaderboard.csv", file=stream)
    print(f"report: {report.folder / 'report.html'}", file=stream)
