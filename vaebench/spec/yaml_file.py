"""What grid and study files share: reading the YAML, and the checks of ``name`` and ``base``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

from vaebench.spec.config import ConfigError, VaebenchError, run_config_problems


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; syntax errors become one ConfigError line with the line number."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise VaebenchError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: {line}YAML syntax error: {problem}"]) from None


def name_problems(name: Any, where: str) -> list[str]:
    """A grid or study name names an MLflow experiment and a results file: check it."""
    if not isinstance(name, str) or not name.strip():
        return [f"{where}: name: required, a non-empty string"]
    if any(ch in name for ch in "/\\") or name.startswith("."):
        return [f"{where}: name: must not contain path separators or start with '.'"]
    if any(ch in name for ch in "'\"`"):  # MLflow's search filters quote with them
        return [f"{where}: name: must not contain quotes"]
    return []


def is_str_keyed(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Spec = TypeVar("Spec")


class SpecHeader(NamedTuple):
    raw: dict[str, Any]
    where: str
    base: dict[str, Any]
    problems: list[str]

    def build(self, spec: type[Spec], **fields: Any) -> Spec:
        if self.problems:
            raise ConfigError(self.problems)
        return spec(name=self.raw["name"], base=self.base, source=self.where, **fields)


def read_spec_header(path: str | Path, kind: str, keys: Sequence[str]) -> SpecHeader:
    where = str(path)
    raw = read_yaml(path)
    if not is_str_keyed(raw):
        raise ConfigError([f"{where}: a {kind} file is a mapping with keys {', '.join(keys)}"])
    problems = [f"{where}: {key}: unknown key; valid: {', '.join(keys)}"
                for key in raw if key not in keys]
    problems += name_problems(raw.get("name"), where)
    base = raw.get("base") or {}
    if not is_str_keyed(base):
        problems.append(f"{where}: base: must be a mapping of sections")
        base = {}
    else:
        problems += [f"{where}: base.{key}: {msg}" for key, msg in run_config_problems(base)]
    return SpecHeader(raw, where, base, problems)
