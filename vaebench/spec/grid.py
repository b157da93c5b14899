"""Grid files: read, checked and expanded into runs, each with a readable name and a stable key
(docs/grid-files.md)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vaebench.spec.catalogue import DEFAULT_RANKING, ranking_problem, unlogged_because
from vaebench.spec.config import (
    ConfigError,
    RunConfig,
    check_dotted_key,
    flatten,
    override_problems,
    probe_problems,
    set_dotted,
)
from vaebench.spec.yaml_file import is_int, is_str_keyed, read_spec_header

GRID_KEYS = ("name", "base", "matrix", "exclude", "include", "seeds", "select")
SELECT_TAG = "vaebench.select"  # a grid invocation's parent run's tag: its file's ``select``


@dataclass
class GridSpec:
    name: str
    base: dict[str, Any]
    matrix: dict[str, list[Any]] = field(default_factory=dict)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    include: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    select: str = DEFAULT_RANKING  # the validation metric its report ranks and registers on
    source: str = "<grid>"
    # whether the file names ``select`` (left to the default, runs without it still train,
    # and their report and registration say in a line each why they have nothing to rank)
    select_named: bool = False


MAX_GRID_RUNS = 10_000  # more: split the grid, or search the space with a study


def load_grid(path: str | Path) -> GridSpec:
    header = read_spec_header(path, "grid", GRID_KEYS)
    raw, where, base, problems = header
    matrix = raw.get("matrix") or {}
    if not is_str_keyed(matrix):
        problems.append(f"{where}: matrix: must map dotted keys to lists")
        matrix = {}
    for key, values in matrix.items():
        bad = ("must be a list of values" if not isinstance(values, list)
               else "empty axis (give at least one value)" if not values else check_dotted_key(key))
        if bad:
            problems.append(f"{where}: matrix.{key}: {bad}")
        else:
            probes = {f"[{index}]": value for index, value in enumerate(values)}
            problems += probe_problems(base, key, probes, where, "matrix")

    exclude = _overrides_list(raw.get("exclude"), "exclude", where, base, problems)
    include = _overrides_list(raw.get("include"), "include", where, base, problems)
    problems += [f"{where}: exclude[{index}].{key}: not a matrix axis"
                 for index, rule in enumerate(exclude) for key in rule if key not in matrix]

    # the runs the grid expands to at most, counted without expanding it
    seeds, extra = raw.get("seeds", [0]), raw.get("include")
    axes = [len(v) for v in matrix.values() if isinstance(v, list)]
    count = (math.prod(axes) if axes else 0) + (len(extra) if isinstance(extra, list) else 0)
    count *= len(seeds) if isinstance(seeds, list) and seeds else 1
    if count > MAX_GRID_RUNS:
        problems.append(f"{where}: matrix: {count:,} runs exceed the {MAX_GRID_RUNS:,} a grid may "
                        "have (the product of the axes' lengths, plus includes, times the seeds); "
                        "split the grid, or search a large space with a study "
                        "(python -m vaebench tune)")
    if not isinstance(seeds, list) or not seeds or not all(is_int(s) for s in seeds):
        problems.append(f"{where}: seeds: must be a non-empty list of integers")
    elif len(set(seeds)) != len(seeds):
        problems.append(f"{where}: seeds: repeated seed")
    select = raw.get("select", DEFAULT_RANKING)
    if (why := ranking_problem(select)) is not None:
        problems.append(f"{where}: select: {why}")
    return header.build(GridSpec, matrix=matrix, exclude=exclude, include=include, seeds=seeds,
                        select=select, select_named="select" in raw)



def _overrides_list(
    value: Any, section: str, where: str, base: dict[str, Any], problems: list[str]
) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(is_str_keyed(item) for item in value):
        problems.append(f"{where}: {section}: must be a list of mappings of dotted keys to values")
        return []
    for index, item in enumerate(value):
        if not item:
            problems.append(f"{where}: {section}[{index}]: empty mapping")
        problems += override_problems(base, item, where, f"{section}[{index}].")
    return value


def unselectable_runs(grid: GridSpec, runs: Sequence[RunSpec]) -> list[str]:
    """A line per reason some of ``runs`` would not log the metric the grid file names as its
    ``select`` (its report ranks on it and its registered models are chosen on it: every run
    must have it). Where the file leaves ``select`` to the default, a grid without a
    validation split still trains, as it always did."""
    if not grid.select_named:
        return []
    unlogged: dict[str, list[str]] = {}
    for run in runs:
        config = run.config
        why = unlogged_because(grid.select, config.model.arch, config.data.validation,
                               config.train.epochs)
        if why is not None:
            unlogged.setdefault(why, []).append(run.name)
    return [f"{grid.source}: select: {grid.select} is not logged by {len(names)} of {len(runs)} "
            f"runs ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): {why}; select "
            "what every run logs, or split the grid"
            for why, names in unlogged.items()]


# how a varied setting reads in a run name: by its value alone, or "<prefix><value>" with the
# prefix below, else the key's leaf ("lr0.001")
NAME_PREFIXES = {
    "data.dataset": "", "data.binarize": "bin-", "data.subset": "n", "data.validation": "val",
    "model.arch": "", "model.backbone": "", "model.z_dim": "z", "model.hidden": "h",
    "model.channels": "c", "model.dense": "d", "model.batch_norm": "bn", "model.categories": "k",
    "model.condition_encoder": "condenc", "loss.recon": "", "loss.objective": "", "loss.kl_c": "",
    "loss.beta": "b", "loss.beta_c": "bc", "loss.gamma": "g", "optim.name": "",
    "train.epochs": "e", "train.batch_size": "bs", "train.backend": "", "train.pyro_elbo": "",
    "eval.iwae_samples": "k", "eval.iwae_images": "nll-n",
}
# how a list value joins in a name: [1.0, 0.5] -> tau1to0.5 (an annealed temperature)
LIST_JOINERS = {"model.tau": "to"}


@dataclass(frozen=True)
class RunSpec:
    name: str
    key: str
    config: RunConfig
    overrides: tuple[tuple[str, Any], ...]  # the grid settings that made this run

    @property
    def params(self) -> dict[str, Any]:
        return flatten(self.config.model_dump(mode="json"))


# settings that change how a run is kept, not what it computes: outside the key, so that
# a run checkpointed less often is still the same run
NOT_IN_KEY = {"train": {"checkpoint_every"}}
# settings added after runs were stored, each with the value that computes what runs did before:
# at that value they stay out of the key, so those runs keep their keys (skipped, not retrained)
KEY_SINCE = {"model.dense": [], "loss.kl_c": "per_image", "train.backend": "torch",
             "train.pyro_elbo": "meanfield", "loss.iwae_k": 1}


def run_key(config: RunConfig) -> str:
    tree = config.model_dump(mode="json", exclude=NOT_IN_KEY)
    for key, value in KEY_SINCE.items():
        section, leaf = key.split(".")
        if tree[section][leaf] == value:
            del tree[section][leaf]
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
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
    return f"{prefix}{_plain(value)}".replace("/", "_").replace(" ", "")


# named from the resolved config whenever any run of the grid varies them
ALWAYS_NAMED = ("model.arch",)


def run_name(overrides: dict[str, Any], varied: list[str], seed: int, config: RunConfig) -> str:
    values = {**flatten(config.model_dump(mode="json")), **overrides}
    named = [key for key in varied if key in overrides or key in ALWAYS_NAMED]
    return "-".join([*(_token(key, values[key]) for key in named), f"s{seed}"])


def expand(grid: GridSpec) -> list[RunSpec]:
    """Every run of the grid, in order: the matrix product minus exclusions (none for a grid of
    includes alone), plus includes, times seeds; raises ConfigError on duplicate runs."""
    product = itertools.product(*grid.matrix.values()) if grid.matrix or not grid.include else []
    combos = [dict(zip(grid.matrix, values, strict=True)) for values in product]
    # a rule excludes the combinations that hold all its settings
    combos = [c for c in combos if not any(c.items() >= rule.items() for rule in grid.exclude)]
    varied = [*grid.matrix, *(key for extra in grid.include for key in extra)]
    varied = sorted(dict.fromkeys(varied), key=lambda k: k not in ALWAYS_NAMED)
    runs: list[RunSpec] = []
    for combo, seed in itertools.product(combos + grid.include, grid.seeds):
        tree = copy.deepcopy(grid.base)
        for key, value in {**combo, "seed": seed}.items():
            set_dotted(tree, key, value)
        config = RunConfig.model_validate(tree)
        name = run_name(combo, varied, seed, config)
        runs.append(RunSpec(name, run_key(config), config, tuple(combo.items())))
    first = {run.key: run for run in reversed(runs)}  # the first run of each key
    problems = [f"{grid.source}: duplicate run: {run.name} has the same config and seed as "
                f"{first[run.key].name}" for run in runs if first[run.key] is not run]
    problems += unselectable_runs(grid, runs)
    if problems:
        raise ConfigError(problems)
    # distinct configs that read the same (e.g. an include repeating no axis) get the key appended
    names = Counter(run.name for run in runs)
    return [replace(r, name=f"{r.name}-{r.key[:6]}") if names[r.name] > 1 else r for r in runs]
