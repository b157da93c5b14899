"""Benchmark: vaebench's trainer against the conventional loop, in the same process.

The conventional loop is pytorch/examples' VAE loop: a DataLoader over a
Dataset that turns each uint8 image into a PIL image and then into a float
tensor (what torchvision's MNIST with ``ToTensor`` does per sample), and a
``loss.item()`` host read every step. Both loops train the same model with the
same loss and optimizer; only the data path and the per-step sync differ.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vaebench.config import RunConfig
from vaebench.data import Splits, load_arrays, load_splits, resolve_root
from vaebench.losses import Objective, loss_terms
from vaebench.models import build_model
from vaebench.train import build_optimizer, resolve_device, train_epoch

# pytorch/examples' VAE: 784-400-20, BCE, Adam 1e-3, batch 128
REFERENCE = {
    "model": {"arch": "mlp", "hidden": [400], "z_dim": 20},
    "loss": {"recon": "bce", "beta": 1.0},
    "optim": {"name": "adam", "lr": 1e-3},
    "train": {"batch_size": 128, "device": "cpu"},
}


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """What torchvision's ``ToTensor`` does with a greyscale PIL image."""
    array = torch.from_numpy(np.array(image, np.uint8, copy=True))
    array = array.view(image.size[1], image.size[0], 1).permute((2, 0, 1)).contiguous()
    return array.to(dtype=torch.get_default_dtype()).div(255)


class PerImageMNIST(Dataset):
    """torchvision.datasets.MNIST's ``__getitem__``: uint8 -> PIL image -> tensor, per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.data = torch.from_numpy(np.array(images, copy=True))
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.data[index].numpy(), mode="L")
        return pil_to_tensor(image), int(self.targets[index])


def conventional_epoch(model, optimizer, loader: DataLoader, config: RunConfig, device) -> float:
    """pytorch/examples' ``train(epoch)``: per-step device copy and ``loss.item()``."""
    model.train()
    objective = Objective(config.loss)
    train_loss = 0.0
    for data, _ in loader:
        data = data.to(device)
        optimizer.zero_grad()
        loss = objective(loss_terms(model, data, None, config.loss.recon), data.shape[0], 0)
        (loss / data.shape[0]).backward()
        train_loss += loss.item()
        optimizer.step()
    return train_loss / len(loader.dataset)


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_interleaved(steps: dict[str, Callable[[], object]], epochs: int) -> list[Timing]:
    """Seconds per epoch of each loop, after one untimed warm-up epoch each.

    Epochs run round-robin (A, B, C, A, B, C, ...) so that drift in the
    machine's speed hits every loop alike.
    """
    for step in steps.values():
        step()
    timings = {name: Timing(name, []) for name in steps}
    for _ in range(epochs):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            timings[name].seconds.append(time.perf_counter() - started)
    return list(timings.values())


def run_bench(
    splits: Splits, conventional: PerImageMNIST, epochs: int, seed: int = 0
) -> list[Timing]:
    """Time three loops on the same model: vaebench as shipped, vaebench's data path with
    torch's default (unfused) Adam, and the conventional loop (default Adam)."""
    config = RunConfig.model_validate({**REFERENCE, "seed": seed})
    unfused = config.model_copy(
        update={"optim": config.optim.model_copy(update={"kwargs": {"fused": False}})}
    )
    device = resolve_device(config.train.device)

    def fresh(run_config: RunConfig):
        torch.manual_seed(seed)
        model = build_model(run_config.model, splits.image_shape).to(device)
        return model, build_optimizer(run_config.optim, model.parameters())

    def vaebench_loop(run_config: RunConfig):
        model, optimizer = fresh(run_config)
        generator = torch.Generator().manual_seed(seed)
        # one host read per epoch
        objective = Objective(run_config.loss)

        def step() -> float:
            return train_epoch(model, optimizer, objective, run_config, splits, generator).item()

        return step

    def conventional_loop():
        model, optimizer = fresh(unfused)
        loader = DataLoader(conventional, batch_size=config.train.batch_size, shuffle=True)
        return lambda: conventional_epoch(model, optimizer, loader, config, device)

    steps = {
        "vaebench (as shipped: fused Adam)": vaebench_loop(config),
        "vaebench data path, default Adam": vaebench_loop(unfused),
        "conventional (DataLoader, per-image ToTensor)": conventional_loop(),
    }
    return time_interleaved(steps, epochs)


def main(data_root: str | None, epochs: int = 3, subset: int | None = None) -> int:
    root = resolve_root(data_root)
    config = RunConfig.model_validate({**REFERENCE, "data": {"subset": subset}})
    splits = load_splits(config.data, root, torch.device("cpu"))
    images, labels = load_arrays(config.data.dataset, root)["train"]
    count = len(splits.train)
    conventional = PerImageMNIST(images[:count], labels[:count])
    print(
        f"MLP VAE 784-400-20, BCE, Adam 1e-3, batch 128, {count} training images, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{epochs} timed epochs each after 1 warm-up, interleaved"
    )
    timings = run_bench(splits, conventional, epochs)
    for timing in timings:
        per_epoch = ", ".join(f"{s:.2f}" for s in timing.seconds)
        print(f"{timing.name:<48s} median {timing.median:6.2f} s/epoch  ({per_epoch})")
    conventional_median = timings[-1].median
    for timing in timings[:-1]:
        print(f"speed-up of {timing.name}: {conventional_median / timing.median:.2f}x")
    return 0
