"""A finished run's files, made in two steps so that the second can run in a background process:
what needs the model (on its device, at once), then the files made from its bytes and arrays."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from vaebench.data import Splits
from vaebench.image_grids import save_grid, save_reconstructions
from vaebench.scoring.collapse import KLPerDimension
from vaebench.spec.grid import RunSpec

LATENT_SAMPLE = 2000  # test images in the latent picture
LATENT_SAMPLE_SEED = 0
LATENT_FILE = "latent.npz"  # their E[z|x] and labels, from which `report --tsne` draws
KL_FILE = "kl_per_dimension.json"


@dataclass
class RunPictures:
    """A run's pictures as host arrays of images in [0, 1] (``(N, 1, H, W)``), and the latent
    means of a fixed sample of test images; ``extra``: the family's own (name: images, columns)."""

    originals: np.ndarray
    reconstructions: np.ndarray
    samples: np.ndarray
    latent_means: np.ndarray
    latent_labels: np.ndarray
    extra: dict[str, tuple[np.ndarray, int]]


def weights_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def write_weights(folder: Path, run: RunSpec, weights: bytes) -> None:
    """What trains the run again, or rebuilds the trained model (a registered model's source)."""
    config = yaml.safe_dump(run.config.model_dump(mode="json"), sort_keys=False)
    (folder / "config.yaml").write_text(config)
    (folder / "state_dict.pt").write_bytes(weights)


def picture_arrays(model: torch.nn.Module, splits: Splits) -> RunPictures:
    model.eval()
    test = splits.test

    def host(images: torch.Tensor) -> np.ndarray:
        return images.detach().float().cpu().numpy()

    with torch.no_grad():
        originals, labels = test.images[:16], test.labels[:16]
        recon = torch.sigmoid(model.reconstruct(originals, labels))
        generator = torch.Generator(device=originals.device).manual_seed(0)
        samples = torch.sigmoid(model.sample_prior(64, generator=generator))
        shuffled = torch.Generator().manual_seed(LATENT_SAMPLE_SEED)
        chosen = torch.randperm(len(test), generator=shuffled)[:LATENT_SAMPLE].to(originals.device)
        mu, _ = model.encode(test.images[chosen], test.labels[chosen])
        extra = {
            name: (host(torch.sigmoid(logits)), columns)
            for name, (logits, columns) in model.extra_pictures(generator).items()
        }
    return RunPictures(
        originals=host(originals), reconstructions=host(recon), samples=host(samples), extra=extra,
        latent_means=mu.cpu().numpy(), latent_labels=test.labels[chosen].cpu().numpy(),
    )


def draw_pictures(folder: Path, pictures: RunPictures, figures: dict[str, bytes]) -> None:
    """``reconstructions.png``, ``samples.png``, ``latent.npz``, the model family's own
    pictures, and ``figures`` (:func:`~vaebench.lifecycle.run_figures.run_figures`: the latent
    picture, a PCA, as a t-SNE of 2,000 points takes seconds: ``report --tsne`` draws it for
    the runs a report shows)."""
    originals, reconstructions = pictures.originals, pictures.reconstructions
    save_reconstructions(folder / "reconstructions.png", originals, reconstructions)
    save_grid(folder / "samples.png", pictures.samples, columns=8)
    means, labels = pictures.latent_means, pictures.latent_labels
    np.savez_compressed(folder / LATENT_FILE, means=means, labels=labels)
    for name, png in figures.items():
        (folder / name).write_bytes(png)
    for name, (images, columns) in pictures.extra.items():
        save_grid(folder / name, images, columns=columns)


def write_kl_per_dimension(folder: Path, profile: KLPerDimension) -> None:
    """``kl_per_dimension.json``: the split and the nats per image of each latent dimension (a
    collapsed dimension's KL is 0); its bars are one of the run's figures."""
    (folder / KL_FILE).write_text(json.dumps(asdict(profile)) + "\n")
