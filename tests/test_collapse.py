"""Posterior-collapse diagnostics (docs/metrics.md#posterior-collapse): active units, the KL per
latent dimension and the mutual-information estimate against ground truth, and a model forced
to collapse against one trained normally."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaebench.data import Split, load_splits
from vaebench.models import MODELS, build_gaussian, build_model
from vaebench.models.base import GaussianVAE, Mixture, Posterior
from vaebench.scoring.collapse import active_units, kl_per_dimension, mutual_information
from vaebench.scoring.evaluation import MI_IMAGES, evaluate
from vaebench.spec.config import RunConfig
from vaebench.training.loop import fit

F64 = torch.float64


def draws(mu: torch.Tensor, logvar: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One draw z_i ~ N(mu_i, exp(logvar_i)) per row."""
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed), dtype=mu.dtype)
    return mu + noise * (0.5 * logvar).exp()


# --- active units --------------------------------------------------------------------------


def test_active_units_counts_dimensions_with_variance_above_threshold():
    rng = np.random.default_rng(0)
    mu = np.column_stack([rng.normal(0, 1, 500), rng.normal(0, 0.01, 500), rng.normal(3, 0.5, 500)])
    assert int(active_units(torch.from_numpy(mu))) == 2
    # a stack's members each counted: the second member has one dimension of variance 0
    stacked = torch.from_numpy(np.stack([mu, mu * [1, 1, 0]]))
    assert active_units(stacked).tolist() == [2, 1]


# --- the mutual information against ground truth ---------------------------------------


def test_a_posterior_that_ignores_x_carries_no_information():
    """q(z|x) the same Gaussian for every x: log q(z) = log q(z|x), so the estimate is 0 up to
    the closed-form entropy's Monte Carlo partner, sd sqrt(D / 2 / M) (here 0.032)."""
    images, dims = 1000, 2
    mu = torch.tensor([0.7, -1.2], dtype=F64).expand(images, dims)
    logvar = torch.tensor([-1.0, 0.5], dtype=F64).expand(images, dims)
    estimate = float(mutual_information(draws(mu, logvar), Posterior(mu, logvar)))
    assert abs(estimate) < 4 * math.sqrt(dims / 2 / images)


def test_a_near_deterministic_encoder_of_distinct_points_reaches_log_n():
    """Each image's posterior a narrow Gaussian around its own point: each draw is explained by
    its image alone, log q(z_i) = log q(z_i|x_i) - log N, and the estimate is its bound log N
    (up to the same Monte Carlo noise, here sd 0.087)."""
    images, dims = 200, 3
    mu = torch.randn(images, dims, generator=torch.Generator().manual_seed(1), dtype=F64)
    logvar = torch.full_like(mu, -20.0)
    estimate = float(mutual_information(draws(mu, logvar), Posterior(mu, logvar)))
    assert estimate == pytest.approx(math.log(images), abs=4 * math.sqrt(dims / 2 / images))


def test_the_estimate_approaches_a_gaussian_channels_information():
    """x ~ N(0, s2 I), q(z|x) = N(x, I): I(x; z) = D/2 log(1 + s2). With 2,000 images the
    estimate is within 0.1 nats (the bias of the mini-batch's aggregate, and 2 sd of noise)."""
    images, dims, signal = 2000, 2, 3.0
    x = math.sqrt(signal) * torch.randn(images, dims, generator=torch.Generator().manual_seed(2),
                                        dtype=F64)
    logvar = torch.zeros_like(x)
    estimate = float(mutual_information(draws(x, logvar, seed=3), Posterior(x, logvar)))
    assert estimate == pytest.approx(dims / 2 * math.log(1 + signal), abs=0.1)


def mixture_posterior(mu: torch.Tensor, logvar: torch.Tensor, logits: torch.Tensor) -> Posterior:
    """A gmvae's posterior of (M, K, D) components under (M, K) logits; its moments unused."""
    prior = torch.zeros(mu.shape[-2:], dtype=mu.dtype)
    return Posterior(mu[:, 0], logvar[:, 0], logits, Mixture(mu, logvar, prior, prior))


def test_a_mixture_posteriors_information_has_the_same_ground_truths():
    """A gmvae's q(z|x) is a mixture, its entropy estimated from the draw: the same for every x
    gives 0 exactly (both terms are the same numbers), narrow components around distinct
    points log N."""
    images, components = 150, 3
    generator = torch.Generator().manual_seed(4)
    centres = torch.randn(components, 2, generator=generator, dtype=F64)
    logits = torch.tensor([0.2, -0.5, 1.0], dtype=F64)
    same = mixture_posterior(centres.expand(images, -1, -1), torch.full((images, components, 2),
                             -1.0, dtype=F64), logits.expand(images, -1))
    chosen = torch.multinomial(logits.softmax(-1), images, replacement=True, generator=generator)
    z = draws(centres[chosen], torch.full((images, 2), -1.0, dtype=F64))
    assert float(mutual_information(z, same)) == pytest.approx(0.0, abs=1e-9)
    points = torch.randn(images, components, 2, generator=generator, dtype=F64)
    narrow = mixture_posterior(points, torch.full_like(points, -20.0), logits.expand(images, -1))
    z = draws(points[torch.arange(images), chosen], torch.full((images, 2), -20.0, dtype=F64))
    assert float(mutual_information(z, narrow)) == pytest.approx(math.log(images), abs=1e-3)


# --- the KL per dimension: the parts of each family's KL of z --------------------------------

FAMILIES = {
    "mlp": {"arch": "mlp"}, "conv": {"arch": "conv", "channels": [4, 8]},
    "cvae": {"arch": "cvae", "condition_encoder": True},
    "gumbel": {"arch": "gumbel", "categories": 4}, "gmvae": {"arch": "gmvae", "categories": 4},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_kl_per_dimension_sums_to_the_familys_kl_of_z(family):
    """Standard-normal priors in closed form per dimension; the gmvae's mixture prior as
    E_q(c|x) KL(q(z_d|x, c) || p(z_d|c)), whose sum over d is its kl_z exactly."""
    torch.manual_seed(0)
    config = RunConfig.model_validate({
        "model": {"hidden": [16], "z_dim": 3, **FAMILIES[family]},
        "train": {"eval_batch_size": 70, "device": "cpu"},  # passes of 70, 70 and 60 images
    })
    model = build_model(config.model, (1, 28, 28))
    generator = torch.Generator().manual_seed(5)
    split = Split(torch.rand(200, 1, 28, 28, generator=generator),
                  torch.randint(10, (200,), generator=generator))
    evaluation = evaluate(model, split, "validation", config)
    metrics = evaluation.metrics({k: float(v) for k, v in evaluation.scalars().items()})
    per_dimension = evaluation.kl_per_dimension()
    assert per_dimension.split == "validation" and len(per_dimension.nats) == 3
    assert min(per_dimension.nats) >= 0
    kl_z = metrics.get("val_kl_z", metrics["val_kl"])  # kl_z where the KL has parts
    assert sum(per_dimension.nats) == pytest.approx(kl_z, rel=1e-5)
    with torch.no_grad():  # the same parts of one batch, from the model's own posterior
        posterior = model.eval().posterior(split.images[:5], split.labels[:5])
        (total,) = model.kl_terms(posterior)["kl_z"].reshape(1)
        assert float(kl_per_dimension(posterior).sum()) == pytest.approx(float(total), rel=1e-5)
    assert math.isfinite(metrics["val_mi"]) and metrics["val_active_units"] in range(4)


# --- a model forced to collapse, against one trained normally ------------------------------


class BlindDecoderVAE(GaussianVAE):
    """An MLP VAE whose decoder never sees z (it decodes zeros): nothing rewards the encoder
    for information, and the KL drives every q(z|x) to the prior."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.zeros_like(z))


def blind_builder(config, image_shape) -> GaussianVAE:
    model = build_gaussian(config, image_shape)
    model.__class__ = BlindDecoderVAE
    return model


COLLAPSE_CONFIG = {
    "data": {"subset": 2000, "validation": 1000},
    "model": {"arch": "mlp", "hidden": [128], "z_dim": 8},
    "optim": {"lr": 3e-3},
    "train": {"epochs": 3, "batch_size": 64, "device": "cpu"},
}


@pytest.fixture(scope="module")
def collapse_splits(mnist_root):
    return load_splits(RunConfig.model_validate(COLLAPSE_CONFIG).data, mnist_root,
                       torch.device("cpu"))


@pytest.mark.parametrize("blind", [True, False], ids=["decoder-ignores-z", "normal"])
def test_a_collapsed_model_has_no_active_units_and_no_information(
    blind, collapse_splits, monkeypatch
):
    """Three short epochs on 2,000 MNIST images: the blind model's posteriors are the prior
    (no active unit, KL ~ 0 in every dimension, MI 0 within the estimate's noise, sd
    sqrt(8 / 2 / 128) = 0.18), the same model decoding z is using all 8 dimensions."""
    if blind:
        monkeypatch.setitem(MODELS, "mlp", blind_builder)
    config = RunConfig.model_validate(COLLAPSE_CONFIG)
    result = fit(config, collapse_splits, torch.device("cpu"), score_clusters=False)
    assert isinstance(result.model, BlindDecoderVAE) is blind
    last = [epoch.values for epoch in result.history]
    assert [sorted({"val_mi", "val_active_units"} & v.keys()) for v in last] == [
        ["val_active_units", "val_mi"]] * 3  # every epoch
    final, nats = last[-1], result.kl_per_dimension.nats
    assert result.kl_per_dimension.split == "validation" and len(nats) == 8
    assert sum(nats) == pytest.approx(final["val_kl"], rel=1e-4)
    assert result.summary["test_active_units"] == int(active_units(
        evaluate(result.model, collapse_splits.test, "test", config).mu))
    if blind:
        assert final["val_active_units"] == 0 and result.summary["test_active_units"] == 0
        assert max(nats) < 0.01 and final["val_kl"] < 0.01
        assert abs(final["val_mi"]) < 3 * math.sqrt(8 / 2 / MI_IMAGES)
    else:
        # margins wide of one machine's values (8 active units, every dimension > 0.2 nats,
        # MI > 2): the test is that training z gives information, not how much
        assert final["val_active_units"] >= 4
        assert sorted(nats)[-4] > 0.1
        assert final["val_mi"] > 1.0  # of at most log 128 = 4.85
