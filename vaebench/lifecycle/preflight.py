"""What is checked before anything is tracked: settings that clash, data, models, output paths;
a user's error surfaces before any MLflow run is created, never leaving a half-written run."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from vaebench.data import Splits, ensure_dataset, load_splits
from vaebench.models import build_model
from vaebench.spec.config import VaebenchError, cross_section_problems
from vaebench.spec.grid import RunSpec
from vaebench.training.trainer import build_optimizer, resolve_device

SplitsKey = tuple[str, str]  # (data config as JSON, device)


def splits_key(run: RunSpec) -> SplitsKey:
    return run.config.data.model_dump_json(), str(resolve_device(run.config.train.device))


def check_before_tracking(runs: Sequence[RunSpec], data_root: Path) -> None:
    """The quick checks: settings that clash, and every dataset's files present (downloaded
    where missing). They run before the tracking store is opened, so that such an error
    leaves no store behind; :func:`preflight` then loads the data while the store opens."""
    for run in runs:
        if problems := cross_section_problems(run.config):
            raise VaebenchError("; ".join(f"{run.name}: {key}: {msg}" for key, msg in problems))
    for dataset in sorted({run.config.data.dataset for run in runs}):
        ensure_dataset(dataset, data_root)
    if any(run.config.train.backend == "pyro" for run in runs):
        from vaebench.training.pyro_backend import import_pyro

        import_pyro()  # a missing extra is one line, before anything is tracked


def preflight(
    runs: Sequence[RunSpec], data_root: Path, loaded: Mapping[SplitsKey, Splits] | None = None
) -> dict[SplitsKey, Splits]:
    """Every split the runs need loaded on its device, and each model and optimizer built once."""
    splits: dict[SplitsKey, Splits] = dict(loaded or {})
    checked: set[str] = set()
    check_before_tracking(runs, data_root)
    for run in runs:
        data_key = splits_key(run)
        if data_key not in splits:
            device = resolve_device(run.config.train.device)
            splits[data_key] = load_splits(run.config.data, data_root, device)
        shape_key = run.config.model_dump_json(include={"model", "optim"})
        if shape_key not in checked:
            try:  # on no memory: a model too large to allocate fails its own run, later
                with torch.device("meta"):
                    build_model(run.config.model, splits[data_key].image_shape)
            except ValueError as exc:
                raise VaebenchError(f"{run.name}: model: {exc}") from None
            build_optimizer(run.config.optim, [torch.nn.Parameter(torch.zeros(1))])
            checked.add(shape_key)
    return splits


def check_output_folder(folder: Path, option: str = "--results-dir") -> None:
    """Fail before training, creating nothing, if results could not be written to ``folder``."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f" (in {folder})"
        raise VaebenchError(f"{option} {folder}: {existing} is a file, not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VaebenchError(f"{option} {folder}: {existing} is not writable")
