"""A study's search space: dimensions (:class:`Param`) ``{type, low, high, log, step, choices}``
or a list of choices; every value a trial can get must make a valid run config on the base."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from vaebench.spec.config import check_dotted_key, probe_problems
from vaebench.spec.yaml_file import is_int, is_str_keyed

RANGE_KEYS = ("type", "low", "high", "log", "step")
PARAM_KEYS = {"float": RANGE_KEYS, "int": RANGE_KEYS, "categorical": ("type", "choices")}


@dataclass(frozen=True)
class Param:
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
    return value if value is None or isinstance(value, (int, float, str)) else json.dumps(value)


def yaml_number(value: Any) -> float | None:
    """A YAML number; also text such as ``1e-4`` (YAML 1.1 reads it as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def read_space(raw: Any, where: str, base: dict[str, Any], problems: list[str]) -> dict[str, Param]:
    if not raw:
        problems.append(f"{where}: space: empty search space (give at least one dotted key)")
        return {}
    if not is_str_keyed(raw):
        problems.append(f"{where}: space: must map dotted keys to distributions")
        return {}
    space = {}
    for key, value in raw.items():
        label = f"{where}: space.{key}"
        if bad_key := check_dotted_key(key):
            problems.append(f"{label}: {bad_key}")
        elif (param := _param(value, label, problems)) is not None:
            bad = probe_problems(base, key, _probes(param), where, "space")
            problems += bad
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
        problems.append(f"{label}: must be {{type: float|int|categorical, low, high, log, step, "
                        "choices} or a list of choices")
        return None
    kind = raw.get("type")
    if kind not in PARAM_KEYS:
        problems.append(f"{label}.type: must be one of {', '.join(PARAM_KEYS)} (got {kind!r})")
        return None
    count = len(problems)
    valid = PARAM_KEYS[kind]
    for key in raw:
        if key not in valid:
            problems.append(f"{label}.{key}: not used by {kind}; valid: {', '.join(valid)}")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            problems.append(f"{label}.choices: categorical needs a non-empty list of choices")
        elif len({json.dumps(encode_choice(c)) for c in choices}) != len(choices):
            problems.append(f"{label}.choices: repeated choice")
        return None if len(problems) > count else Param(type=kind, choices=tuple(choices))

    log = raw.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{label}.log: must be true or false")
    numbers: list[Any] = []
    for part in ("low", "high", "step"):
        value = raw.get(part)
        numbers.append(value if kind == "int" or value is None else yaml_number(value))
        if value is None and part != "step":
            problems.append(f"{label}.{part}: required for {kind}")
        elif value is not None and kind == "int" and not is_int(value):
            problems.append(f"{label}.{part}: must be an integer")
        elif value is not None and numbers[-1] is None:
            problems.append(f"{label}.{part}: must be a number (got {value!r})")
    if len(problems) > count:
        return None
    low, high, step = numbers
    checks = [
        (low >= high, f"{label}: low must be below high (low {low}, high {high})"),
        (log and low <= 0, f"{label}: log needs low > 0 (low {low})"),
        (step is not None and step <= 0, f"{label}.step: must be > 0"),
        (step is not None and log,
         f"{label}.step: cannot be combined with log (Optuna forbids it)"),
    ]
    bad = [message for failed, message in checks if failed]
    problems += bad
    return None if bad else Param(type=kind, low=low, high=high, log=log, step=step)
