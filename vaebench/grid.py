"""Matrix expansion: product of the axes, minus ``exclude``, plus ``include``, times seeds.

Each run gets a readable name built from the settings the grid varies
(``mlp-bce-adam-b4-s0``) and a stable key: a hash of the resolved config and
seed, stored as an MLflow tag so a rerun can recognise finished runs.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from vaebench.config import ConfigError, GridSpec, RunConfig, flatten, set_dotted

# how a varied setting reads in a run name; keys not listed read as "<leaf><value>"
NAME_PREFIXES = {
    "model.arch": "",
    "loss.recon": "",
    "optim.name": "",
    "data.dataset": "",
    "data.binarize": "bin-",
    "loss.beta": "b",
    "model.z_dim": "z",
    "model.hidden": "h",
    "model.channels": "c",
    "optim.lr": "lr",
    "train.epochs": "e",
    "train.batch_size": "bs",
    "data.subset": "n",
    "model.batch_norm": "bn",
    "model.backbone": "",
    "model.tau": "tau",
    "model.categories": "k",
    "model.hard": "hard",
    "model.condition_encoder": "condenc",
    "loss.objective": "",
    "loss.beta_c": "bc",
    "loss.gamma": "g",
    "eval.iwae_samples": "k",
    "eval.iwae_images": "nll-n",
    "data.validation": "val",
}
# how a list value joins in a name: [1.0, 0.5] -> tau1to0.5 (an annealed temperature)
LIST_JOINERS = {"model.tau": "to"}


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: its resolved config, readable name and stable key."""

    name: str
    key: str
    config: RunConfig
    overrides: tuple[tuple[str, Any], ...]  # the grid settings that made this run

    @property
    def params(self) -> dict[str, Any]:
        """Flattened dotted-key settings, as logged to MLflow."""
        return flatten(self.config.model_dump(mode="json"))


def run_key(config: RunConfig) -> str:
    """Hash of the resolved config (seed included); equal configs give equal keys."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """1.0 reads as 1 in a name."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _token(key: str, value: Any) -> str:
    prefix = NAME_PREFIXES.get(key, key.rsplit(".", 1)[-1])
    if isinstance(value, bool):
        return prefix if value else f"no{prefix}"
    if isinstance(value, list):
        value = LIST_JOINERS.get(key, "x").join(str(_plain(v)) for v in value)
    value = _plain(value)
    return f"{prefix}{value}".replace("/", "_").replace(" ", "")


# named from the resolved config whenever any run of the grid varies them
ALWAYS_NAMED = ("model.arch",)


def run_name(overrides: dict[str, Any], varied: list[str], seed: int, config: RunConfig) -> str:
    resolved = flatten(config.model_dump(mode="json"))
    tokens = [
        _token(key, overrides[key] if key in overrides else resolved[key])
        for key in varied
        if key in overrides or key in ALWAYS_NAMED
    ]
    return "-".join([*tokens, f"s{seed}"])


def _combinations(grid: GridSpec) -> list[dict[str, Any]]:
    """Matrix product minus exclusions, plus includes; a grid of includes alone runs just those."""
    if not grid.matrix and grid.include:
        return [dict(extra) for extra in grid.include]
    axes = list(grid.matrix)
    combos = [
        dict(zip(axes, values, strict=True)) for values in itertools.product(*grid.matrix.values())
    ]
    kept = [
        combo
        for combo in combos
        if not any(all(combo.get(k) == v for k, v in rule.items()) for rule in grid.exclude)
    ]
    return kept + [dict(extra) for extra in grid.include]


def expand(grid: GridSpec) -> list[RunSpec]:
    """Every run of the grid, in order; raises ConfigError on duplicate runs."""
    combos = _combinations(grid)
    varied = list(grid.matrix) + [
        k for extra in grid.include for k in extra if k not in grid.matrix
    ]
    varied = sorted(dict.fromkeys(varied), key=lambda k: k not in ALWAYS_NAMED)
    runs: list[RunSpec] = []
    for combo in combos:
        for seed in grid.seeds:
            tree = copy.deepcopy(grid.base)
            for key, value in combo.items():
                set_dotted(tree, key, value)
            tree["seed"] = seed
            config = RunConfig.model_validate(tree)
            runs.append(
                RunSpec(
                    name=run_name(combo, varied, seed, config),
                    key=run_key(config),
                    config=config,
                    overrides=tuple(combo.items()),
                )
            )
    _check_unique(grid, runs)
    return runs


def _check_unique(grid: GridSpec, runs: list[RunSpec]) -> None:
    problems = []
    first_by_key: dict[str, RunSpec] = {}
    for run in runs:
        if run.key in first_by_key:
            problems.append(
                f"{grid.source}: duplicate run: {run.name} has the same config and seed as "
                f"{first_by_key[run.key].name}"
            )
        first_by_key.setdefault(run.key, run)
    if problems:
        raise ConfigError(problems)
    # distinct configs that read the same (e.g. an include repeating no axis) get the key appended
    names: dict[str, int] = {}
    for run in runs:
        names[run.name] = names.get(run.name, 0) + 1
    for index, run in enumerate(runs):
        if names[run.name] > 1:
            runs[index] = RunSpec(f"{run.name}-{run.key[:6]}", run.key, run.config, run.overrides)
