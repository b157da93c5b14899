"""The study file's sampler and pruner, made from Optuna's own; a bad option is one line."""

from __future__ import annotations

import optuna

from vaebench.spec.config import ConfigError, VaebenchError, first_line
from vaebench.spec.study import StudySpec

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}


def make_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(spec.grid_space(), seed=seed)
    if spec.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise VaebenchError(
                f"{spec.source}: sampler: cmaes needs the cmaes package (pip install cmaes)"
            ) from None
    try:
        return SAMPLERS[spec.sampler](seed=seed, **spec.sampler_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"{spec.source}: sampler: {first_line(exc)}"]) from None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    try:
        return PRUNERS[spec.pruner](**spec.pruner_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"{spec.source}: pruner: {first_line(exc)}"]) from None
