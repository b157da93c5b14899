"""Image grids (a run's reconstructions and samples) written as grey PNGs with PIL: no
matplotlib, whose import and figure machinery cost a run's post-processing more than the
pixels do (docs/performance.md#profile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def tile(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """``(N, 1, H, W)`` images in [0, 1] -> one grey ``(rows*(H+pad)+pad, ...)`` array, white
    between the images."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    n, _, height, width = images.shape
    rows = -(-n // columns)
    cells = np.ones((rows * columns, height + pad, width + pad), dtype=np.float32)
    cells[:n, pad:, pad:] = images[:, 0]
    canvas = cells.reshape(rows, columns, height + pad, width + pad).transpose(0, 2, 1, 3)
    canvas = canvas.reshape(rows * (height + pad), columns * (width + pad))
    return np.pad(canvas, ((0, pad), (0, pad)), constant_values=1.0)


def save_grid(path: Path, images: np.ndarray, columns: int, scale: int = 3) -> Path:
    """Write a tiled PNG, each pixel enlarged ``scale`` times so it is legible in the UI."""
    canvas = tile(images, columns).repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(np.rint(canvas * 255).astype(np.uint8)).save(path)
    return path


def save_reconstructions(path: Path, originals: np.ndarray, reconstructions: np.ndarray) -> Path:
    """Originals in the top row, their reconstructions in the row below."""
    both = np.concatenate([originals, reconstructions])
    return save_grid(path, both, columns=len(originals))
