"""Pictures drawn with Matplotlib (Agg backend): the latent scatter and the report's charts.
Image grids need no Matplotlib: :mod:`vaebench.image_grids`."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vaebench.atomic import atomic_file  # noqa: E402

COLOURS = plt.get_cmap("tab10").colors  # a digit's colour in every picture


def principal_components(points: np.ndarray) -> np.ndarray:
    """The points' coordinates on their first two principal axes (signs fixed so that each
    axis's largest loading is positive, as scikit-learn's PCA does).

    On one BLAS thread: a run's figures are drawn beside other work (the finishing helper's
    k-means, torch's threads), and NumPy's two OpenBLAS threads then wait on each other: this
    SVD of 2,000 by 20 took 35 to 230 ms inside a grid's finishing on 2 cores, against 1 ms on
    one thread."""
    from threadpoolctl import threadpool_limits

    centred = points - points.mean(axis=0)
    with threadpool_limits(limits=1, user_api="blas"):
        _, _, axes = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    axes = axes[:2]
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    coords = centred @ (axes * signs[:, None]).T
    if coords.shape[1] == 1:  # a one-dimensional latent: drawn on a line
        coords = np.column_stack([coords[:, 0], np.zeros(len(coords))])
    return coords


def embed_2d(points: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D picture coordinates of latent means and the method's name: ``pca`` (instant; the
    run's own picture) or ``tsne`` (seconds for 2,000 points; ``report --tsne``)."""
    if method == "pca" or points.shape[1] <= 2:
        return principal_components(points), "PCA"
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, init="pca", random_state=seed).fit_transform(points), "t-SNE"


def save_latent_scatter(
    path: Path, points: np.ndarray, labels: np.ndarray, title: str, method: str = "pca"
) -> Path:
    path.write_bytes(latent_scatter_png(points, labels, title, method))
    return path


def latent_scatter_png(
    points: np.ndarray, labels: np.ndarray, title: str, method: str = "pca"
) -> bytes:
    """The latent scatter's PNG file, as bytes (each run draws one, so drawn cheaply: a figure
    made without pyplot's figure manager, fixed margins in place of a layout pass, and a line
    of markers per label, for which Agg stamps one marker image, where a scatter draws every
    point's path; so where clusters overlap, later digits are drawn over earlier ones)."""
    coords, name = embed_2d(points, method)
    fig = Figure(figsize=(6.6, 6), dpi=100)
    fig.subplots_adjust(left=0.02, right=0.87, bottom=0.02, top=0.91)
    ax = fig.add_subplot()
    for label in np.unique(labels):
        chosen = labels == label
        ax.plot(*coords[chosen].T, "o", ms=2, mew=0, color=COLOURS[int(label) % len(COLOURS)],
                label=str(label))
    ax.legend(title="label", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              markerscale=3, frameon=False)
    ax.set_title(f"{title}\n{name} of E[z|x], {len(points)} test images", fontsize=10)
    ax.set(xticks=[], yticks=[])
    return png_bytes(fig)


def png_bytes(fig: Figure) -> bytes:
    """A figure made without pyplot as PNG bytes, zlib's fastest level (a tenth larger)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


def _save(fig, path: Path, **options) -> Path:
    """A PNG file written whole or not at all (the helper process drawing it may be killed)."""
    fig.tight_layout()
    with atomic_file(path) as file:
        fig.savefig(file, format="png", **options)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Curve:
    """One line of a chart; ``low``/``high`` draw a band around it when given."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    notes: Sequence[str] = ()  # text beside each point (e.g. the beta value)


@dataclass(frozen=True)
class Bars:
    """Horizontal bars, one per label, with optional error whiskers (NaN: none)."""

    labels: Sequence[str]
    values: Sequence[float]
    errors: Sequence[float]


LINE_STYLES = ("-", "--", ":", "-.")


def save_curves(
    path: Path, panels: Mapping[str, Sequence[Curve]], xlabel: str, ylabel: str,
    points: Mapping[str, Sequence[Curve]] | None = None, integer_x: bool = False,
) -> Path:
    """Side-by-side panels of lines (with bands); ``points`` adds unjoined markers per panel,
    drawn in the colour of the line with the same label."""
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 4.5), dpi=100, squeeze=False
    )
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for index, curve in enumerate(curves):
            colour = COLOURS[index % len(COLOURS)]
            style = LINE_STYLES[(index // len(COLOURS)) % len(LINE_STYLES)]
            ax.plot(curve.x, curve.y, style, color=colour, marker="o", ms=3, label=curve.label)
            if curve.low is not None and curve.high is not None:
                ax.fill_between(curve.x, curve.low, curve.high, color=colour, alpha=0.2, lw=0)
            for x, y, note in zip(curve.x, curve.y, curve.notes, strict=False):
                ax.annotate(note, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            for extra in (points or {}).get(title, ()):
                if extra.label == curve.label:
                    ax.scatter(extra.x, extra.y, color=colour, s=10, alpha=0.5)
        ax.set_title(title, fontsize=10)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(  # each panel's own legend under it (panels may hold different lines)
            loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, frameon=False,
            ncol=1 if len(curves) <= 4 else 2 if len(curves) <= 16 else 3,
        )
    return _save(fig, path, bbox_inches="tight")  # keeps the legends below the panels


def save_bars(path: Path, panels: Mapping[str, Bars]) -> Path:
    """Panels of horizontal bars sharing the labels' order (best first, at the top)."""
    count = max(len(bars.labels) for bars in panels.values())
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels) + 2, 0.28 * count + 1.5), dpi=100,
        squeeze=False, sharey=True,
    )
    for ax, (title, bars) in zip(axes[0], panels.items(), strict=True):
        rows = np.arange(len(bars.labels))
        values, errors = np.asarray(bars.values, float), np.asarray(bars.errors, float)
        ax.barh(rows, values, color=COLOURS[0])
        known = ~np.isnan(errors)  # no whisker where the spread is unknown (one run)
        if known.any():
            ax.errorbar(values[known], rows[known], xerr=errors[known], fmt="none",
                        ecolor="black", capsize=2)
        ax.set_yticks(rows, bars.labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # the axes share y: inverting once puts the first label on top
    return _save(fig, path)


def dimension_bars_png(values: Sequence[float], title: str, ylabel: str) -> bytes:
    """A bar per latent dimension, drawn cheaply as :func:`latent_scatter_png` is."""
    width = min(8.0, 2.5 + 0.12 * len(values))
    fig = Figure(figsize=(width, 2.6), dpi=80)
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=0.2, top=0.84)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(values)), values, width=0.8, color=COLOURS[0])
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("latent dimension", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return png_bytes(fig)
