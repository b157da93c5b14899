"""The Gaussian-mixture VAE against ground truth: its KL terms against torch.distributions, its
ELBO and the likelihood estimate against quadrature over a 1-D z, its clusters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Normal, kl_divergence

from vaebench.data import Split
from vaebench.models import build_model
from vaebench.models.losses import expected_reconstruction, loss_terms
from vaebench.scoring.evaluation import evaluate
from vaebench.scoring.likelihood import iwae_log_likelihood
from vaebench.spec.config import RunConfig

F64 = torch.float64
SHAPE = (1, 4, 4)  # 16 binary pixels: p(x|z) is smooth enough for a quadrature grid
GRID = torch.linspace(-15, 15, 12001, dtype=F64)
LOG_STEP = math.log((GRID[1] - GRID[0]).item())


def tiny_model(z_dim: int = 1, categories: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = RunConfig.model_validate({
        "model": {"arch": "gmvae", "hidden": [8], "z_dim": z_dim, "categories": categories},
    })
    model = build_model(config.model, SHAPE).double().eval()
    with torch.no_grad():  # components apart, as after training, and of different widths
        model.component_offset.normal_(0, 1.0)
        model.prior_logvar.uniform_(-1.0, 0.5)
    return model, config


def binary_images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4, dtype=F64), generator=g)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi))


def quadrature(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image, by trapezoid-free Riemann sums on a dense grid of the 1-D z (float64):
    log p(x), the ELBO, its expected reconstruction cost and its KL."""
    with torch.no_grad():
        log_lik = -F.binary_cross_entropy_with_logits(
            model.decode(GRID[:, None]).flatten(1)[None].expand(x.shape[0], -1, -1),
            x.flatten(1)[:, None, :].expand(-1, GRID.shape[0], -1),
            reduction="none",
        ).sum(dim=2)  # (N, G)
        categories = model.categories
        log_prior = log_normal(GRID[None], model.prior_mu, model.prior_logvar)  # (K, G)
        log_px = torch.logsumexp(
            log_lik[:, None, :] + log_prior[None] - math.log(categories) + LOG_STEP, dim=(1, 2)
        )
        posterior = model.posterior(x)
        mixture = posterior.mixture
        log_qc = F.log_softmax(posterior.category_logits, dim=1)  # (N, K)
        log_qz = log_normal(GRID[None, None], mixture.mu, mixture.logvar)  # (N, K, G)
        density = (log_qz + LOG_STEP).exp()
        weights = log_qc.exp()
        recon = -(weights[:, :, None] * density * log_lik[:, None, :]).sum(dim=(1, 2))
        kl_z = (weights[:, :, None] * density * (log_qz - log_prior[None])).sum(dim=(1, 2))
        kl_c = (weights * (log_qc + math.log(categories))).sum(dim=1)
    return {"log_px": log_px, "elbo": -(recon + kl_z + kl_c), "recon": recon,
            "kl_z": kl_z, "kl_c": kl_c}


def test_kl_terms_equal_torch_distributions():
    model, _ = tiny_model(z_dim=3, categories=4)
    x = binary_images(5)
    with torch.no_grad():
        out = model(x)
        kl = model.kl_terms(out)
        mixture, weights = out.mixture, F.softmax(out.category_logits, dim=1)
        q = Normal(mixture.mu, (0.5 * mixture.logvar).exp())
        p = Normal(mixture.prior_mu[None], (0.5 * mixture.prior_logvar[None]).exp())
        expected_z = (weights * kl_divergence(q, p).sum(dim=2)).sum()
        uniform = Categorical(logits=torch.zeros(5, 4, dtype=F64))
        expected_c = kl_divergence(Categorical(logits=out.category_logits), uniform).sum()
    torch.testing.assert_close(kl["kl_z"], expected_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl["kl_c"], expected_c, rtol=1e-12, atol=1e-12)
    # and the Posterior (what evaluation scores) gives the same KL as the forward pass
    posterior_kl = model.kl_terms(model.posterior(x))
    torch.testing.assert_close(posterior_kl["kl_z"], kl["kl_z"], rtol=1e-12, atol=1e-12)


def test_reconstruction_sums_over_every_component_exactly():
    """The training cost weights each component's decoding by q(c|x): no c is sampled."""
    model, _ = tiny_model(z_dim=2, categories=3)
    x = binary_images(4)
    with torch.no_grad():
        out = model(x)
        weights = F.softmax(out.category_logits, dim=1)
        by_hand = sum(
            weights[i, c] * F.binary_cross_entropy_with_logits(
                out.logits[c * 4 + i], x[i], reduction="sum")
            for i in range(4) for c in range(3)
        )
        cost = expected_reconstruction(out.logits, x, weights, "bce")
    torch.testing.assert_close(cost, by_hand, rtol=1e-12, atol=1e-12)


def test_training_terms_are_an_unbiased_elbo_and_kls_match_quadrature():
    model, _ = tiny_model()
    x = binary_images(6)
    truth = quadrature(model, x)
    with torch.no_grad():
        kl = model.kl_terms(model(x))
        # closed form against a Riemann sum with step 0.0025: agreement to its error, ~1e-6
        torch.testing.assert_close(kl["kl_z"], truth["kl_z"].sum(), rtol=0, atol=1e-5)
        torch.testing.assert_close(kl["kl_c"], truth["kl_c"].sum(), rtol=0, atol=1e-9)
        torch.manual_seed(0)
        draws = torch.stack([loss_terms(model, x, None, "bce").recon for _ in range(4000)])
    error = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - truth["recon"].sum()) < 4 * error
    assert (truth["elbo"] <= truth["log_px"] + 1e-9).all()  # a bound, by quadrature


def test_likelihood_estimate_converges_to_quadrature_log_px():
    """With q(z|x, c) broader than the posterior the weights are light-tailed and L_K reaches
    log p(x) (measured: within 0.022 nats at K = 20000, on both sides); a narrow q leaves
    L_K below it for long, as a lower bound should."""
    model, _ = tiny_model()
    with torch.no_grad():
        model.component_offset[:, 1:] += 1.5  # log-variance of q(z|x, c): sd x 2.1
    x = binary_images(6)
    truth = quadrature(model, x)
    generator = torch.Generator().manual_seed(5)
    estimate = iwae_log_likelihood(model, x, None, 20000, generator)
    torch.testing.assert_close(estimate, truth["log_px"], rtol=0, atol=0.05)
    assert (truth["log_px"] - truth["elbo"] > 4).all()  # far from the ELBO it started at


def test_one_sample_estimates_average_to_the_quadrature_elbo():
    model, _ = tiny_model()
    x = binary_images(6)
    truth = quadrature(model, x)
    generator = torch.Generator().manual_seed(5)
    one = iwae_log_likelihood(model, x.repeat(2000, 1, 1, 1), None, 1, generator)
    single = one.view(2000, 6)  # L_1 draws: their mean is the ELBO
    error = single.std(dim=0) / math.sqrt(2000)
    assert ((single.mean(dim=0) - truth["elbo"]).abs() < 4 * error + 1e-9).all()


def test_scored_clusters_are_the_most_likely_component():
    model, config = tiny_model(z_dim=2, categories=5)
    x = binary_images(50).float()
    model = model.float()
    split = Split(x, torch.arange(50) % 10)
    evaluation = evaluate(model, split, "test", config)
    with torch.no_grad():
        expected = model.posterior(x).category_logits.argmax(dim=1)
    assert torch.equal(evaluation.categories, expected)
    assert set(evaluation.kl) == {"kl_z", "kl_c"}


@pytest.mark.parametrize("backbone", ["mlp", "conv"])
def test_builds_on_both_backbones_and_draws_pictures(backbone):
    config = RunConfig.model_validate({"model": {
        "arch": "gmvae", "backbone": backbone, "hidden": [16], "channels": [4, 8], "z_dim": 2,
        "categories": 3,
    }})
    model = build_model(config.model, (1, 28, 28))
    x = torch.rand(4, 1, 28, 28).bernoulli()
    terms = loss_terms(model, x, None, "bce")
    (terms.recon + sum(terms.kl.values())).backward()
    assert model.prior_mu.grad is not None and model.component_offset.grad is not None
    pictures = model.extra_pictures(torch.Generator().manual_seed(0))
    assert pictures["components.png"][0].shape == (30, 1, 28, 28)
    assert model.reconstruct(x).shape == (4, 1, 28, 28)


TINY_GRID = """
name: gmvae-tiny
base:
  data: {subset: 1000, validation: 500, binarize: dynamic}
  model: {arch: gmvae, hidden: [64], z_dim: 4, categories: 10}
  train: {epochs: 2, batch_size: 100, eval_batch_size: 1000, device: cpu}
  eval: {iwae_samples: 20, iwae_images: 100}
seeds: [0]
"""


def test_a_gmvae_grid_is_tracked_scored_and_pictured(tmp_path, mnist_root):
    from mlflow.tracking import MlflowClient

    from vaebench.cli import main

    (tmp_path / "grid.yaml").write_text(TINY_GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main([
        "run", str(tmp_path / "grid.yaml"), "--tracking-uri", uri, "--data-root",
        str(mnist_root), "--results-dir", str(tmp_path / "results"),
    ]) == 0
    report = (tmp_path / "results" / "gmvae-tiny" / "report.md").read_text()
    assert "test NMI" in report and "clustering.png" in report  # its clustering scores, pictured
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gmvae-tiny")
    run = next(r for r in client.search_runs([experiment.experiment_id])
               if "vaebench.run_key" in r.data.tags)
    metrics = run.data.metrics
    for name in ("val_kl_z", "val_kl_c", "val_nmi", "test_nmi", "test_accuracy", "test_nll"):
        assert math.isfinite(metrics[name]), name
    assert "tau" not in metrics
    history = client.get_metric_history(run.info.run_id, "val_nmi")
    assert sorted(m.step for m in history) == [1, 2]  # every epoch, once
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"components.png", "samples.png", "latent.png", "state_dict.pt",
            "kl_per_dimension.png"} <= files
    # the KL of each dimension of z under the mixture prior: the parts of the last val_kl_z
    history = client.get_metric_history(run.info.run_id, "val_mi")
    assert sorted(m.step for m in history) == [1, 2]
    path = client.download_artifacts(run.info.run_id, "kl_per_dimension.json", str(tmp_path))
    nats = json.loads(Path(path).read_text())["nats"]
    assert sum(nats) == pytest.approx(metrics["val_kl_z"], rel=1e-5)


TINY_STUDY = """
name: gmvae-study
storage: sqlite:///{folder}/optuna.db
base:
  data: {subset: 500, validation: 500}
  model: {arch: gmvae, hidden: [32], z_dim: 2, categories: 10}
  train: {epochs: 1, batch_size: 100, device: cpu}
space:
  loss.kl_c: [per_image, batch_marginal]
objectives:
  - {metric: val_nmi, direction: maximize}
sampler: {name: grid}
n_trials: 2
"""


def test_a_gmvae_study_tunes_the_kl_of_c_and_reports_test_nmi(tmp_path, mnist_root, capsys):
    import optuna

    from vaebench.cli import main

    (tmp_path / "study.yaml").write_text(TINY_STUDY.replace("{folder}", str(tmp_path)))
    assert main([
        "tune", str(tmp_path / "study.yaml"), "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}", "--data-root", str(mnist_root),
        "--results-dir", str(tmp_path / "results"),
    ]) == 0
    study = optuna.load_study(study_name="gmvae-study", storage=f"sqlite:///{tmp_path}/optuna.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["loss.kl_c"] for t in complete) == ["batch_marginal", "per_image"]
    for trial in complete:
        assert 0 <= trial.values[0] <= 1 and 0 <= trial.user_attrs["test_nmi"] <= 1
    lines = capsys.readouterr().out.splitlines()
    best = next(line for line in lines if line.startswith("  trial "))
    assert "val_nmi=" in best and " test_nmi=" in best  # chosen on validation, test beside
