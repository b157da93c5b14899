"""The files a finished run leaves in MLflow: its config, weights and pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from vaebench.data import Splits
from vaebench.grid import RunSpec
from vaebench.plots import save_grid, save_latent_scatter, save_reconstructions

LATENT_SAMPLE = 2000  # test images in the latent picture
LATENT_SAMPLE_SEED = 0
LATENT_FILE = "latent.npz"  # their E[z|x] and labels, from which `report --tsne` draws


def write_config(folder: Path, run: RunSpec) -> None:
    """``config.yaml``: the resolved config, enough to train the run again."""
    text = yaml.safe_dump(run.config.model_dump(mode="json"), sort_keys=False)
    (folder / "config.yaml").write_text(text)


def write_weights(folder: Path, run: RunSpec, model: torch.nn.Module) -> None:
    """``config.yaml`` and ``state_dict.pt``: what rebuilds the trained model (a registered
    model is made from them)."""
    write_config(folder, run)
    torch.save(model.state_dict(), folder / "state_dict.pt")


def write_artifacts(folder: Path, run: RunSpec, model: torch.nn.Module, splits: Splits) -> None:
    """Resolved config, state_dict, reconstructions, prior samples, the latent means of a
    fixed sample of test images (``latent.npz``) and their picture (PCA: a t-SNE of 2,000
    points takes seconds, so ``report --tsne`` draws it for the runs a report shows), and
    the pictures the model family adds (a conditional model's row of samples per digit)."""
    write_weights(folder, run, model)
    model.eval()
    test = splits.test
    with torch.no_grad():
        originals, labels = test.images[:16], test.labels[:16]
        recon = torch.sigmoid(model.reconstruct(originals, labels))
        save_reconstructions(folder / "reconstructions.png", originals, recon)
        generator = torch.Generator(device=originals.device).manual_seed(0)
        samples = torch.sigmoid(model.sample_prior(64, generator=generator))
        save_grid(folder / "samples.png", samples, columns=8)
        chosen = torch.randperm(
            len(test), generator=torch.Generator().manual_seed(LATENT_SAMPLE_SEED)
        )
        chosen = chosen[:LATENT_SAMPLE].to(test.images.device)
        mu, _ = model.encode(test.images[chosen], test.labels[chosen])
        means, labels = mu.cpu().numpy(), test.labels[chosen].cpu().numpy()
        np.savez_compressed(folder / LATENT_FILE, means=means, labels=labels)
        save_latent_scatter(folder / "latent.png", means, labels, run.name)
        for name, (logits, columns) in model.extra_pictures(generator).items():
            save_grid(folder / name, torch.sigmoid(logits), columns=columns)
