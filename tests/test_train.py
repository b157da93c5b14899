"""Models, losses and the trainer on small real data."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch

from vaebench.config import LossConfig, ModelConfig, RunConfig, VaebenchError
from vaebench.data import load_splits
from vaebench.losses import LossTerms, Objective, reconstruction
from vaebench.models import build_model
from vaebench.progress import RunProgress
from vaebench.train import TrainingDiverged, build_optimizer, fit, resolve_device


def tiny_config(seed: int = 0, **sections) -> RunConfig:
    tree = {
        "data": {"subset": 256},
        "model": {"hidden": [32], "z_dim": 3, "channels": [4, 8]},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu"},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return RunConfig.model_validate({**tree, "seed": seed})


@pytest.fixture(scope="module")
def small_splits(mnist_root):
    return load_splits(tiny_config().data, mnist_root, torch.device("cpu"))


@pytest.mark.parametrize("channels", [[8], [8, 16], [8, 16, 32]])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_conv_vae_round_trips_28x28_images(channels, batch_norm):
    model = build_model(ModelConfig(arch="conv", channels=channels, batch_norm=batch_norm, z_dim=5),
                        (1, 28, 28))
    out = model(torch.rand(3, 1, 28, 28))
    assert out.logits.shape == (3, 1, 28, 28)
    assert out.mu.shape == out.logvar.shape == (3, 5)
    assert model.sample_prior(4).shape == (4, 1, 28, 28)


def test_conv_vae_rejects_too_many_layers():
    with pytest.raises(ValueError, match="shrink"):
        build_model(ModelConfig(arch="conv", channels=[4] * 6), (1, 28, 28))


def test_mlp_matches_pytorch_examples_shape():
    model = build_model(ModelConfig(), (1, 28, 28))
    # 784-400-(20+20) encoder, 20-400-784 decoder: pytorch/examples' parameter count
    expected = (784 * 400 + 400) + (400 * 40 + 40) + (20 * 400 + 400) + (400 * 784 + 784)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_bce_and_mse_are_sums_over_pixels_and_batch():
    logits = torch.randn(5, 1, 28, 28)
    x = torch.rand(5, 1, 28, 28)
    probs = torch.sigmoid(logits)
    manual_bce = -(x * probs.log() + (1 - x) * (1 - probs).log()).sum()
    assert reconstruction(logits, x, "bce").item() == pytest.approx(manual_bce.item(), rel=1e-4)
    assert reconstruction(logits, x, "mse").item() == pytest.approx(((probs - x) ** 2).sum().item())


def test_gaussian_kl_matches_closed_form_per_dimension():
    model = build_model(ModelConfig(z_dim=2), (1, 28, 28))
    out = model(torch.rand(4, 1, 28, 28))
    kl = model.kl_terms(out)["kl_z"]
    sigma2 = out.logvar.exp()
    manual = 0.5 * (sigma2 + out.mu**2 - 1 - out.logvar).sum()
    assert kl.item() == pytest.approx(manual.item(), rel=1e-5)
    # the same KL from torch.distributions
    q = torch.distributions.Normal(out.mu, sigma2.sqrt())
    p = torch.distributions.Normal(torch.zeros_like(out.mu), torch.ones_like(out.mu))
    expected = torch.distributions.kl_divergence(q, p).sum().item()
    assert kl.item() == pytest.approx(expected, rel=1e-5)


def test_beta_weights_only_the_kl_in_the_objective():
    terms = LossTerms(recon=torch.tensor(100.0), kl={"kl_z": torch.tensor(10.0)})
    assert Objective(LossConfig(beta=4.0))(terms, batch_size=2, step=0).item() == 140.0
    assert terms.negative_elbo.item() == 110.0


def test_same_config_and_seed_give_identical_metrics(small_splits):
    config = tiny_config()
    first = fit(config, small_splits, torch.device("cpu"))
    second = fit(config, small_splits, torch.device("cpu"))
    keys = ("train_loss", "test_elbo", "test_recon", "test_kl")
    assert [[getattr(m, k) for k in keys] for m in first.history] == [
        [getattr(m, k) for k in keys] for m in second.history
    ]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    other = fit(tiny_config(seed=1), small_splits, torch.device("cpu"))
    assert other.final.test_elbo != first.final.test_elbo


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("recon", ["bce", "mse"])
@pytest.mark.parametrize("optim", ["adam", "rmsprop"])
def test_every_variant_trains_and_improves(small_splits, arch, recon, optim):
    config = tiny_config(model={"arch": arch}, loss={"recon": recon},
                         optim={"name": optim}, train={"epochs": 3})
    epochs = []
    result = fit(config, small_splits, torch.device("cpu"), on_epoch=epochs.append)
    assert [m.epoch for m in epochs] == [1, 2, 3]
    assert result.history[-1].train_loss < result.history[0].train_loss
    final = result.final
    assert final.test_elbo == pytest.approx(-(final.test_recon + final.test_kl))
    assert final.images_per_second > 0 and final.epoch_seconds > 0


def test_test_elbo_is_the_beta_one_bound(small_splits):
    result = fit(tiny_config(loss={"beta": 4.0}), small_splits, torch.device("cpu"))
    m = result.final
    assert m.test_elbo == pytest.approx(-(m.test_recon + m.test_kl))
    # training loss carries beta: with beta = 4 it exceeds recon + KL on similar data
    assert m.train_loss > m.test_recon + m.test_kl


def test_dynamic_binarization_trains_on_fresh_bernoulli_draws(mnist_root):
    config = tiny_config(data={"binarize": "dynamic"})
    splits = load_splits(config.data, mnist_root, torch.device("cpu"))
    assert splits.dynamic_binarize
    result = fit(config, splits, torch.device("cpu"))
    assert math.isfinite(result.final.test_elbo)


def test_diverging_run_raises(small_splits):
    config = tiny_config(optim={"name": "rmsprop", "lr": 1e12})
    with pytest.raises(TrainingDiverged, match="after epoch"):
        fit(config, small_splits, torch.device("cpu"))


def test_optimizer_kwargs_reach_torch_and_bad_ones_are_user_errors():
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = build_optimizer(tiny_config(optim={"kwargs": {"weight_decay": 0.5}}).optim, params)
    assert adam.param_groups[0]["weight_decay"] == 0.5
    with pytest.raises(VaebenchError, match="optim.kwargs"):
        build_optimizer(tiny_config(optim={"kwargs": {"nonsense": 1}}).optim, params)


def test_cuda_without_a_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(VaebenchError, match="cuda"):
        resolve_device("cuda")


def test_progress_prints_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = RunProgress(2, 5, "mlp-b1-s0", epochs=3, stream=stream)
    progress.epoch(1, {"train_loss": 150.123, "test_elbo": -140.5})
    progress.close("FINISHED")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[2/5] mlp-b1-s0 epoch 1/3 loss=150.12 test_elbo=-140.50",
        "[2/5] mlp-b1-s0 FINISHED",
    ]


def test_importing_the_trainer_does_not_import_mlflow_or_optuna():
    import subprocess

    code = (
        "import sys, vaebench.train, vaebench.tracking, vaebench.runner, vaebench.study;"
        "print('mlflow' in sys.modules, 'optuna' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_loss_config_rejects_unknown_reconstruction():
    with pytest.raises(ValueError):
        LossConfig(recon="l1")
