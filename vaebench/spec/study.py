"""Study files (docs/tuning.md), in Optuna's vocabulary without optuna. Objectives are validation
metrics, or of no split: selecting on a test metric would leak the test split."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaebench.spec.catalogue import (
    CONDITIONAL,
    METRICS,
    SELECTABLE,
    Unlogged,
    selection_problem,
    unlogged_reason,
)
from vaebench.spec.space import Param, read_space, yaml_number
from vaebench.spec.yaml_file import SpecHeader, is_int, is_str_keyed, read_spec_header

# a study file's one-value keys: their default, whether a value is valid, and what it must be
SCALARS: dict[str, tuple[Any, Callable[[Any], bool], str]] = {
    "n_trials": (10, lambda v: is_int(v) and v >= 1, "must be an integer >= 1"),
    "timeout": (None, lambda v: v is None or (yaml_number(v) or 0) > 0,
                "must be a number of seconds > 0, or null"),
    "seed": (0, lambda v: v is None or is_int(v), "must be an integer or null"),
    "storage": (None, lambda v: v is None or (isinstance(v, str) and bool(v.strip())),
                "must be a storage URL or file name, or null"),
    "artifacts": (False, lambda v: isinstance(v, bool), "must be true or false"),
}
STUDY_KEYS = ("name", "base", "space", "objectives", "sampler", "pruner", *SCALARS)
DIRECTIONS = ("maximize", "minimize")

# options each sampler and pruner accepts in the mapping form ``{name: tpe, n_startup_trials: 5}``;
# the values are checked by Optuna when vaebench.tuning.tune builds the object
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {
    "tpe": ("n_startup_trials", "n_ei_candidates", "multivariate", "group", "constant_liar"),
    "random": (),
    "cmaes": ("n_startup_trials", "sigma0", "restart_strategy", "popsize", "use_separable_cma"),
    "gp": ("n_startup_trials", "deterministic_objective"),
    "nsga2": ("population_size", "mutation_prob", "crossover_prob", "swapping_prob"),
    "grid": (),
}
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)
PRUNER_OPTIONS: dict[str, tuple[str, ...]] = {
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor", "bootstrap_count"),
    "none": (),
}
# what ``sampler`` and ``pruner`` default to, and the options of each name
NAMED = {"sampler": ("tpe", SAMPLER_OPTIONS), "pruner": ("none", PRUNER_OPTIONS)}


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass
class StudySpec:
    name: str
    base: dict[str, Any]
    space: dict[str, Param]
    objectives: list[Objective]
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner: str = "none"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 10
    timeout: float | None = None
    seed: int | None = 0
    storage: str | None = None
    artifacts: bool = False  # also write each complete trial's pictures (state_dict: always)
    source: str = "<study>"

    @property
    def metrics(self) -> list[str]:
        return [objective.metric for objective in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def grid_space(self) -> dict[str, list[Any]]:
        return {key: param.grid_values() for key, param in self.space.items()}


def load_study(path: str | Path) -> StudySpec:
    header = read_spec_header(path, "study", STUDY_KEYS)
    raw, where, base, problems = header
    space = read_space(raw.get("space"), where, base, problems)
    objectives = _objectives(raw.get("objectives"), where, problems)
    named = {**_named(raw, "sampler", where, problems), **_named(raw, "pruner", where, problems)}
    problems += _objective_problems(header, objectives, space, named["sampler"], named["pruner"])
    scalars = {key: raw.get(key, default) for key, (default, _, _) in SCALARS.items()}
    problems += [f"{where}: {key}: {must}" for key, (_, valid, must) in SCALARS.items()
                 if not valid(scalars[key])]
    scalars["timeout"] = yaml_number(scalars["timeout"])
    return header.build(StudySpec, space=space, objectives=objectives, **named, **scalars)


def _objective_problems(
    header: SpecHeader, objectives: list[Objective], space: dict[str, Param],
    sampler: str | None, pruner: str | None,
) -> list[str]:
    """Why the objectives cannot compare this study's trials, or the sampler and pruner use them."""
    raw, where, base, _ = header
    archs = [str(arch) for arch in _values(base, space, "model.arch", "mlp")]
    incomparable = [key for key in INCOMPARABLE if key in space]
    if any(a in CONDITIONAL for a in archs) and any(a not in CONDITIONAL for a in archs):
        incomparable.append("model.arch (cvae and unconditional models)")
    runs = list(itertools.product(
        archs, _values(base, space, "data.validation"), _values(base, space, "train.epochs")
    ))
    problems = []
    for index, objective in enumerate(objectives):
        info = METRICS[objective.metric]
        unlogged: dict[Unlogged, list[str]] = {}  # a reason: the model families it holds for
        for arch, validation, epochs in runs:
            reason = unlogged_reason(objective.metric, arch, validation, epochs)
            if reason is not None and arch not in unlogged.setdefault(reason, []):
                unlogged[reason].append(arch)
        missing = ", ".join(unlogged.get(Unlogged.FAMILY, []))
        mixed = ", ".join(incomparable) if info.loss_units else ""
        checks = [
            (missing, f"is not reported by {missing} models, and model.arch can be {missing}"),
            (Unlogged.NO_VALIDATION in unlogged,
             "needs a validation split, and data.validation can be 0"),
            (Unlogged.ONE_EPOCH in unlogged,
             "is the mean over the epochs after the first (the warm-up), and train.epochs can "
             "be 1; use first_epoch_seconds or at least 2 epochs"),
            (mixed, f"is not comparable across {mixed} (another scale, other images or a bound "
             "of log p(x|y)); tune one value of them per study"),
            (info.per_cluster_count and "model.categories" in space,
             "rises with the number of clusters, and space.model.categories varies it; tune "
             "one number of categories per study"),
        ]
        label = f"{where}: objectives[{index}].metric: {objective.metric}"
        problems += [f"{label} {message}" for failed, message in checks if failed]
    listed = raw.get("objectives")
    several = len(objectives) > 1 or (isinstance(listed, list) and len(listed) > 1)
    prunes = pruner not in (None, "none")
    # with one objective, a pruner needs its metric every epoch
    alone = objectives[0].metric if len(objectives) == 1 and not several else None
    checks = [
        (several and prunes, f"pruner: {pruner} cannot prune a study with several objectives "
         "(Optuna prunes single-objective studies only); use pruner: none"),
        (several and sampler in SINGLE_OBJECTIVE_SAMPLERS,
         f"sampler: {sampler} handles a single objective only"),
        (prunes and alone and not any(METRICS[alone].reported_by(a, per_epoch=True) for a in archs),
         f"pruner: {alone} is known only after the last epoch for {', '.join(archs)} models, "
         "so nothing can be pruned; use pruner: none"),
        *((sampler == "grid" and param.type == "float" and param.step is None,
           f"space.{key}: the grid sampler needs finite values: give a step, or make it "
           "categorical") for key, param in space.items()),
    ]
    return problems + [f"{where}: {message}" for failed, message in checks if failed]


# settings across which a loss-unit metric (ELBO, reconstruction) means different things
INCOMPARABLE = ("loss.recon", "data.dataset", "data.binarize", "data.validation")


def _values(base: dict[str, Any], space: dict[str, Param], key: str, default: Any = None) -> tuple:
    """Of a range: its lowest."""
    if key in space:
        param = space[key]
        return param.choices if param.type == "categorical" else (param.low,)
    section, leaf = key.split(".")
    part = base.get(section)
    return (part.get(leaf, default) if isinstance(part, dict) else default,)


def _objectives(raw: Any, where: str, problems: list[str]) -> list[Objective]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: objectives: required, a non-empty list of {{metric, direction}}")
        return []
    objectives = []
    for index, item in enumerate(raw):
        label = f"{where}: objectives[{index}]"
        if not is_str_keyed(item):
            problems.append(f"{label}: must be a mapping {{metric, direction}}")
            continue
        extra = [key for key in item if key not in ("metric", "direction")]
        problems += [f"{label}.{key}: unknown key; valid: metric, direction" for key in extra]
        metric, direction = item.get("metric"), item.get("direction")
        checks = [
            ("metric", selection_problem(metric) if isinstance(metric, str)
             else f"required; valid: {', '.join(SELECTABLE)}"),
            ("direction", None if direction in DIRECTIONS
             else f"must be one of {', '.join(DIRECTIONS)} (got {direction!r})"),
        ]
        bad = [f"{label}.{part}: {message}" for part, message in checks if message]
        problems += bad
        if not bad:
            objectives.append(Objective(metric, direction))
    metrics = [item.get("metric") for item in raw if is_str_keyed(item)]
    for metric in dict.fromkeys(m for m in metrics if metrics.count(m) > 1):
        problems.append(f"{where}: objectives: {metric} is listed twice")
    return objectives


def _named(study: dict[str, Any], section: str, where: str, problems: list[str]) -> dict[str, Any]:
    default, table = NAMED[section]
    raw = study.get(section) or default
    options: dict[str, Any] = {}
    if is_str_keyed(raw):
        options = {k: v for k, v in raw.items() if k != "name"}
        raw = raw.get("name")
    if raw not in table:
        problems.append(f"{where}: {section}: unknown {section} {raw!r}; valid: {', '.join(table)}")
        raw, options = None, {}
    for key in options:
        if key not in table[raw]:
            valid = ", ".join(table[raw]) or "none"
            problems.append(f"{where}: {section}.{key}: unknown option of {raw}; valid: {valid}")
    return {section: raw, f"{section}_options": options}
