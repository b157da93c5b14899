"""Benchmark: a conv run's training epoch and validation pass with contiguous against
channels-last weights (:func:`vaebench.models.place_model`'s CPU choice), interleaved."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaebench.bench.timing import CONV, time_interleaved
from vaebench.data import Splits, load_splits, resolve_root
from vaebench.models import build_model
from vaebench.models.losses import Objective
from vaebench.scoring.evaluation import evaluate
from vaebench.spec.config import RunConfig
from vaebench.training.trainer import build_optimizer, train_epoch

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}


def layout_loops(
    config: RunConfig, splits: Splits, name: str, layout: torch.memory_format
) -> dict[str, Callable[[], object]]:
    """A training epoch and a validation pass of one fresh model whose weights have ``layout``."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, splits.image_shape).to(memory_format=layout)
    optimizer = build_optimizer(config.optim, model.parameters())
    generator = torch.Generator().manual_seed(config.seed)

    def epoch() -> float:  # train_epoch puts the model in training mode, evaluate out of it
        return train_epoch(model, optimizer, Objective(config.loss), config, splits, generator)

    def validation() -> object:
        return evaluate(model, splits.validation, "validation", config)

    return {f"training epoch, {name}": epoch, f"validation pass, {name}": validation}


def main(data_root: str | None, epochs: int = 5, subset: int | None = None) -> int:
    config = RunConfig.model_validate({**CONV, "data": {"subset": subset}})
    splits = load_splits(config.data, resolve_root(data_root), torch.device("cpu"))
    loops: dict[str, Callable[[], object]] = {}
    for name, layout in LAYOUTS.items():
        loops |= layout_loops(config, splits, name, layout)
    print(
        f"conv VAE (channels 32, 64, z 20), BCE, Adam 1e-3, batch 128, {len(splits.train)} "
        f"training and {len(splits.validation)} validation images, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; {epochs} timed rounds "
        "after 1 warm-up, interleaved; seconds (median)"
    )
    medians = {t.name: t.median for t in time_interleaved(loops, epochs)}
    for name, seconds in medians.items():
        print(f"{name:<32s} {seconds:.3f} s")
    for part in ("training epoch", "validation pass"):
        ratio = medians[f"{part}, channels-last"] / medians[f"{part}, contiguous"]
        print(f"{part}: channels-last / contiguous = {ratio:.2f}")
    return 0
