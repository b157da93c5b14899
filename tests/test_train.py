"""Models, losses and the trainer on small real data."""

from __future__ import annotations

import copy
import io
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from vaebench.data import Split, load_splits
from vaebench.models import build_model, place_model
from vaebench.models.losses import LossTerms, Objective, reconstruction
from vaebench.scoring import evaluation
from vaebench.scoring.evaluation import Evaluation, evaluate
from vaebench.spec.config import (
    LossConfig,
    ModelConfig,
    RunConfig,
    VaebenchError,
    run_config_problems,
)
from vaebench.training.loop import fit
from vaebench.training.progress import RunProgress
from vaebench.training.trainer import (
    EpochMetrics,
    TrainingDiverged,
    build_optimizer,
    resolve_device,
    timing_summary,
)


def tiny_config(seed: int = 0, **sections) -> RunConfig:
    tree = {
        "data": {"subset": 256, "validation": 500},
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


TIMING = ("epoch_seconds", "eval_seconds", "images_per_second")


def untimed(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if not k.endswith(TIMING)}


def test_same_config_and_seed_give_identical_metrics(small_splits):
    config = tiny_config()
    first = fit(config, small_splits, torch.device("cpu"))
    torch.manual_seed(1234)  # evaluation draws from its own generator, not the global one
    second = fit(config, small_splits, torch.device("cpu"))
    assert [untimed(m.as_dict()) for m in first.history] == [
        untimed(m.as_dict()) for m in second.history
    ]
    assert untimed(first.summary) == untimed(second.summary)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    other = fit(tiny_config(seed=1), small_splits, torch.device("cpu"))
    assert other.summary["test_elbo"] != first.summary["test_elbo"]


def assert_beta_one_bound(values: dict[str, float], prefix: str) -> None:
    elbo, recon, kl = (values[f"{prefix}_{name}"] for name in ("elbo", "recon", "kl"))
    assert elbo == pytest.approx(-(recon + kl))


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
    for m in result.history:  # validation every epoch; the test split only at the end
        assert_beta_one_bound(m.values, "val")
        assert not any(name.startswith("test_") for name in m.values)
    assert_beta_one_bound(result.summary, "test")
    assert result.final.images_per_second > 0 and result.final.epoch_seconds > 0


def test_elbos_are_the_beta_one_bound(small_splits):
    result = fit(tiny_config(loss={"beta": 4.0}), small_splits, torch.device("cpu"))
    assert_beta_one_bound(result.final.values, "val")
    assert_beta_one_bound(result.summary, "test")
    # training loss carries beta: with beta = 4 it exceeds recon + KL on similar data
    assert result.final.train_loss > result.final.values["val_recon"] + result.final.values[
        "val_kl"
    ]


def test_without_validation_split_only_the_test_split_is_scored(mnist_root):
    config = tiny_config(data={"validation": 0}, model={"arch": "gumbel"})
    splits = load_splits(config.data, mnist_root, torch.device("cpu"))
    assert splits.validation is None and len(splits.train) == 256
    result = fit(config, splits, torch.device("cpu"))
    assert not any(name.startswith("val_") for m in result.history for name in m.values)
    assert not any(name.startswith("val_") for name in result.summary)
    assert {"test_elbo", "test_nmi", "test_kl_c"} <= set(result.summary)


def test_dynamic_binarization_trains_on_fresh_bernoulli_draws(mnist_root):
    config = tiny_config(data={"binarize": "dynamic"}, eval={"iwae_samples": 20})
    splits = load_splits(config.data, mnist_root, torch.device("cpu"))
    assert splits.dynamic_binarize
    for split in (splits.validation, splits.test):  # one fixed draw each
        assert set(split.images.unique().tolist()) == {0.0, 1.0}
    result = fit(config, splits, torch.device("cpu"))
    summary = result.summary
    assert math.isfinite(summary["test_elbo"])
    # the K = 20 importance-weighted bound is tighter than the ELBO (up to Monte Carlo error)
    assert summary["test_nll"] <= -summary["test_elbo"] + 3 * summary["test_nll_se"]


def test_a_likelihood_over_one_image_has_no_spread_and_does_not_fail(small_splits, mnist_root):
    config = tiny_config(data={"binarize": "static"}, train={"epochs": 1},
                         eval={"iwae_samples": 10, "iwae_images": 1})
    splits = load_splits(config.data, mnist_root, torch.device("cpu"))
    summary = fit(config, splits, torch.device("cpu")).summary
    assert math.isfinite(summary["test_nll"]) and math.isnan(summary["test_nll_se"])


def test_timing_reports_the_first_epoch_apart():
    history = [EpochMetrics(e, 1.0, s, 0.1, 100 / s) for e, s in enumerate([5.0, 2.0, 4.0], 1)]
    assert timing_summary(history, 100) == {
        "first_epoch_seconds": 5.0, "mean_epoch_seconds": 3.0, "mean_images_per_second": 100 / 3,
    }
    assert timing_summary(history[:1], 100) == {"first_epoch_seconds": 5.0}


def test_a_non_finite_validation_metric_fails_the_run(small_splits, monkeypatch):
    import vaebench.training.trainer as train

    real = train.evaluate

    def broken(*args, **kwargs):
        evaluation = real(*args, **kwargs)
        evaluation.recon = evaluation.recon * float("nan")
        return evaluation

    monkeypatch.setattr(train, "evaluate", broken)
    with pytest.raises(TrainingDiverged, match="val_elbo is nan, val_recon is nan after epoch 1"):
        fit(tiny_config(), small_splits, torch.device("cpu"))


def test_soft_gumbel_is_evaluated_with_one_hot_categories(small_splits):
    model = build_model(ModelConfig(arch="gumbel", hard=False, hidden=[16], z_dim=2), (1, 28, 28))
    seen = []
    model.decoder[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0][:, 2:]))
    evaluate(model, small_splits.validation, "validation", tiny_config(model={"arch": "gumbel"}))
    categories = torch.cat(seen)
    assert set(categories.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(categories.sum(dim=1), torch.ones(len(categories)))


def test_evaluation_draws_are_the_same_for_every_run_of_a_split(small_splits):
    config = tiny_config()
    model = build_model(config.model, small_splits.image_shape)
    first = evaluate(model, small_splits.validation, "validation", config)
    torch.randn(1000)  # the global stream moves; evaluation does not read it
    second = evaluate(model, small_splits.validation, "validation", config)
    assert torch.equal(first.recon, second.recon)
    averaged = evaluate(model, small_splits.validation, "validation",
                        tiny_config(eval={"samples": 8}))
    assert not torch.equal(first.recon, averaged.recon)  # 8 draws per image, another estimate
    assert averaged.recon.item() == pytest.approx(first.recon.item(), rel=0.01)


def evaluated_with_pieces(monkeypatch, model, split, config, rows: int | None) -> Evaluation:
    monkeypatch.setattr(evaluation, "CPU_CONVOLUTION_ROWS", rows)
    return evaluate(model, split, "validation", config)


def same_evaluation(first: Evaluation, second: Evaluation) -> bool:
    """Every tensor of the two, the posteriors' too (a mixture's components), bit for bit."""

    def tensors(evaluated: Evaluation) -> list[torch.Tensor | None]:
        posterior, mixture = evaluated.posterior, evaluated.posterior.mixture
        return [evaluated.recon, evaluated.mi, evaluated.active_units, evaluated.categories,
                posterior.mu, posterior.logvar, posterior.category_logits,
                *(() if mixture is None else (mixture.mu, mixture.logvar)),
                *(evaluated.kl[name] for name in sorted(evaluated.kl))]

    pairs = list(zip(tensors(first), tensors(second), strict=True))
    assert first.kl.keys() == second.kl.keys()
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in pairs)


@pytest.mark.parametrize("arch", ["conv", "gumbel", "gmvae"])
def test_a_cpu_evaluation_of_convolutions_in_pieces_is_the_whole_batchs(
    monkeypatch, small_splits, arch
):
    """Pieces of rows through the network (oneDNN's cache-sized calls on the CPU); the draws
    stay the pass's. In float64 every image's arithmetic is its own: the bits must match."""
    config = tiny_config(model={"arch": arch, "backbone": "conv", "categories": 4},
                         train={"eval_batch_size": 300})
    assert evaluation.rows_per_call(build_model(config.model, (1, 28, 28)),
                                    torch.device("cpu")) == evaluation.CPU_CONVOLUTION_ROWS
    torch.manual_seed(0)
    model = build_model(config.model, small_splits.image_shape).double()
    split = Split(small_splits.validation.images.double(), small_splits.validation.labels)
    whole = evaluated_with_pieces(monkeypatch, model, split, config, None)
    pieces = evaluated_with_pieces(monkeypatch, model, split, config, 100)  # 3 x 100, 2 x 100
    assert same_evaluation(whole, pieces)
    calls = []
    monkeypatch.setattr(model, "posterior", lambda x, y, call=model.posterior: (
        calls.append(len(x)), call(x, y))[1])
    evaluated_with_pieces(monkeypatch, model, split, config, 100)
    assert calls == [100] * 5  # the passes' batches of 300 and 200, in pieces


def test_the_cpus_pieces_of_a_conv_evaluation_give_its_float32_bits(monkeypatch, mnist_root):
    """What vaebench runs: the conv VAE (channels 32, 64) in float32, channels-last, a pass's
    1,000 images handed over 500 at a time, against all 1,000 at once."""
    config = RunConfig.model_validate({"data": {"subset": 256, "validation": 2000},
                                       "model": {"arch": "conv", "channels": [32, 64]}})
    splits = load_splits(config.data, mnist_root, torch.device("cpu"))
    torch.manual_seed(0)
    model = place_model(build_model(config.model, splits.image_shape), torch.device("cpu"))
    whole = evaluated_with_pieces(monkeypatch, model, splits.validation, config, None)
    pieces = evaluated_with_pieces(monkeypatch, model, splits.validation, config, 500)
    assert same_evaluation(whole, pieces)


def test_pieces_of_rows_cover_every_row_once_in_order():
    calls = []

    def call(x, c):
        calls.append((len(x), c))
        return x * 2

    rows = torch.arange(9.0)
    assert torch.equal(evaluation.in_pieces(call, torch.cat, 3, rows, None), rows * 2)
    assert calls == [(3, None), (3, None), (3, None)]
    for whole in (None, 9, 4):  # no pieces asked, one piece, or pieces of unequal sizes
        assert torch.equal(evaluation.in_pieces(call, torch.cat, whole, rows, None), rows * 2)
    assert calls[3:] == [(9, None)] * 3


def test_a_likelihood_needs_binary_pixels_and_bce():
    problems = run_config_problems({"eval": {"iwae_samples": 100}})
    assert [key for key, _ in problems] == ["eval.iwae_samples"]
    assert "grey-level" in problems[0][1]
    binary = {"eval": {"iwae_samples": 100}, "data": {"binarize": "dynamic"}}
    assert run_config_problems(binary) == []


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
    progress.epoch(1, {"train_loss": 150.123, "val_elbo": -140.5})
    progress.close("FINISHED")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[2/5] mlp-b1-s0 epoch 1/3 loss=150.12 val_elbo=-140.50",
        "[2/5] mlp-b1-s0 FINISHED",
    ]


def test_importing_the_trainer_does_not_import_mlflow_or_optuna():
    import subprocess

    code = (
        "import sys, vaebench.training.trainer, vaebench.tracking.tracker,"
        " vaebench.execution.runner, vaebench.spec.study,"
        " vaebench.scoring.evaluation, vaebench.scoring.likelihood, vaebench.spec.catalogue;"
        "print('mlflow' in sys.modules, 'optuna' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_the_metric_catalogue_imports_nothing_heavy():
    import subprocess

    code = (
        "import sys, vaebench.spec.catalogue;"
        "print(*[m in sys.modules for m in ('torch', 'mlflow', 'optuna')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False False"


def test_loss_config_rejects_unknown_reconstruction():
    with pytest.raises(ValueError):
        LossConfig(recon="l1")


def test_bench_layout_times_both_layouts_of_a_conv_run(mnist_root, capsys):
    from vaebench.cli import main as cli

    assert cli(["bench", "--layout", "--epochs", "1", "--subset", "256",
                "--data-root", str(mnist_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    timed = [line for line in lines if line.startswith(("training epoch,", "validation pass,"))]
    assert len(timed) == 4 and all(float(line.split()[-2]) > 0 for line in timed)
    ratios = [line for line in lines if "channels-last / contiguous" in line]
    assert len(ratios) == 2


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_bench_stack_times_stacks_against_runs_alone(arch, mnist_root, capsys):
    from vaebench.bench.stack import main as bench_stack

    assert bench_stack(str(mnist_root), [2], epochs=1, subset=256, arch=arch,
                       launch_sizes=(1, 4)) == 0
    lines = capsys.readouterr().out.splitlines()
    timed = [line for line in lines if line.startswith("K = ") and "one after another" in line]
    assert [line.split(":")[0] for line in timed] == ["K =   1", "K =   2"]
    ways = ["stacked", *(["stacked grouped"] if arch == "conv" else []), "one after another"]
    for line in timed:
        figures = re.findall(r"([a-z ]+) (\d+\.\d+) s", line.split(": ", 1)[1].split("; ")[0])
        assert [name.strip() for name, _ in figures] == ways
        assert all(float(seconds) > 0 for _, seconds in figures)
        assert float(line.rsplit("= ", 1)[1]) > 0
    assert ("floor:" in "\n".join(lines)) == (arch == "mlp")
    counts = [line for line in lines if line.startswith("K = ") and "per model-step" in line]
    per_model_step = [float(re.search(r"per model-step (\d+\.\d+)", line)[1]) for line in counts]
    assert len(per_model_step) == 2 and per_model_step[1] < per_model_step[0]  # K = 4 < K = 1
    assert all("CUDA kernels" not in line for line in counts)  # counted on a GPU only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where torch sees no GPU")
def test_bench_stack_on_cuda_without_a_gpu_is_a_one_line_error(mnist_root, capsys):
    from vaebench.cli import main

    assert main(["bench", "--stack", "1", "--device", "cuda", "--data-root", str(mnist_root)]) == 2
    assert "cuda was asked for but torch sees no CUDA device" in capsys.readouterr().err


def test_building_and_stepping_an_optimizer_do_not_import_torch_dynamo():
    """torch.optim imports torch._dynamo (seconds of every process's start) on an optimizer's
    first add_param_group, zero_grad or state_dict unless vaebench.eager has run, and on every
    ``Optimizer.step``: vaebench steps a run trained alone with ``eager.optimizer_step`` (a
    stack with its own fused kernels, stacking.optim)."""
    code = textwrap.dedent("""
        import sys, torch
        from vaebench.eager import optimizer_step
        from vaebench.spec.config import OptimConfig
        from vaebench.training.trainer import build_optimizer
        for name in ("adam", "rmsprop"):
            layer = torch.nn.Linear(3, 2)
            optimizer = build_optimizer(OptimConfig(name=name), layer.parameters())
            optimizer.zero_grad()
            layer(torch.ones(4, 3)).sum().backward()
            optimizer_step(optimizer)
            optimizer.load_state_dict(optimizer.state_dict())
        print("torch._dynamo" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_the_eager_step_is_torchs_step_to_the_bit(name):
    """Two copies of a model, one stepped by ``Optimizer.step``, the other by
    ``eager.optimizer_step``: the same parameters and optimizer state after every step."""
    from vaebench.eager import optimizer_step
    from vaebench.spec.config import OptimConfig
    from vaebench.training.trainer import build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))]
    models.append(copy.deepcopy(models[0]))
    optimizers = [build_optimizer(OptimConfig(name=name, lr=0.01), m.parameters()) for m in models]
    for batch in torch.randn(6, 16, 5):
        for model, optimizer, stepped in zip(models, optimizers, (True, False), strict=True):
            optimizer.zero_grad(set_to_none=True)
            model(batch).pow(2).mean().backward()
            if stepped:
                optimizer.step()
            else:
                optimizer_step(optimizer)
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(a, b)
        first, second = (o.state_dict()["state"] for o in optimizers)
        for index, state in first.items():
            for key, value in state.items():
                assert torch.equal(value, second[index][key]), (index, key)
        assert torch.is_grad_enabled()  # back on after the step
