"""The typed run config (:class:`RunConfig`), dotted keys, and the errors users can cause; no
torch here, so the model families are named in :data:`ARCHS`."""

from __future__ import annotations

import copy
import errno
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class VaebenchError(Exception):
    """An error the user can cause and fix; the command line prints one line, exits 2."""

    exit_status = 2


class DiskFull(VaebenchError):
    """No space left where a file is written: the runs stop as if interrupted (KILLED,
    continued by the rerun), exit 75 (EX_TEMPFAIL: it may work once space is freed)."""

    exit_status = 75

    def __init__(self, path: object):
        super().__init__(f"no space left on the device of {path}; free some space and rerun "
                         "the same command to continue")

    @staticmethod
    def behind(exc: BaseException | None) -> BaseException | None:
        """The full disk that ``exc`` was raised from, if any: an OSError ENOSPC or EDQUOT, or
        SQLite's SQLITE_FULL ("database or disk is full")."""
        while exc is not None:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return exc
            if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                return exc
            exc = exc.__cause__ or exc.__context__
        return None


SQLITE_FULL = 13  # sqlite3's result code for a full disk


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
        10000, ge=0,
        description="the last N training images held out as the validation split (0: none)",
    )
    subset: int | None = Field(
        None, ge=1, description="first N training images of what validation leaves"
    )


class ModelConfig(_Section):
    arch: str = "mlp"
    backbone: Literal["mlp", "conv"] = Field(
        "mlp", description="encoder/decoder nets of the gumbel, cvae and gmvae families"
    )
    z_dim: int = Field(20, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [400], description="mlp hidden widths")
    channels: list[int] = Field(default_factory=lambda: [32, 64], description="conv channels")
    dense: list[int] = Field(
        default_factory=list,
        description="conv: fully connected widths between the conv features and the latent",
    )
    batch_norm: bool = False
    categories: int = Field(10, ge=2, description="gumbel, gmvae: size of the discrete latent")
    tau: float | list[float] = Field(
        0.67, description="gumbel: temperature, or [start, end] annealed exponentially"
    )
    hard: bool = Field(True, description="gumbel: straight-through one-hot samples")
    condition_encoder: bool = Field(
        True, description="cvae: the encoder sees the label too (false: decoder only)"
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

    @field_validator("dense")
    @classmethod
    def _dense_widths(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError("must be a list of integers >= 1 (empty: none)")
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
    objective: Literal["elbo", "capacity", "iwae"] = Field(
        "elbo", description="elbo: recon + beta*KL_z + beta_c*KL_c; capacity: JointVAE; iwae: "
        "the importance-weighted bound of iwae_k draws per image (Burda et al.)"
    )
    iwae_k: int = Field(1, ge=1, description="iwae: draws per image (1: a sampled ELBO)")
    beta: float = Field(1.0, ge=0, description="weight of KL(q(z|x) || N(0, I))")
    beta_c: float = Field(1.0, ge=0, description="weight of KL(q(c|x) || Uniform(K))")
    kl_c: Literal["per_image", "batch_marginal"] = Field(
        "per_image",
        description="elbo objective: the KL of c it weighs: per image (the ELBO's), or of "
        "the batch's mean q(c) (balanced categories; c's information is not charged)",
    )
    gamma: float = Field(30.0, ge=0, description="capacity: weight of |KL - C(t)|")
    capacity_z: float = Field(5.0, ge=0, description="capacity: final C_z, nats")
    capacity_c: float | None = Field(
        None, ge=0,
        description="capacity: C_c's ramp target, nats (default ln K); C_c stops at ln K",
    )
    capacity_steps: int = Field(25000, ge=1, description="capacity: steps to reach max")


class OptimConfig(_Section):
    name: Literal["adam", "rmsprop"] = "adam"
    lr: float = Field(1e-3, gt=0)
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for the torch optimizer"
    )


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(
        1000, ge=1, description="decoder rows per evaluation pass (images x draws)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(
        1, ge=0, description="epochs between checkpoints that let a stopped run continue (0: none)"
    )
    backend: Literal["torch", "pyro"] = Field(
        "torch", description="torch: vaebench's loss; pyro: the model and guide in Pyro, its ELBO"
    )
    pyro_elbo: Literal["meanfield", "trace"] = Field(
        "meanfield",
        description="backend pyro: TraceMeanField_ELBO (analytic KL) or Trace_ELBO (sampled KL)",
    )


class EvalConfig(_Section):
    """How the trained model is scored; every run of a split sees the same random draws (for
    equal ``train.eval_batch_size`` and ``samples``)."""

    samples: int = Field(1, ge=1, description="posterior samples averaged in each ELBO estimate")
    iwae_samples: int = Field(
        0, ge=0,
        description="test NLL by importance sampling with K samples after training (0: off)",
    )
    iwae_images: int | None = Field(
        None, ge=1,
        description="the NLL over N test images (default: all), the same seeded random N for "
        "every run; for slow models on CPU",
    )


# The settings that make a family do its job, chosen on the validation split
# (docs/clustering.md), where a file leaves them unset; ``elbo`` objective only: ``capacity``
# runs, and other families, keep the section defaults. A value the file sets always wins.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gumbel": {"loss.beta": 10.0, "loss.kl_c": "batch_marginal"},
}


class RunConfig(_Section):
    """Everything that determines one training run. Keys a file leaves unset take their
    section's default, or the model family's (:data:`FAMILY_DEFAULTS`) where it has one."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _family_defaults(self) -> RunConfig:
        """Give the keys left unset their family's defaults; runs again on every assignment
        (``validate_assignment``), so a section or family set later is filled the same way, and a
        key filled for one family goes back to its section default for another. Assigning a key
        in a section (``config.model.arch = ...``) does not: build from trees or assign sections."""
        family = FAMILY_DEFAULTS.get(self.model.arch, {}) if self.loss.objective == "elbo" else {}
        for key in sorted({key for defaults in FAMILY_DEFAULTS.values() for key in defaults}):
            section_name, leaf = key.split(".")
            section = getattr(self, section_name)
            field = type(section).model_fields[leaf]
            value = family.get(key, field.get_default(call_default_factory=True))
            if leaf not in section.model_fields_set and getattr(section, leaf) != value:
                filled = section.model_copy(update={leaf: copy.deepcopy(value)})
                filled.__pydantic_fields_set__.discard(leaf)  # still the file's to set
                self.__dict__[section_name] = filled  # a new section: others may share the old
        return self


SECTIONS = {n: f.annotation for n, f in RunConfig.model_fields.items() if n != "seed"}
# every dotted key a grid may set, e.g. ``model.z_dim``; seed is the one outside a section
VALID_KEYS = (*(f"{s}.{leaf}" for s, cls in SECTIONS.items() for leaf in cls.model_fields), "seed")


def check_dotted_key(key: str) -> str | None:
    """None if ``key`` names a setting, else the problem described."""
    head = key.split(".")[0]
    if key in VALID_KEYS:
        return None
    if head in SECTIONS:
        options = [k for k in VALID_KEYS if k.startswith(head + ".")]
        return f"unknown key; valid keys in {head}: {', '.join(options)}"
    return f"unknown key; valid sections: {', '.join(SECTIONS)} (and seed)"


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
        section = isinstance(value, Mapping) and value
        flat |= flatten(value, f"{prefix}{key}.") if section else {f"{prefix}{key}": value}
    return flat


PYRO_ARCHS = ("mlp", "conv")  # the Gaussian families the pyro backend expresses
IWAE_ARCHS = ("mlp", "conv")  # the families whose only latent is a Gaussian z


def cross_section_problems(config: RunConfig) -> list[tuple[str, str]]:
    """Problems of settings valid alone but not together, such as what the pyro backend does not
    do (its model: Gaussian prior and posterior, Bernoulli decoder, beta on the latent site)."""
    train, loss, pyro = config.train, config.loss, config.train.backend == "pyro"
    table = [
        (not pyro and train.pyro_elbo != "meanfield", "train.pyro_elbo",
         "applies to train.backend: pyro only"),
        (pyro and config.model.arch not in PYRO_ARCHS, "train.backend",
         f"pyro trains model.arch {' or '.join(PYRO_ARCHS)}, not {config.model.arch}"),
        (pyro and loss.recon != "bce", "train.backend",
         "pyro's decoder is a Bernoulli likelihood: loss.recon must be bce"),
        (pyro and loss.objective != "elbo", "train.backend",
         f"pyro trains the elbo objective (loss.beta on the latent site), not {loss.objective}"),
        (loss.objective == "iwae" and config.model.arch not in IWAE_ARCHS, "loss.objective",
         f"iwae trains model.arch {' or '.join(IWAE_ARCHS)} (a Gaussian z alone), "
         f"not {config.model.arch}"),
        (loss.objective == "iwae" and loss.recon != "bce", "loss.objective",
         "iwae bounds a Bernoulli likelihood: loss.recon must be bce"),
        (loss.objective != "iwae" and loss.iwae_k != 1, "loss.iwae_k",
         "applies to loss.objective: iwae only"),
        (loss.objective == "iwae" and loss.beta != 1, "loss.beta",
         "iwae weighs no term: its bound is of log p(x); loss.beta must be 1"),
        (config.eval.iwae_samples and (config.data.binarize == "none" or loss.recon != "bce"),
         "eval.iwae_samples",
         "a log-likelihood needs binary pixels and a Bernoulli decoder (data.binarize: dynamic "
         "or static, loss.recon: bce): BCE on grey-level pixels or MSE is not a likelihood"),
    ]
    return [(key, message) for failed, key, message in table if failed]


def run_config_problems(tree: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Validate a run config tree; return ``(dotted.key, message)`` for each problem."""
    try:
        return cross_section_problems(RunConfig.model_validate(tree))
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            key = ".".join(str(part) for part in item["loc"])
            message = item["msg"].removeprefix("Value error, ")  # a validator's ValueError
            if item["type"] == "extra_forbidden":
                message = check_dotted_key(key) or "unknown key"
            problems.append((key, message))
        return problems


def override_problems(
    base: Mapping[str, Any], overrides: Mapping[str, Any], where: str, label: str
) -> list[str]:
    """Problems that ``overrides`` (dotted keys) cause on top of ``base``, each line naming
    ``label`` plus the key; the base's own problems are left to its own check (no repeats)."""
    tree = copy.deepcopy(dict(base))
    lines = []
    for key, value in overrides.items():
        if bad_key := check_dotted_key(key):
            lines.append(f"{where}: {label}{key}: {bad_key}")
        else:
            set_dotted(tree, key, value)
    problems = run_config_problems(tree)
    return lines + [f"{where}: {label}{key}: {message}" for key, message in problems
                    if any(key == k or key.startswith(k + ".") for k in overrides)]


def probe_problems(
    base: Mapping[str, Any], key: str, probes: Mapping[str, Any], where: str, section: str
) -> list[str]:
    """The problems of each value in ``probes`` for ``key`` on top of ``base``, each line naming
    ``section.key`` plus the probe's name (``matrix.model.z_dim[1]``, ``space.optim.lr.low``)."""
    return [line.replace(f"{section}.{key}:", f"{section}.{key}{part}:", 1)
            for part, value in probes.items()
            for line in override_problems(base, {key: value}, where, f"{section}.")]
