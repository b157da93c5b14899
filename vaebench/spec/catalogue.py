"""Every metric a run logs (docs/metrics.md): its split, its direction, when it is known, which
models report it. Selection (tune, prune, rank) reads validation; test is reported beside it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

TRAIN, VALIDATION, TEST, NO_SPLIT = "train", "validation", "test", "none"
CATEGORICAL = ("gumbel", "gmvae")  # families with a categorical latent
TEMPERED = ("gumbel",)  # families with an annealed temperature
UNCONDITIONAL = ("mlp", "conv", "gumbel", "gmvae")  # families whose clusters are scored
CONDITIONAL = ("cvae",)  # families whose bound is of log p(x|y): the label is given


@dataclass(frozen=True)
class MetricInfo:
    name: str
    split: str
    higher_is_better: bool | None  # None: not something to optimize (counts, temperatures)
    label: str
    epoch_families: tuple[str, ...] | None = ()  # logged every epoch by these (None: every)
    final_families: tuple[str, ...] | None = ()  # logged after the last epoch by these
    digits: int = 2
    loss_units: bool = False  # in the reconstruction loss's units: BCE and MSE differ
    needs_validation: bool = False  # absent with data.validation: 0
    per_cluster_count: bool = False  # a clustering score: K clusters compare only with K

    def reported_by(self, arch: str, per_epoch: bool = False) -> bool:
        tables = [self.epoch_families] if per_epoch else [self.epoch_families, self.final_families]
        return any(t is None or arch in t for t in tables)

    @property
    def counterpart(self) -> str | None:
        """The same quantity on the other of validation and test, if it exists."""
        prefixes = {VALIDATION: ("val_", "test_"), TEST: ("test_", "val_")}.get(self.split)
        other = prefixes and prefixes[1] + self.name.removeprefix(prefixes[0])
        return other if other in METRICS else None


def _split_metrics(prefix: str) -> list[MetricInfo]:
    """A split's ELBO (beta = 1), reconstruction and KL, with the KL parts of joint models, and
    its posterior-collapse diagnostics (every epoch on validation, after the last on test), and
    its clustering scores."""
    val = prefix == "val"
    split, kwargs = (VALIDATION if val else TEST), dict(needs_validation=val)
    every, joint = ((None, ()), (CATEGORICAL, ())) if val else (((), None), ((), CATEGORICAL))
    cluster = dict(kwargs, digits=3, per_cluster_count=True)
    return [
        MetricInfo(f"{prefix}_elbo", split, True, f"{prefix} ELBO", *every, loss_units=True,
                   **kwargs),
        MetricInfo(f"{prefix}_recon", split, False, f"{prefix} reconstruction", *every,
                   loss_units=True, **kwargs),
        MetricInfo(f"{prefix}_kl", split, False, f"{prefix} KL (nats)", *every, **kwargs),
        MetricInfo(f"{prefix}_kl_z", split, False, f"{prefix} KL_z", *joint, **kwargs),
        MetricInfo(f"{prefix}_kl_c", split, False, f"{prefix} KL_c", *joint, **kwargs),
        MetricInfo(f"{prefix}_active_units", split, None, f"{prefix} active units", *every,
                   digits=1, **kwargs),
        MetricInfo(f"{prefix}_mi", split, None, f"{prefix} MI (nats)", *every, **kwargs),
        MetricInfo(f"{prefix}_nmi", split, True, f"{prefix} NMI", CATEGORICAL if val else (),
                   UNCONDITIONAL, **cluster),
        MetricInfo(f"{prefix}_ari", split, True, f"{prefix} ARI", (), UNCONDITIONAL, **cluster),
        MetricInfo(f"{prefix}_accuracy", split, True, f"{prefix} cluster accuracy", (),
                   UNCONDITIONAL, **cluster),
    ]


_ALL = [
    MetricInfo("train_loss", TRAIN, False, "training loss", None),
    *_split_metrics("val"),
    *_split_metrics("test"),
    MetricInfo("test_nll", TEST, False, "test NLL (nats)", (), None),
    MetricInfo("test_nll_se", TEST, None, "test NLL standard error", (), None),
    MetricInfo("conditional_accuracy", NO_SPLIT, True, "conditional accuracy", (),
               CONDITIONAL, digits=3),
    MetricInfo("tau", NO_SPLIT, None, "temperature", TEMPERED),
    MetricInfo("epoch_seconds", NO_SPLIT, False, "seconds per epoch", None, digits=3),
    MetricInfo("eval_seconds", NO_SPLIT, False, "evaluation seconds", None, digits=3),
    MetricInfo("images_per_second", NO_SPLIT, True, "images per second", None, digits=0),
    MetricInfo("first_epoch_seconds", NO_SPLIT, False, "first epoch seconds", (), None,
               digits=3),
    MetricInfo("mean_epoch_seconds", NO_SPLIT, False, "seconds per epoch (after the first)",
               (), None, digits=3),
    MetricInfo("mean_images_per_second", NO_SPLIT, True, "images per second (after the first)",
               (), None, digits=0),
    MetricInfo("seconds", NO_SPLIT, False, "run seconds", (), None, digits=1),
    MetricInfo("parameters", NO_SPLIT, False, "parameters", (), None, digits=0),
]
METRICS: dict[str, MetricInfo] = {m.name: m for m in _ALL}
SELECTABLE = tuple(m.name for m in _ALL
                   if m.split in (VALIDATION, NO_SPLIT) and m.higher_is_better is not None)
# a report's leaderboard columns, in order (selection metrics on validation, test beside them),
# the ones it may rank on, and the default
REPORTED = ("val_elbo", "test_elbo", "test_nll", "test_recon", "test_kl", "val_active_units",
            "val_mi", "val_nmi", "test_nmi", "test_accuracy", "test_ari", "conditional_accuracy",
            "mean_epoch_seconds")
RANKABLE = tuple(name for name in REPORTED if name in SELECTABLE)
DEFAULT_RANKING = "val_elbo"


def selection_problem(name: str, valid: tuple[str, ...] = SELECTABLE) -> str | None:
    """Why ``name`` cannot choose between runs (tune, prune, rank), or None if it can;
    ``valid``: what may choose instead."""
    info = METRICS.get(name)
    if info is None:
        return f"unknown metric {name!r}; valid: {', '.join(valid)}"
    if info.split == TEST:
        instead = info.counterpart or "val_elbo"
        instead = instead if instead in valid else f"one of {', '.join(valid)}"
        return (f"{name} is scored on the test split, which must not choose what it then reports "
                f"(that is selecting on the test set); select on {instead}, and the test score "
                "of what was chosen is reported beside it")
    if info.split == TRAIN or info.higher_is_better is None:
        return f"{name} does not rank runs; valid: {', '.join(SELECTABLE)}"
    return None


def ranking_problem(metric: object) -> str | None:
    """Why ``metric`` cannot rank the variants of a report (``report --metric``, a grid file's
    ``select``), or None if it can."""
    if isinstance(metric, str) and metric in RANKABLE:
        return None
    if isinstance(metric, str) and metric in METRICS and METRICS[metric].split == TEST:
        return selection_problem(metric, RANKABLE)  # why not, and what to rank on instead
    return f"{metric!r}: choose one of {', '.join(RANKABLE)}"


# metrics missing from one-epoch runs: the first epoch is reported apart
AFTER_WARM_UP = ("mean_epoch_seconds", "mean_images_per_second")


class Unlogged(enum.Enum):
    """Why a run does not log a metric: one reason, phrased by each file that checks for it."""

    FAMILY = "its model family does not report it"
    NO_VALIDATION = "it needs a validation split"
    ONE_EPOCH = "it is the mean over the epochs after the first"


def unlogged_reason(name: str, arch: str, validation: int, epochs: int) -> Unlogged | None:
    """Why a run of model family ``arch``, with a validation split of ``validation`` images,
    trained ``epochs`` epochs, does not log metric ``name``; None if it does."""
    info = METRICS[name]
    if not info.reported_by(arch):
        return Unlogged.FAMILY
    if info.needs_validation and validation == 0:
        return Unlogged.NO_VALIDATION
    if name in AFTER_WARM_UP and epochs == 1:
        return Unlogged.ONE_EPOCH
    return None


def unlogged_because(name: str, arch: str, validation: int, epochs: int) -> str | None:
    """:func:`unlogged_reason` in a grid file's words, for the one run it is about."""
    phrases = {
        Unlogged.FAMILY: f"{arch} models do not report it",
        Unlogged.NO_VALIDATION: "data.validation is 0 (no validation split)",
        Unlogged.ONE_EPOCH: "it is the mean over the epochs after the first, and train.epochs "
                            "is 1",
    }
    reason = unlogged_reason(name, arch, validation, epochs)
    return None if reason is None else phrases[reason]
