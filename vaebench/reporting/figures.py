"""Report figures: the matplotlib figures of a report (rate-distortion, validation ELBO and
NMI by epoch, clustering and epoch-time bars), drawn through plots.py, here or by the
invocation's helper process (:class:`Drawings`) while this process registers the best
models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from vaebench.lifecycle.finishing_helper import Drawing, draw_here
from vaebench.plots import Bars, Curve, save_bars, save_curves
from vaebench.reporting.runs import METRICS, RunSet
from vaebench.reporting.table import (
    comparison_groups,
    comparison_params,
    present_metrics,
    varied_params,
)

# each bar figure's metrics (it draws those the runs have)
BAR_FIGURES = {
    "clustering.png": ("test_nmi", "test_accuracy"), "epoch_seconds.png": ("mean_epoch_seconds",),
}
# each curve figure's metric, against epoch (drawn where the runs logged it per epoch)
EPOCH_FIGURES = {"elbo_by_epoch.png": "val_elbo", "nmi_by_epoch.png": "val_nmi"}
FIGURES = ("rate_distortion.png", *EPOCH_FIGURES, *BAR_FIGURES)
SaveFigure = Callable[..., Path]  # a plots.save_* function: its file first, then what it draws


class Drawings:
    """The report's figures being drawn: each handed to ``hand_over`` (the invocation's helper
    process, :meth:`~vaebench.lifecycle.finishing_helper.FinishingHelper.draw`; default: drawn
    here by :meth:`wait`) with its file's absolute path (the helper's working folder is this
    process's when it started), the path given back at once; :meth:`wait` returns once every
    file is written (drawn here where the helper had not started it)."""

    def __init__(self, hand_over: Callable[..., Drawing[Path]] = draw_here) -> None:
        self._hand_over = hand_over
        self._drawings: list[Drawing[Path]] = []

    def __call__(self, save: SaveFigure, path: Path, *arguments: Any, **keywords: Any) -> Path:
        self._drawings.append(self._hand_over(save, path.absolute(), *arguments, **keywords))
        return path

    def wait(self) -> None:
        for drawing in self._drawings:
            drawing.result()


def rate_distortion_figure(run_set: RunSet, path: Path, draw: Drawings) -> Path | None:
    """KL against reconstruction, a point per run; a line joins the per-beta means of one
    architecture/loss/optimizer (every varied param but beta). A panel per reconstruction
    loss when the grid varies it, as BCE and MSE are in different units."""
    runs = run_set.finished.dropna(subset=["test_kl", "test_recon"])
    if runs.empty:
        return None
    varied = varied_params(run_set.finished, run_set.param_columns)
    panel_keys = comparison_params(run_set, METRICS["test_recon"])
    beta = "params.loss.beta"
    line_keys = [p for p in varied if p != beta and p not in panel_keys]
    betas = pd.to_numeric(runs[beta], errors="coerce") if beta in runs else None
    panels: dict[str, list[Curve]] = {}
    points: dict[str, list[Curve]] = {}
    for title, in_panel in runs.groupby(comparison_groups(runs, panel_keys)):
        lines, dots = [], []
        for _, line in in_panel.groupby(line_keys, sort=False) if line_keys else [("", in_panel)]:
            label = "-".join(str(line.iloc[0][c]) for c in line_keys) or "runs"
            by_beta = line.groupby(betas) if betas is not None else [(None, line)]
            means = [(b, g["test_kl"].mean(), g["test_recon"].mean()) for b, g in by_beta]
            notes = [f"β={b:g}" if b is not None else "" for b, _, _ in means]
            lines.append(Curve(label, [m[1] for m in means], [m[2] for m in means], notes=notes))
            dots.append(Curve(label, list(line["test_kl"]), list(line["test_recon"])))
        panels[title], points[title] = lines, dots
    return draw(save_curves, path, panels, "KL (rate, nats)", "reconstruction (distortion)", points)


def epoch_curve_figure(
    run_set: RunSet, order: list[str], metric: str, path: Path, draw: Drawings
) -> Path | None:
    """A validation metric against epoch per variant (MLflow metric history): the mean over
    seeds with a band of one standard deviation when there are several, and each seed's
    values as dots, so that a reader sees where every seed is heading."""
    finished = run_set.finished
    groups = comparison_groups(finished, comparison_params(run_set, METRICS[metric]))
    group_of = dict(zip(finished["variant"], groups, strict=True))
    panels: dict[str, list[Curve]] = {}
    seeds: dict[str, list[Curve]] = {}
    for variant in order:
        runs = finished.loc[finished["variant"] == variant, "run_id"]
        histories = {run: run_set.client.get_metric_history(run, metric) for run in runs}
        if not any(histories.values()):
            continue  # not logged per epoch (no validation split, or no clusters)
        series = {run: pd.Series({m.step: m.value for m in h}) for run, h in histories.items()}
        by_epoch = pd.DataFrame(series).sort_index()
        mean, std = by_epoch.mean(axis=1), by_epoch.std(axis=1)
        band = (list(mean - std), list(mean + std)) if by_epoch.shape[1] > 1 else (None, None)
        group = group_of[variant]
        panels.setdefault(group, []).append(Curve(variant, list(by_epoch.index), list(mean), *band))
        if by_epoch.shape[1] > 1:
            stacked = by_epoch.stack()  # (epoch, run) -> value, each seed's every epoch
            dots = Curve(variant, list(stacked.index.get_level_values(0)), list(stacked))
            seeds.setdefault(group, []).append(dots)
    if not panels:
        return None
    label = "validation " + METRICS[metric].label.removeprefix("val ")
    return draw(save_curves, path, panels, "epoch", label, seeds, integer_x=True)


def write_figures(
    run_set: RunSet, table: pd.DataFrame, folder: Path, draw: Drawings
) -> list[Path]:
    """The report's figures that the runs have data for, drawn by ``draw``."""
    present = {m.name for m in present_metrics(run_set.finished)}
    shown = table[table["runs"] > 0]
    labels = list(shown["variant"])
    figures = [
        rate_distortion_figure(run_set, folder / "rate_distortion.png", draw),
        *(epoch_curve_figure(run_set, labels, metric, folder / name, draw)
          for name, metric in EPOCH_FIGURES.items()),
    ]
    for name, names in BAR_FIGURES.items():
        panels = {
            METRICS[n].label: Bars(labels, list(shown[f"{n}_mean"]), list(shown[f"{n}_std"]))
            for n in names if n in present
        }
        if panels:
            figures.append(draw(save_bars, folder / name, panels))
    return [f for f in figures if f is not None]
