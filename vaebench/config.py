"""Typed run configuration, dotted keys, and the errors users can cause.

A run is described by :class:`RunConfig` (data, model, loss, optim, train,
eval sections plus a seed). Grid files (:mod:`vaebench.grid`) and study files
(:mod:`vaebench.study`) share what is here: YAML reading, the name and ``base``
checks (:func:`read_spec_header`) and the check of dotted-key overrides; every
problem in a file is reported as one line naming the file and the dotted key.
This module imports neither torch nor :mod:`vaebench.models`: the model families
are named in :data:`ARCHS` (a test keeps it equal to ``vaebench.models.MODELS``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class VaebenchError(Exception):
    """An error the user can cause and fix (config, data, paths, URIs).

    The command line prints it as one line and exits with ``exit_status`` (2).
    """

    exit_status = 2


def first_line(exc: BaseException) -> str:
    """An exception as one line for a message: its text's first line, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ConfigError(VaebenchError):
    """One or more problems in a config file, one line each."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(dict.fromkeys(problems))  # keep order, drop repeats
        super().__init__("\n".join(self.problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# the model families of vaebench.models.MODELS, named here so this module need not import torch
ARCHS = ("mlp", "conv", "gumbel", "cvae", "gmvae")


class DataConfig(_Section):
    dataset: Literal["mnist", "fashion_mnist", "kmnist"] = "mnist"
    binarize: Literal["none", "dynamic", "static"] = "none"
    validation: int = Field(
        default=10000,
        ge=0,
        description="the last N training images held out as the validation split (0: none)",
    )
    subset: int | None = Field(
        default=None, ge=1, description="first N training images of what validation leaves"
    )


class ModelConfig(_Section):
    arch: str = "mlp"
    backbone: Literal["mlp", "conv"] = Field(
        default="mlp",
        description="encoder/decoder nets of the gumbel, cvae and gmvae families",
    )
    z_dim: int = Field(default=20, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [400], description="mlp hidden widths")
    channels: list[int] = Field(default_factory=lambda: [32, 64], description="conv channels")
    batch_norm: bool = False
    categories: int = Field(
        default=10, ge=2, description="gumbel, gmvae: size of the discrete latent"
    )
    tau: float | list[float] = Field(
        default=0.67, description="gumbel: temperature, or [start, end] annealed exponentially"
    )
    hard: bool = Field(default=True, description="gumbel: straight-through one-hot samples")
    condition_encoder: bool = Field(
        default=True, description="cvae: the encoder sees the label too (false: decoder only)"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in ARCHS:
            raise ValueError(f"unknown model {value!r}; valid: {', '.join(ARCHS)}")
        return value

    @field_validator("hidden", "channels")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if not value or any(width < 1 for width in value):
            raise ValueError("must be a non-empty list of integers >= 1")
        return value

    @field_validator("tau")
    @classmethod
    def _temperature(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not 1 <= len(values) <= 2 or any(v <= 0 for v in values):
            raise ValueError("must be a temperature > 0 or [start, end] with both > 0")
        if len(values) == 2 and values[1] > values[0]:
            raise ValueError("an annealed temperature goes down: [start, end] with end <= start")
        return value


class LossConfig(_Section):
    recon: Literal["bce", "mse"] = "bce"
    objective: Literal["elbo", "capacity"] = Field(
        default="elbo", description="elbo: recon + beta*KL_z + beta_c*KL_c; capacity: JointVAE"
    )
    beta: float = Field(default=1.0, ge=0, description="weight of KL(q(z|x) || N(0, I))")
    beta_c: float = Field(default=1.0, ge=0, description="weight of KL(q(c|x) || Uniform(K))")
    gamma: float = Field(default=30.0, ge=0, description="capacity: weight of |KL - C(t)|")
    capacity_z: float = Field(default=5.0, ge=0, description="capacity: final C_z, nats")
    capacity_c: float | None = Field(
        default=None, ge=0, description="capacity: final C_c, nats (default and cap: ln K)"
    )
    capacity_steps: int = Field(default=25000, ge=1, description="capacity: steps to reach max")


class OptimConfig(_Section):
    name: Literal["adam", "rmsprop"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for the torch optimizer"
    )


class TrainConfig(_Section):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    eval_batch_size: int = Field(
        default=1000, ge=1, description="decoder rows per evaluation pass (images x draws)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(
        default=1,
        ge=0,
        description="epochs between checkpoints that let a stopped run continue (0: none)",
    )


class EvalConfig(_Section):
    """How the trained model is scored; every run of a split sees the same random draws (for
    equal ``train.eval_batch_size`` and ``samples``)."""

    samples: int = Field(
        default=1, ge=1, description="posterior samples averaged in each ELBO estimate"
    )
    iwae_samples: int = Field(
        default=0,
        ge=0,
        description="test NLL by importance sampling with K samples after training (0: off)",
    )
    iwae_images: int | None = Field(
        default=None,
        ge=1,
        description="the NLL over the first N test images (default: all); for slow models on CPU",
    )


class RunConfig(_Section):
    """Everything that determines one training run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = 0


# ---------------------------------------------------------------------------
# dotted keys


def valid_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key a grid may set, e.g. ``model.z_dim``."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def check_dotted_key(key: str) -> str | None:
    """None if ``key`` names a setting, else the problem described."""
    if key in valid_keys():
        return None
    head = key.split(".")[0]
    sections = [name for name in RunConfig.model_fields if name != "seed"]
    if head in sections:
        options = [k for k in valid_keys() if k.startswith(head + ".")]
        return f"unknown key; valid keys in {head}: {', '.join(options)}"
    return f"unknown key; valid sections: {', '.join(sections)} (and seed)"


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``key='a.b'``, creating sections."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = copy.deepcopy(value)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}``; lists and empty dicts stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cross_section_problems(config: RunConfig) -> list[tuple[str, str]]:
    """Problems of settings that are valid alone but not together."""
    problems = []
    if config.eval.iwae_samples and (config.data.binarize == "none" or config.loss.recon != "bce"):
        problems.append(
            (
                "eval.iwae_samples",
                "a log-likelihood needs binary pixels and a Bernoulli decoder (data.binarize: "
                "dynamic or static, loss.recon: bce): BCE on grey-level pixels or MSE is not "
                "a likelihood",
            )
        )
    return problems


def run_config_problems(tree: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Validate a run config tree; return ``(dotted.key, message)`` for each problem."""
    try:
        return cross_section_problems(RunConfig.model_validate(tree))
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            key = ".".join(str(part) for part in item["loc"])
            message = item["msg"]
            if item["type"] == "extra_forbidden":
                message = check_dotted_key(key) or "unknown key"
            elif item["type"] == "value_error":
                message = message.removeprefix("Value error, ")
            problems.append((key, message))
        return problems


def override_problems(
    base: Mapping[str, Any], overrides: Mapping[str, Any], where: str, label: str
) -> list[str]:
    """Problems that ``overrides`` (dotted keys) cause on top of ``base``.

    Each line names ``label`` plus the key; problems of the base itself are left
    to the base's own check, so nothing is reported twice.
    """
    tree = copy.deepcopy(dict(base))
    lines = []
    for key, value in overrides.items():
        bad_key = check_dotted_key(key)
        if bad_key:
            lines.append(f"{where}: {label}{key}: {bad_key}")
        else:
            set_dotted(tree, key, value)
    for key, message in run_config_problems(tree):
        owner = next((k for k in overrides if key == k or key.startswith(k + ".")), None)
        if owner is not None:
            lines.append(f"{where}: {label}{key}: {message}")
    return lines


# ---------------------------------------------------------------------------
# what grid and study files share


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


class SpecHeader(NamedTuple):
    """The parts grid and study files share, checked: the raw mapping, name and base."""

    raw: dict[str, Any]
    where: str
    name: Any
    base: dict[str, Any]
    problems: list[str]


def read_spec_header(path: str | Path, kind: str, keys: Sequence[str]) -> SpecHeader:
    """Read a grid or study file and check its top-level keys, ``name`` and ``base``."""
    where = str(path)
    raw = read_yaml(path)
    if not is_str_keyed(raw):
        raise ConfigError([f"{where}: a {kind} file is a mapping with keys {', '.join(keys)}"])
    problems = [
        f"{where}: {key}: unknown key; valid: {', '.join(keys)}" for key in raw if key not in keys
    ]
    name = raw.get("name")
    problems += name_problems(name, where)
    base = raw.get("base") or {}
    if not is_str_keyed(base):
        problems.append(f"{where}: base: must be a mapping of sections")
        base = {}
    else:
        problems += [f"{where}: base.{key}: {msg}" for key, msg in run_config_problems(base)]
    return SpecHeader(raw, where, name, base, problems)
