"""The leaderboard of a RunSet's variants over their seeds (FINISHED runs only), ranked within
comparison groups. The spread of one run is unknown, not zero, and a variant within one
standard deviation of the best is marked as a tie."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vaebench.reporting.runs import BOUND_COLUMN, METRICS, RunSet
from vaebench.spec.catalogue import RANKABLE, MetricInfo
from vaebench.spec.config import VaebenchError

# Settings across which numbers mean different things, so runs differing in them are ranked
# apart: the data (another test set), for loss_units metrics the reconstruction loss
# (a BCE ELBO and an MSE one, SSE + KL, are on different scales), and for clustering scores
# the number of clusters K (more clusters than digits score differently; the protocol's K is 10).
DATA_PARAMS = ("params.data.dataset", "params.data.binarize", "params.data.validation")
LOSS_UNIT_PARAM = "params.loss.recon"
CLUSTER_COUNT_PARAM = "params.model.categories"
ALL_RUNS = "all runs"


def varied_params(runs: pd.DataFrame, params: list[str]) -> list[str]:
    return [p for p in params if runs[p].nunique() > 1]


def comparison_params(run_set: RunSet, metric: MetricInfo) -> list[str]:
    """The varied settings across which the metric's values are not comparable."""
    varied = varied_params(run_set.finished, [*run_set.param_columns, BOUND_COLUMN])
    keys = list(DATA_PARAMS)
    if metric.loss_units:
        keys += [LOSS_UNIT_PARAM, BOUND_COLUMN]
    if metric.per_cluster_count:
        keys.append(CLUSTER_COUNT_PARAM)
    return [k for k in keys if k in varied]


def comparison_groups(runs: pd.DataFrame, params: list[str]) -> pd.Series:
    """Each run's comparison group as text ("loss.recon=bce"), or "all runs"."""
    if not params:
        return pd.Series(ALL_RUNS, index=runs.index)
    return runs[params].astype(str).apply(
        lambda row: ", ".join(f"{k.removeprefix('params.')}={v}" for k, v in row.items()), axis=1,
    )


def present_metrics(runs: pd.DataFrame) -> list[MetricInfo]:
    return [m for m in METRICS.values() if runs[m.name].notna().any()]


def leaderboard(run_set: RunSet, metric: MetricInfo) -> pd.DataFrame:
    """One row per variant, best first within its comparison group (``compared_within``):
    mean, std (NaN for one value) and count of every metric over its finished runs, and whether
    it ties with the best within one std; a variant without the metric is listed unranked."""
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
        compared_within=comparison_groups(run_set.runs, comparison_params(run_set, metric)),
        finished=run_set.runs["status"] == "FINISHED",
    )
    stats = runs[runs["finished"]].groupby("variant")[metrics].agg(["mean", "std", "count"])
    stats.columns = [f"{name}_{stat}" for name, stat in stats.columns]
    every = runs.groupby("variant", sort=False)
    table = every[[*varied, "compared_within"]].first()
    table = table.rename(columns=lambda c: c.removeprefix("params."))
    table["runs"] = every["finished"].sum()
    table["not_finished"] = every.size() - table["runs"]
    table = table.join(stats)
    counts = [f"{name}_count" for name in metrics]
    table[counts] = table[counts].fillna(0).astype(int)
    table = table.sort_values(
        ["compared_within", f"{metric.name}_mean"], ascending=[True, not metric.higher_is_better],
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
    """"best" for the first row; "yes"/"no" for whether a variant's mean lies within one standard
    deviation (the larger of the two) of the best's; "" when either has a single value, whose
    spread is unknown."""
    mean, std = table[f"{metric.name}_mean"], table[f"{metric.name}_std"]
    within = np.where((mean - mean.iloc[0]).abs() <= np.maximum(std, std.iloc[0]), "yes", "no")
    unknown = std.isna() | np.isnan(std.iloc[0])
    return ["best", *np.where(unknown, "", within)[1:].tolist()]


def best_runs(run_set: RunSet, table: pd.DataFrame, metric: MetricInfo) -> list[pd.Series]:
    """Per comparison group, the best variant's run that scored best on the metric, with
    its group as ``compared_within``."""
    chosen = []
    best = table[table["ties_best"] == "best"]
    for variant, group in zip(best["variant"], best["compared_within"], strict=True):
        runs = run_set.finished[run_set.finished["variant"] == variant]
        top = runs.sort_values(metric.name, ascending=not metric.higher_is_better).iloc[0]
        chosen.append(pd.concat([top, pd.Series({"compared_within": group})]))
    return chosen
