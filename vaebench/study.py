"""Study files for ``python -m vaebench tune``: a base run config, a search space, objectives.

A study file is read into :class:`StudySpec`; every problem is reported as one
line naming the file and the dotted key (``study.yaml: space.optim.lr: log
needs low > 0``), exactly like grid files, before anything is created. This
module knows Optuna's vocabulary (sampler, pruner, distribution names) but does
not import optuna: :mod:`vaebench.tune` builds the Optuna objects from a spec.
Objectives are validation metrics (or metrics of no split, such as seconds): a
test metric is rejected, as selecting on it would leak the test split into the
choice (see :mod:`vaebench.catalogue`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaebench.catalogue import CONDITIONAL, METRICS, SELECTABLE, selection_problem
from vaebench.config import (
    ConfigError,
    check_dotted_key,
    override_problems,
)
from vaebench.spec_file import is_str_keyed, read_spec_header

STUDY_KEYS = (
    "name",
    "base",
    "space",
    "objectives",
    "sampler",
    "pruner",
    "n_trials",
    "timeout",
    "seed",
    "storage",
    "artifacts",
)
PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
DIRECTIONS = ("maximize", "minimize")

# options each sampler and pruner accepts in the mapping form ``{name: tpe, n_startup_trials: 5}``;
# the values are checked by Optuna when vaebench.tune builds the object
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

@dataclass(frozen=True)
class Param:
    """One dimension of the search space, as Optuna's ``suggest_*`` takes it."""

    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def optuna_choices(self) -> tuple[Any, ...]:
        """Categorical choices as Optuna stores them: lists and mappings become JSON text."""
        return tuple(encode_choice(choice) for choice in self.choices)

    def decode(self, stored: Any) -> Any:
        """The config value of a stored categorical choice."""
        return dict(zip(self.optuna_choices(), self.choices, strict=True))[stored]

    def grid_values(self) -> list[Any]:
        """Every value this dimension can take (for the grid sampler): finite spaces only."""
        if self.type == "categorical":
            return list(self.optuna_choices())
        step = self.step if self.step is not None else 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + index * step for index in range(count)]
        return [int(v) for v in values] if self.type == "int" else values


def encode_choice(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass
class StudySpec:
    """A study file, checked."""

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


# ---------------------------------------------------------------------------
# loading and checking


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    """A YAML number; also text such as ``1e-4`` (YAML 1.1 reads it as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study file; raise ConfigError listing every problem."""
    raw, where, name, base, problems = read_spec_header(path, "study", STUDY_KEYS)

    space = _space(raw.get("space"), where, base, problems)
    objectives = _objectives(raw.get("objectives"), where, problems)
    sampler, sampler_options = _named(
        raw.get("sampler") or "tpe", "sampler", SAMPLER_OPTIONS, where, problems
    )
    pruner, pruner_options = _named(
        raw.get("pruner") or "none", "pruner", PRUNER_OPTIONS, where, problems
    )

    archs = _archs(base, space)
    for index, objective in enumerate(objectives):
        info = METRICS[objective.metric]
        missing = [arch for arch in archs if not info.reported_by(arch)]
        if missing:
            problems.append(
                f"{where}: objectives[{index}].metric: {objective.metric} is not reported by "
                f"{', '.join(missing)} models, and model.arch can be {', '.join(missing)}"
            )
        label = f"{where}: objectives[{index}].metric: {objective.metric}"
        if info.needs_validation and _can_take(base, space, "data.validation", 0):
            problems.append(f"{label} needs a validation split, and data.validation can be 0")
        if objective.metric in AFTER_WARM_UP and _can_take(base, space, "train.epochs", 1):
            problems.append(
                f"{label} is the mean over the epochs after the first (the warm-up), and "
                "train.epochs can be 1; use first_epoch_seconds or at least 2 epochs"
            )
        mixed = _incomparable(space, archs) if info.loss_units else []
        if mixed:
            problems.append(
                f"{label} is not comparable across {', '.join(mixed)} (another scale, other "
                "images or a bound of log p(x|y)); tune one value of them per study"
            )
        if info.per_cluster_count and "model.categories" in space:
            problems.append(
                f"{label} rises with the number of clusters, and space.model.categories "
                "varies it; tune one number of categories per study"
            )
    listed = raw.get("objectives")
    if len(objectives) > 1 or (isinstance(listed, list) and len(listed) > 1):
        if pruner not in (None, "none"):
            problems.append(
                f"{where}: pruner: {pruner} cannot prune a study with several objectives "
                "(Optuna prunes single-objective studies only); use pruner: none"
            )
        if sampler in SINGLE_OBJECTIVE_SAMPLERS:
            problems.append(f"{where}: sampler: {sampler} handles a single objective only")
    elif len(objectives) == 1 and pruner not in (None, "none"):
        metric = objectives[0].metric
        if not any(METRICS[metric].reported_by(a, per_epoch=True) for a in archs):
            problems.append(
                f"{where}: pruner: {metric} is known only after the last epoch "
                f"for {', '.join(archs)} models, so nothing can be pruned; use pruner: none"
            )
    if sampler == "grid":
        for key, param in space.items():
            if param.type == "float" and param.step is None:
                problems.append(
                    f"{where}: space.{key}: the grid sampler needs finite values: "
                    "give a step, or make it categorical"
                )

    n_trials = raw.get("n_trials", 10)
    if not _is_int(n_trials) or n_trials < 1:
        problems.append(f"{where}: n_trials: must be an integer >= 1")
    timeout = raw.get("timeout")
    if timeout is not None and (_number(timeout) is None or _number(timeout) <= 0):
        problems.append(f"{where}: timeout: must be a number of seconds > 0, or null")
    seed = raw.get("seed", 0)
    if seed is not None and not _is_int(seed):
        problems.append(f"{where}: seed: must be an integer or null")
    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage.strip()):
        problems.append(f"{where}: storage: must be a storage URL or file name, or null")
    artifacts = raw.get("artifacts", False)
    if not isinstance(artifacts, bool):
        problems.append(f"{where}: artifacts: must be true or false")

    if problems:
        raise ConfigError(problems)
    return StudySpec(
        name=name,
        base=base,
        space=space,
        objectives=objectives,
        sampler=sampler,
        sampler_options=sampler_options,
        pruner=pruner,
        pruner_options=pruner_options,
        n_trials=n_trials,
        timeout=_number(timeout) if timeout is not None else None,
        seed=seed,
        storage=storage,
        artifacts=artifacts,
        source=where,
    )


# metrics missing from one-epoch runs: the first epoch is reported apart
AFTER_WARM_UP = ("mean_epoch_seconds", "mean_images_per_second")
# settings across which a loss-unit metric (ELBO, reconstruction) means different things
INCOMPARABLE = ("loss.recon", "data.dataset", "data.binarize", "data.validation")


def _can_take(base: dict[str, Any], space: dict[str, Param], key: str, value: Any) -> bool:
    """Whether a trial can run with ``key`` at ``value`` (the lowest end of a range)."""
    if key in space:
        param = space[key]
        values = param.choices if param.type == "categorical" else (param.low,)
        return any(choice == value for choice in values)
    section, leaf = key.split(".")
    part = base.get(section)
    return isinstance(part, dict) and part.get(leaf) == value


def _incomparable(space: dict[str, Param], archs: list[str]) -> list[str]:
    """The settings a study varies across which an ELBO is not comparable."""
    keys = [key for key in INCOMPARABLE if key in space]
    if any(a in CONDITIONAL for a in archs) and any(a not in CONDITIONAL for a in archs):
        keys.append("model.arch (cvae and unconditional models)")
    return keys


def _archs(base: dict[str, Any], space: dict[str, Param]) -> list[str]:
    """Every model family a trial of the study can train."""
    if "model.arch" in space:
        return [str(choice) for choice in space["model.arch"].choices]
    model = base.get("model")
    arch = model.get("arch", "mlp") if isinstance(model, dict) else "mlp"
    return [str(arch)]


def _space(raw: Any, where: str, base: dict[str, Any], problems: list[str]) -> dict[str, Param]:
    if not raw:
        problems.append(f"{where}: space: empty search space (give at least one dotted key)")
        return {}
    if not is_str_keyed(raw):
        problems.append(f"{where}: space: must map dotted keys to distributions")
        return {}
    space = {}
    for key, value in raw.items():
        label = f"{where}: space.{key}"
        bad_key = check_dotted_key(key)
        if bad_key:
            problems.append(f"{label}: {bad_key}")
            continue
        param = _param(value, label, problems)
        if param is None:
            continue
        # every value a trial can get must make a valid run config on top of base
        bad = False
        for part, value in _probes(param).items():
            for line in override_problems(base, {key: value}, where, "space."):
                problems.append(line.replace(f"space.{key}:", f"space.{key}{part}:", 1))
                bad = True
        if not bad:
            space[key] = param
    return space


def _probes(param: Param) -> dict[str, Any]:
    """Values to try on the base config, keyed by how a problem line names them."""
    if param.type == "categorical":
        return {f".choices[{i}]": choice for i, choice in enumerate(param.choices)}
    probes = {".low": param.low, ".high": param.high}
    if param.type == "float" and param.step is None:  # e.g. a float range on an int setting
        probes[" (a value between low and high)"] = param.low + 0.37 * (param.high - param.low)
    return probes


def _param(raw: Any, label: str, problems: list[str]) -> Param | None:
    if isinstance(raw, list):  # shorthand: a list of values is a categorical dimension
        raw = {"type": "categorical", "choices": raw}
    if not is_str_keyed(raw):
        problems.append(
            f"{label}: must be {{type: float|int|categorical, low, high, log, step, choices}} "
            "or a list of choices"
        )
        return None
    kind = raw.get("type")
    if kind not in PARAM_TYPES:
        problems.append(f"{label}.type: must be one of {', '.join(PARAM_TYPES)} (got {kind!r})")
        return None
    count = len(problems)
    for key in raw:
        if key not in PARAM_KEYS[kind]:
            valid = ", ".join(PARAM_KEYS[kind])
            problems.append(f"{label}.{key}: not used by {kind}; valid: {valid}")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            problems.append(f"{label}.choices: categorical needs a non-empty list of choices")
        elif len({json.dumps(encode_choice(c)) for c in choices}) != len(choices):
            problems.append(f"{label}.choices: repeated choice")
        if len(problems) > count:
            return None
        return Param(type=kind, choices=tuple(choices))

    log = raw.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{label}.log: must be true or false")
    numbers: dict[str, float | int | None] = {}
    for part in ("low", "high", "step"):
        value = raw.get(part)
        if value is None:
            if part != "step":
                problems.append(f"{label}.{part}: required for {kind}")
            numbers[part] = None
        elif kind == "int":
            if not _is_int(value):
                problems.append(f"{label}.{part}: must be an integer")
            numbers[part] = value
        else:
            number = _number(value)
            if number is None:
                problems.append(f"{label}.{part}: must be a number (got {value!r})")
            numbers[part] = number
    if len(problems) > count:
        return None
    low, high, step = numbers["low"], numbers["high"], numbers["step"]
    if low >= high:
        problems.append(f"{label}: low must be below high (low {low}, high {high})")
    if log and low <= 0:
        problems.append(f"{label}: log needs low > 0 (low {low})")
    if step is not None:
        if step <= 0:
            problems.append(f"{label}.step: must be > 0")
        if log:
            problems.append(f"{label}.step: cannot be combined with log (Optuna forbids it)")
    if len(problems) > count:
        return None
    return Param(type=kind, low=low, high=high, log=log, step=step)


def _objectives(raw: Any, where: str, problems: list[str]) -> list[Objective]:
    shape = "a non-empty list of {metric, direction}"
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: objectives: required, {shape}")
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
        bad_metric = selection_problem(metric) if isinstance(metric, str) else None
        if not isinstance(metric, str):
            problems.append(f"{label}.metric: required; valid: {', '.join(SELECTABLE)}")
        elif bad_metric:
            problems.append(f"{label}.metric: {bad_metric}")
        if direction not in DIRECTIONS:
            problems.append(
                f"{label}.direction: must be one of {', '.join(DIRECTIONS)} (got {direction!r})"
            )
        if isinstance(metric, str) and not bad_metric and direction in DIRECTIONS:
            objectives.append(Objective(metric, direction))
    metrics = [item.get("metric") for item in raw if is_str_keyed(item)]
    for metric in dict.fromkeys(m for m in metrics if metrics.count(m) > 1):
        problems.append(f"{where}: objectives: {metric} is listed twice")
    return objectives


def _named(
    raw: Any,
    section: str,
    table: dict[str, tuple[str, ...]],
    where: str,
    problems: list[str],
) -> tuple[str | None, dict[str, Any]]:
    """``tpe`` or ``{name: tpe, n_startup_trials: 5}``: the name and its options."""
    options: dict[str, Any] = {}
    if is_str_keyed(raw):
        options = {k: v for k, v in raw.items() if k != "name"}
        raw = raw.get("name")
    if raw not in table:
        problems.append(f"{where}: {section}: unknown {section} {raw!r}; valid: {', '.join(table)}")
        return None, {}
    for key in options:
        if key not in table[raw]:
            valid = ", ".join(table[raw]) or "none"
            problems.append(f"{where}: {section}.{key}: unknown option of {raw}; valid: {valid}")
    return raw, options
