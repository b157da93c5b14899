"""A finished run's Matplotlib figures (its latent scatter and its KL per latent dimension) as
PNG bytes: drawn by the finishing helper process, or here when the helper has not started them.
Free of torch, so that the helper never imports it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LATENT_PICTURE = "latent.png"
KL_PICTURE = "kl_per_dimension.png"


def run_figures(
    points: np.ndarray, labels: np.ndarray, title: str,
    kl_nats: Sequence[float] | None = None, kl_split: str = "",
) -> dict[str, bytes]:
    """File name to PNG bytes: the PCA scatter of the latent means (``labels`` colour them) and,
    with ``kl_nats``, a bar per latent dimension of its KL on ``kl_split``."""
    from vaebench.plots import dimension_bars_png, latent_scatter_png  # Matplotlib: when drawn

    figures = {LATENT_PICTURE: latent_scatter_png(points, labels, title)}
    if kl_nats is not None:
        heading = f"{title}: KL per latent dimension, {kl_split} split"
        figures[KL_PICTURE] = dimension_bars_png(kl_nats, heading, "nats per image")
    return figures
