"""Benchmark: vaebench's trainer against pytorch/examples' conventional loop in one process,
the same model, loss and optimizer; only the data path (per-image PIL and ``ToTensor``) and the
per-step ``loss.item()`` differ. Measured figures: docs/performance.md."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vaebench.data import Splits, load_arrays, load_splits, resolve_root
from vaebench.models.losses import Objective, loss_terms
from vaebench.spec.config import RunConfig
from vaebench.training.checkpoint import CheckpointStore
from vaebench.training.trainer import EpochMetrics, ModelTrainee, resolve_device

CHECKPOINT_WRITE = "checkpoint write"
# pytorch/examples' VAE: 784-400-20, BCE, Adam 1e-3, batch 128
REFERENCE = {
    "model": {"arch": "mlp", "hidden": [400], "z_dim": 20}, "loss": {"recon": "bce", "beta": 1.0},
    "optim": {"name": "adam", "lr": 1e-3}, "train": {"batch_size": 128, "device": "cpu"},
}
# experiments/quick.yaml's conv variant (BCE, Adam 1e-3, batch 128)
CONV = {**REFERENCE, "model": {"arch": "conv", "channels": [32, 64], "z_dim": 20}}


class PerImageMNIST(Dataset):
    """torchvision.datasets.MNIST's ``__getitem__``: uint8 -> PIL image -> tensor, per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.data = torch.from_numpy(np.array(images, copy=True))
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.data[index].numpy(), mode="L")
        # what torchvision's ``ToTensor`` does with a greyscale PIL image
        array = torch.from_numpy(np.array(image, np.uint8, copy=True))
        array = array.view(image.size[1], image.size[0], 1).permute((2, 0, 1)).contiguous()
        return array.to(dtype=torch.get_default_dtype()).div(255), int(self.targets[index])


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
    """Seconds per epoch of each loop, after one untimed warm-up epoch each. Epochs run
    round-robin (A, B, C, A, B, C, ...) so that drift in the machine's speed hits every loop
    alike."""
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
    splits: Splits, conventional: PerImageMNIST, epochs: int, seed: int = 0,
    checkpoint_folder: Path | None = None,
) -> list[Timing]:
    """Time three loops on the same model: vaebench as shipped, vaebench's data path with
    torch's default (unfused) Adam, and the conventional loop (default Adam); with
    ``checkpoint_folder``, also the shipped loop writing a checkpoint after every epoch, the
    write timed on its own (a Timing named ``CHECKPOINT_WRITE``)."""
    config = RunConfig.model_validate({**REFERENCE, "seed": seed})
    unfused = config.model_copy(
        update={"optim": config.optim.model_copy(update={"kwargs": {"fused": False}})}
    )
    device = resolve_device(config.train.device)
    writes = Timing(CHECKPOINT_WRITE, [])

    def vaebench_loop(run_config: RunConfig, folder: Path | None = None):
        """vaebench's epoch, one host read each; with ``folder``, a timed checkpoint after it."""
        trainee = ModelTrainee(run_config, splits, device)
        store = CheckpointStore(folder) if folder is not None else None
        history: list[EpochMetrics] = []

        def step() -> float:
            loss = trainee.epoch(0).item()
            if store is not None:
                history.append(EpochMetrics(len(history) + 1, loss, 0.0, 0.0, 0.0))
                started = time.perf_counter()
                store.save("bench", trainee.training_state(0, history, 0.0))
                writes.seconds.append(time.perf_counter() - started)
            return loss

        return step

    def conventional_loop():
        run = ModelTrainee(unfused, splits, device)
        loader = DataLoader(conventional, batch_size=config.train.batch_size, shuffle=True)
        return lambda: conventional_epoch(run.model, run.optimizer, loader, config, device)

    steps = {
        "vaebench (as shipped: fused Adam)": vaebench_loop(config),
        "vaebench data path, default Adam": vaebench_loop(unfused),
        "conventional (DataLoader, per-image ToTensor)": conventional_loop(),
    }
    if checkpoint_folder is not None:
        steps["vaebench, checkpoint after every epoch"] = vaebench_loop(config, checkpoint_folder)
    timings = time_interleaved(steps, epochs)
    if checkpoint_folder is not None:
        writes.seconds = writes.seconds[1:]  # the warm-up epoch's write is not timed either
        timings.append(writes)
    return timings


def main(data_root: str | None, epochs: int = 3, subset: int | None = None) -> int:
    root = resolve_root(data_root)
    config = RunConfig.model_validate({**REFERENCE, "data": {"subset": subset}})
    splits = load_splits(config.data, root, torch.device("cpu"))
    count = len(splits.train)
    images, labels = load_arrays(config.data.dataset, root)["train"]
    print(
        f"MLP VAE 784-400-20, BCE, Adam 1e-3, batch 128, {count} training images, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{epochs} timed epochs each after 1 warm-up, interleaved"
    )
    with tempfile.TemporaryDirectory(prefix="vaebench-bench-") as folder:
        conventional = PerImageMNIST(images[:count], labels[:count])
        *loops, writes = run_bench(splits, conventional, epochs, checkpoint_folder=Path(folder))
    for timing in loops:
        per_epoch = ", ".join(f"{s:.2f}" for s in timing.seconds)
        print(f"{timing.name:<48s} median {timing.median:6.2f} s/epoch  ({per_epoch})")
    shipped, conventional_median = loops[0].median, loops[2].median
    for timing in loops[:2]:
        print(f"speed-up of {timing.name}: {conventional_median / timing.median:.2f}x")
    print(
        f"checkpoint write (model, Adam state, random states; atomic, fsync'd): median "
        f"{writes.median * 1000:.1f} ms = {100 * writes.median / shipped:.1f}% of a shipped "
        f"epoch ({', '.join(f'{s * 1000:.1f}' for s in writes.seconds)} ms)"
    )
    return 0
