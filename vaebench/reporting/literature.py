"""Published figures (``literature.csv``, docs/metrics.md#published-figures) and how each one's
setting compares with a grid's variants: a figure is put beside a grid's rows with every
setting that differs said, never silently mixed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files

import pandas as pd

from vaebench.reporting.runs import RunSet
from vaebench.scoring.clustering import KMEANS_CLUSTERS
from vaebench.spec.catalogue import CATEGORICAL
from vaebench.spec.config import DataConfig

LITERATURE_FILE = "literature.csv"
# the settings a published figure is compared on; "" in the file: the source does not say
SETTINGS = ("binarize", "estimator", "k", "images")
ALL_IMAGES = "all"
# a metric's estimator as this suite computes it (vaebench.scoring)
ESTIMATORS = {"test_nll": "iwae", "test_accuracy": "hungarian"}
ESTIMATOR_NAMES = {
    "iwae": "IWAE importance sampling",
    "hungarian": "clusters matched one-to-one to digits (Hungarian)",
    "majority": "each cluster labelled with its most frequent digit",
}


def load_literature() -> pd.DataFrame:
    """The published figures, one row each; every column text but ``value`` and ``std``."""
    with (files("vaebench.reporting") / LITERATURE_FILE).open(encoding="utf-8") as handle:
        table = pd.read_csv(handle, dtype=str, keep_default_na=False)
    return table.assign(value=table["value"].astype(float),
                        std=pd.to_numeric(table["std"], errors="coerce"))


def variant_settings(run_set: RunSet, metric: str) -> pd.DataFrame:
    """Per variant with a value of ``metric``: its dataset and the :data:`SETTINGS` that
    ``metric``'s figures depend on, as text."""
    finished = run_set.finished
    runs = finished[finished[metric].notna()].drop_duplicates("variant").set_index("variant")
    data = DataConfig.model_fields
    settings = pd.DataFrame({
        "dataset": _param(runs, "data.dataset", data["dataset"].default),
        "binarize": _param(runs, "data.binarize", data["binarize"].default),
        "estimator": ESTIMATORS.get(metric, ""), "k": "", "images": ALL_IMAGES,
    }, index=runs.index)
    if metric == "test_nll":
        settings["k"] = _param(runs, "eval.iwae_samples", "")
        settings["images"] = _param(runs, "eval.iwae_images", "null").replace("null", ALL_IMAGES)
    elif metric == "test_accuracy":  # argmax q(c|x) over the categories, else k-means
        categorical = _param(runs, "model.arch", "").isin(CATEGORICAL)
        clusters = _param(runs, "model.categories", str(KMEANS_CLUSTERS))
        settings["k"] = clusters.where(categorical, str(KMEANS_CLUSTERS))
    return settings


def _param(runs: pd.DataFrame, name: str, default: str) -> pd.Series:
    column = runs.get(f"params.{name}")
    if column is None:
        return pd.Series(default, index=runs.index, dtype=object)
    return column.astype(str).replace("", default)


@dataclass
class Comparison:
    """A published figure beside a comparison group's variants."""

    figure: pd.Series  # a row of :func:`load_literature`
    same: list[str] = field(default_factory=lambda: ["dataset"])  # as every variant's
    differences: list[str] = field(default_factory=list)  # "K: 200 there; 5000 for mlp"
    unstated: list[str] = field(default_factory=list)  # settings the source does not give


def compare(figure: pd.Series, settings: pd.DataFrame) -> Comparison:
    """``figure``'s setting against each variant's (``settings``, of one dataset)."""
    comparison = Comparison(figure)
    for name in SETTINGS:
        theirs = str(figure[name])
        if not theirs:
            comparison.unstated.append(setting_name(name, figure))
            continue
        differing = settings[settings[name] != theirs][name]
        if differing.empty:
            comparison.same.append(setting_name(name, figure))
            continue
        ours = "; ".join(
            f"{describe(name, value)} for {', '.join(group.index)}"
            for value, group in differing.groupby(differing, sort=False)
        )
        comparison.differences.append(
            f"{setting_name(name, figure)}: {describe(name, theirs)} there; {ours}"
        )
    return comparison


def setting_name(name: str, figure: pd.Series) -> str:
    if name == "k":
        return "K (importance samples)" if figure["metric"] == "test_nll" else "K (clusters)"
    return {"binarize": "binarization", "images": "test images"}.get(name, name)


def describe(name: str, value: str) -> str:
    if name == "estimator":
        return ESTIMATOR_NAMES.get(value, value)
    if name == "images":
        return "all" if value == ALL_IMAGES else f"{int(value):,}"
    return value


def beside(literature: pd.DataFrame, metric: str, settings: pd.DataFrame) -> list[Comparison]:
    """The published figures of ``metric`` on the datasets of ``settings``' variants."""
    rows = literature[(literature["metric"] == metric)
                      & literature["dataset"].isin(set(settings["dataset"]))]
    return [compare(row, settings[settings["dataset"] == row["dataset"]])
            for _, row in rows.iterrows()]
