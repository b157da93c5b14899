"""Pictures: image grids (reconstructions, prior samples). Matplotlib with the Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def tile(images: torch.Tensor, columns: int, pad: int = 2) -> np.ndarray:
    """``(N, 1, H, W)`` images in [0, 1] -> one grey ``(rows*(H+pad)+pad, ...)`` array."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, _, height, width = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (height + pad) + pad, columns * (width + pad) + pad), dtype=np.float32)
    for index in range(n):
        r, c = divmod(index, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[top : top + height, left : left + width] = images[index, 0].numpy()
    return canvas


def save_grid(path: Path, images: torch.Tensor, columns: int, scale: int = 3) -> Path:
    """Write a tiled PNG, each pixel enlarged ``scale`` times so it is legible in the UI."""
    canvas = tile(images, columns)
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(path, canvas, cmap="gray", vmin=0.0, vmax=1.0)
    return path


def save_reconstructions(
    path: Path, originals: torch.Tensor, reconstructions: torch.Tensor
) -> Path:
    """Originals in the top row, their reconstructions in the row below."""
    return save_grid(path, torch.cat([originals, reconstructions]), columns=len(originals))


def embed_2d(points: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D picture coordinates of latent means: PCA when there are at most 2 dims, else t-SNE."""
    if points.shape[1] <= 2:
        from sklearn.decomposition import PCA

        if points.shape[1] == 1:
            return np.column_stack([points[:, 0], np.zeros(len(points))]), "z"
        return PCA(n_components=2, random_state=seed).fit_transform(points), "PCA"
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, init="pca", random_state=seed).fit_transform(points), "t-SNE"


def save_latent_scatter(path: Path, points: np.ndarray, labels: np.ndarray, title: str) -> Path:
    """The latent means of test images in 2-D, one colour per label."""
    coords, method = embed_2d(points)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    scatter = ax.scatter(
        coords[:, 0], coords[:, 1], c=labels, cmap="tab10", s=4, vmin=-0.5, vmax=9.5
    )
    fig.colorbar(scatter, ax=ax, ticks=range(10), label="label")
    ax.set_title(f"{title}\n{method} of E[z|x], {len(points)} test images", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
