"""One run's optimizer, epoch, checkpoint state and scores, and the run alone as the epoch loop
drives it (:class:`ModelTrainee`); how an epoch avoids host syncs: docs/performance.md."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vaebench.data import Split, Splits
from vaebench.eager import optimizer_step, optimizers_without_dynamo
from vaebench.models import build_model, place_model
from vaebench.models.losses import Objective, draws_per_image, loss_terms
from vaebench.scoring.clustering import ClusterInput, nmi, scored_clusters
from vaebench.scoring.collapse import KLPerDimension
from vaebench.scoring.evaluation import (
    Evaluation,
    cluster_input,
    evaluate,
    likelihood_metrics,
    read_scalars,
)
from vaebench.spec.config import OptimConfig, RunConfig, TrainConfig, VaebenchError

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop,
}


class TrainingDiverged(RuntimeError):
    """The training loss or a validation or test metric became NaN or infinite; the run is
    marked FAILED with the reason."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VaebenchError("train.device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def build_optimizer(config: OptimConfig, params) -> torch.optim.Optimizer:
    """Adam uses torch's fused kernel unless kwargs choose: the same arithmetic as the default
    loop in one kernel (on CPU it cut an MLP epoch from about 2.2 s to 1.8 s)."""
    optimizers_without_dynamo()
    kwargs = dict(config.kwargs)
    if config.name == "adam" and "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = True
    try:
        return OPTIMIZERS[config.name](params, lr=config.lr, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise VaebenchError(f"optim.kwargs: {exc}") from None


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float  # the training objective per image, averaged over the epoch
    epoch_seconds: float  # training time of the epoch
    eval_seconds: float
    images_per_second: float
    values: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        values = {k: v for k, v in self.__dict__.items() if k not in ("epoch", "values")}
        return {**values, **self.values}


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[EpochMetrics] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)  # new after the last epoch
    seconds: float = 0.0
    # what the clustering scores are computed from, where ``fit`` was asked to leave them
    clusters: list[ClusterInput] = field(default_factory=list)
    kl_per_dimension: KLPerDimension | None = None  # the last validation pass's (else test's)

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]


def timing_summary(history: list[EpochMetrics], images: int) -> dict[str, float]:
    """The first epoch (warm-up: allocations, kernel choices) apart, and the mean over the
    others; ``mean_images_per_second`` is images / ``mean_epoch_seconds``."""
    seconds = [m.epoch_seconds for m in history]
    summary = {"first_epoch_seconds": seconds[0]}
    if len(seconds) > 1:
        mean = sum(seconds[1:]) / (len(seconds) - 1)
        summary.update(mean_epoch_seconds=mean, mean_images_per_second=images / mean)
    return summary


def check_finite(values: dict[str, float], when: str) -> None:
    """A standard error of one image's estimate is NaN by definition, not a failure."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v) and not k.endswith("_se")}
    if bad:
        listed = ", ".join(f"{name} is {value}" for name, value in bad.items())
        raise TrainingDiverged(f"{listed} {when}")


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def train_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
    config: RunConfig, splits: Splits, generator: torch.Generator, first_step: int = 0,
    batch_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The summed objective, on the device; ``batch_loss``: another backend's loss of a batch."""
    images, labels = splits.train.images, splits.train.labels
    n, batch_size = images.shape[0], config.train.batch_size
    total_steps = config.train.epochs * steps_per_epoch(n, batch_size)
    order = torch.randperm(n, generator=generator, device="cpu").to(images.device)
    total = torch.zeros((), device=images.device)
    model.train()
    for step, start in enumerate(range(0, n, batch_size), start=first_step):
        index = order[start : start + batch_size]
        x, y = images.index_select(0, index), labels.index_select(0, index)
        if splits.dynamic_binarize:
            x = torch.bernoulli(x)
        model.anneal(step, total_steps)
        if batch_loss is not None:
            loss = batch_loss(x)
        else:
            terms = loss_terms(model, x, y, config.loss.recon, draws_per_image(config.loss))
            loss = objective(terms, x.shape[0], step)
        optimizer.zero_grad(set_to_none=True)
        (loss / x.shape[0]).backward()
        optimizer_step(optimizer)
        total += loss.detach()
    return total


def training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
    history: list[EpochMetrics], seconds: float,
) -> dict[str, Any]:
    """What continues a run as if it never stopped (docs/resume.md#checkpoints). The tensors are
    the live ones, not copies: write the state out before training goes on."""
    state: dict[str, Any] = {
        "epoch": history[-1].epoch, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "batch_order_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(), "history": [asdict(m) for m in history],
        "seconds": seconds,
    }
    if model.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(model.device)
    return state


def restore_training_state(
    state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[list[EpochMetrics], float]:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    match_parameter_layouts(optimizer)
    generator.set_state(state["batch_order_rng"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and model.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], model.device)
    return [EpochMetrics(**m) for m in state["history"]], float(state["seconds"])


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """``load_state_dict`` keeps the layout a tensor was saved in, and fused Adam steps state
    and parameter as if they shared one: a contiguous ``exp_avg`` beside a channels-last weight
    corrupts the step. A state saved contiguous (by a stack, on another device) is copied."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for name, value in optimizer.state.get(parameter, {}).items():
                alike = isinstance(value, torch.Tensor) and value.shape == parameter.shape
                if alike and value.stride() != parameter.stride():
                    optimizer.state[parameter][name] = torch.empty_like(parameter).copy_(value)


def checkpoint_due(epoch: int, train: TrainConfig) -> bool:
    every = train.checkpoint_every
    return bool(every) and (epoch % every == 0 or epoch == train.epochs)


def not_logged(scores: dict[str, float], last: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in scores.items() if name not in last}


def validation_values(
    evaluation: Evaluation | None, read: dict[str, float], validation: Split | None
) -> dict[str, float]:
    """``val_nmi`` only where the model has a categorical latent: k-means waits for the end."""
    if evaluation is None or validation is None:
        return {}
    values = evaluation.metrics(read)
    if (categories := evaluation.categories) is not None:
        values["val_nmi"] = nmi(validation.labels.cpu().numpy(), categories.cpu().numpy())
    return values


class ModelTrainee:
    """A run alone in its own model (the CPU's fast path), continued from ``resume``."""

    def __init__(
        self, config: RunConfig, splits: Splits, device: torch.device,
        resume: dict[str, Any] | None = None,
    ):
        torch.manual_seed(config.seed)
        self.config, self.splits = config, splits
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.model = place_model(build_model(config.model, splits.image_shape), device)
        self.optimizer = build_optimizer(config.optim, self.model.parameters())
        self.objective = Objective(config.loss, self.model.categories)
        self.batch_loss = None
        if config.train.backend == "pyro":
            from vaebench.training.pyro_backend import pyro_loss

            self.batch_loss = pyro_loss(self.model, config)
        self.configs, self.earlier = [config], 0.0
        self.results = [TrainResult(model=self.model)]
        if resume is not None:
            history, self.earlier = restore_training_state(
                resume, self.model, self.optimizer, self.generator
            )
            self.results[0].history = history
            per_epoch = steps_per_epoch(len(splits.train), config.train.batch_size)
            self.model.anneal(len(history) * per_epoch - 1, config.train.epochs * per_epoch)

    def epoch(self, first_step: int) -> torch.Tensor:
        total = train_epoch(
            self.model, self.optimizer, self.objective, self.config, self.splits,
            self.generator, first_step, self.batch_loss,
        )
        return total.reshape(1)

    def evaluations(self, split: Split, split_name: str) -> list[Evaluation]:
        return [evaluate(self.model, split, split_name, self.config)]

    def training_state(
        self, position: int, history: list[EpochMetrics], seconds: float
    ) -> dict[str, Any]:
        return training_state(self.model, self.optimizer, self.generator, history, seconds)

    def keep(self, positions: Sequence[int]) -> None:
        pass  # a run alone leaves the loop when it stops

    def final_model(self, position: int) -> torch.nn.Module:
        return self.model.eval()


def final_scores(
    model: torch.nn.Module, splits: Splits, config: RunConfig, validation: Evaluation | None,
    test: Evaluation | None = None, clusters: list[ClusterInput] | None = None,
) -> dict[str, float]:
    """The test metrics, clustering scores (not for conditional models, which see the label;
    given ``clusters``, what they are computed from is appended to it) and the test NLL."""
    test = test or evaluate(model, splits.test, "test", config)
    values = test.metrics(read_scalars(test.scalars()))
    pairs = [] if model.uses_labels else [(test, splits.test), (validation, splits.validation)]
    found = [cluster_input(e, split.labels) for e, split in pairs if e is not None]
    if clusters is not None:
        clusters.extend(found)
    else:
        for one in found:
            values.update(scored_clusters(one))
    if config.eval.iwae_samples:
        values.update(likelihood_metrics(model, splits.test, "test", config))
    check_finite(values, "after training")
    return values
