"""The iwae objective against ground truth (issue 29): on a toy whose log p(x) is known by
quadrature, the k-draw bound (Burda et al. 2015) stays below log p(x) and rises with k; at
the exact posterior it equals log p(x) for every k; a broken copy of the estimator fails."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vaebench.models import losses
from vaebench.models.base import Backbone, GaussianVAE
from vaebench.models.losses import Objective, loss_terms
from vaebench.spec.config import LossConfig, RunConfig, run_config_problems

PIXELS = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)  # one 1x2x2 image


def toy(weight: list[float], mu: float, logvar: float) -> GaussianVAE:
    """z of one dimension; q(z|x) = N(mu, exp(logvar)) whatever x; Bernoulli logits
    ``weight`` * z per pixel."""
    encoder = nn.Flatten()
    decoder = nn.Sequential(nn.Linear(1, 4, bias=False), nn.Unflatten(1, (1, 2, 2)))
    model = GaussianVAE(Backbone(encoder, 4, decoder), z_dim=1).double()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([mu, logvar]))
        decoder[0].weight.copy_(torch.tensor(weight, dtype=torch.float64)[:, None])
    return model


@torch.no_grad()
def log_p_x(model: GaussianVAE) -> float:
    """log of the integral of p(x|z) N(z; 0, 1) dz, by a Riemann sum over [-12, 12]."""
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)[:, None]
    logits = model.decode(z)
    log_px_z = -nn.functional.binary_cross_entropy_with_logits(
        logits, PIXELS.expand_as(logits), reduction="none").flatten(1).sum(1)
    log_prior = -0.5 * (z[:, 0] ** 2 + math.log(2 * math.pi))
    step = float(z[1, 0] - z[0, 0])
    return float(torch.logsumexp(log_px_z + log_prior, 0)) + math.log(step)


def mean_bound(model: GaussianVAE, k: int, copies: int = 20_000) -> tuple[float, float]:
    """The training objective's L_k, averaged over ``copies`` of the image: mean and its
    standard error."""
    torch.manual_seed(k)
    x = PIXELS.expand(copies, 1, 2, 2)
    terms = loss_terms(model, x, None, "bce", samples=k)
    per_image = losses.importance_weighted_bound(terms.log_weights) if k > 1 else None
    total = Objective(LossConfig(objective="iwae", iwae_k=k))(terms, copies, 0)
    if per_image is None:  # one draw: the objective is the ELBO, its analytic KL
        return -float(total) / copies, 0.0
    assert float(total) == pytest.approx(-float(per_image.sum()), rel=1e-12)
    return float(per_image.mean()), float(per_image.std() / math.sqrt(copies))


def assert_bounds_rise_below(model: GaussianVAE) -> None:
    truth = log_p_x(model)
    (l1, _), (l5, se5), (l50, se50) = (mean_bound(model, k) for k in (1, 5, 50))
    assert l1 < l5 - 5 * se5 < l5 < l50 - 5 * se50
    assert l50 < truth - 5 * se50  # still a bound: below log p(x), if closer
    assert truth - l50 < 0.5 * (truth - l1)


def test_the_bound_rises_with_k_and_stays_below_log_p_x():
    # q(z|x) the prior, while the pixels pull z to positive values: a loose ELBO
    assert_bounds_rise_below(toy([3.0, -3.0, 2.0, -2.0], mu=0.0, logvar=0.0))


def test_at_the_exact_posterior_every_bound_is_log_p_x():
    """A decoder that ignores z: p(z|x) is the prior, which q(z|x) is; every log-weight is
    then log p(x) itself, whatever the draws."""
    model = toy([0.0, 0.0, 0.0, 0.0], mu=0.0, logvar=0.0)
    truth = 4 * math.log(0.5)
    assert log_p_x(model) == pytest.approx(truth, abs=1e-9)
    for k in (1, 5, 50):
        assert mean_bound(model, k, copies=100)[0] == pytest.approx(truth, abs=1e-12)


@pytest.mark.parametrize("broken", ["mean of the log-weights", "no log k"])
def test_a_broken_estimator_fails_these_checks(broken, monkeypatch):
    def bound(log_weights: torch.Tensor) -> torch.Tensor:
        if broken == "mean of the log-weights":  # the ELBO's average, not the bound
            return log_weights.mean(-2)
        return torch.logsumexp(log_weights, dim=-2)  # above log p(x) by up to log k

    monkeypatch.setattr(losses, "importance_weighted_bound", bound)
    with pytest.raises(AssertionError):
        assert_bounds_rise_below(toy([3.0, -3.0, 2.0, -2.0], mu=0.0, logvar=0.0))
    if broken == "no log k":
        with pytest.raises(AssertionError):
            test_at_the_exact_posterior_every_bound_is_log_p_x()


def test_iwae_settings_are_checked_in_one_line_each():
    tree = {"model": {"arch": "gumbel"},
            "loss": {"objective": "iwae", "iwae_k": 5, "recon": "mse", "beta": 4.0}}
    problems = run_config_problems(tree)
    assert [key for key, _ in problems] == ["loss.objective", "loss.objective", "loss.beta"]
    assert "iwae trains model.arch mlp or conv" in problems[0][1]
    assert "loss.recon must be bce" in problems[1][1]
    assert "loss.beta must be 1" in problems[2][1]
    assert dict(run_config_problems({"loss": {"iwae_k": 5}})) == {
        "loss.iwae_k": "applies to loss.objective: iwae only"}
    assert run_config_problems({"loss": {"objective": "iwae", "iwae_k": 50}}) == []
    assert RunConfig.model_validate({"loss": {"objective": "iwae"}}).loss.iwae_k == 1
