"""The pyro backend: its losses against the torch backend's formulas on real MNIST batches
(float64, the same draw of z), its step against a torch step, its errors, and a tiny grid
of both backends tracked in MLflow."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from commands import Command, all_runs, children, grid_args
from pyro import poutine

from vaebench.data import load_splits
from vaebench.models import build_model
from vaebench.models.base import gaussian_kl
from vaebench.models.losses import reconstruction
from vaebench.spec.config import RunConfig, run_config_problems
from vaebench.training.pyro_backend import model_and_guide, pyro_loss
from vaebench.training.trainer import build_optimizer

BATCH = 64


def config(arch: str = "mlp", elbo: str = "meanfield", beta: float = 1.0) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"subset": 512, "validation": 500, "binarize": "none"},
        "model": {"arch": arch, "hidden": [32], "z_dim": 5, "channels": [4, 8]},
        "loss": {"beta": beta},
        "train": {"backend": "pyro", "pyro_elbo": elbo, "device": "cpu", "batch_size": BATCH},
    })


@pytest.fixture(scope="module")
def batch(mnist_root) -> torch.Tensor:
    splits = load_splits(config().data, mnist_root, torch.device("cpu"))
    return splits.train.images[:BATCH].double()


def double_model(run: RunConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(run.model, (1, 28, 28)).double()


def guide_draw(model: torch.nn.Module, x: torch.Tensor, beta: float) -> torch.Tensor:
    """The z the guide draws (what Pyro's ELBO draws first, after the same seed)."""
    _, guide = model_and_guide(model, beta)
    return poutine.trace(guide).get_trace(x).nodes["z"]["value"]


def torch_negative_elbo(model, x, z, beta: float) -> torch.Tensor:
    """vaebench's objective (BCE reconstruction + beta x analytic KL), summed over the batch,
    at the draw ``z``."""
    mu, logvar = model.encode(x)
    return reconstruction(model.decode(z), x, "bce") + beta * gaussian_kl(mu, logvar)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_meanfield_loss_is_the_torch_objective_at_the_same_draw(batch, arch, beta):
    run = config(arch, beta=beta)
    model = double_model(run)
    torch.manual_seed(7)
    theirs = pyro_loss(model, run)(batch)
    torch.manual_seed(7)
    z = guide_draw(model, batch, beta)
    ours = torch_negative_elbo(model, batch, z, beta)
    assert abs(theirs.item() - ours.item()) / BATCH < 1e-4  # per image, in nats
    assert abs(theirs.item() / ours.item() - 1) < 1e-12


def test_trace_loss_averages_to_the_meanfield_loss(batch):
    """Trace_ELBO samples the KL; over many draws its mean is the analytic-KL ELBO's mean,
    within Monte Carlo error (4 standard errors of the paired difference)."""
    model = double_model(config())
    trace, meanfield = pyro_loss(model, config(elbo="trace")), pyro_loss(model, config())
    differences = []
    with torch.no_grad():
        for draw in range(300):
            torch.manual_seed(draw)
            a = trace(batch).item()
            torch.manual_seed(draw)  # the same z: the difference is the KL's sampling noise
            b = meanfield(batch).item()
            differences.append((a - b) / BATCH)
    mean = sum(differences) / len(differences)
    spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
    assert spread > 0  # the two estimators do differ draw by draw
    assert abs(mean) < 4 * spread / math.sqrt(len(differences))


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_a_pyro_step_moves_parameters_as_a_torch_step(batch, optimizer):
    run = config()
    run.optim.name = optimizer
    stepped = []
    for backend in ("pyro", "torch"):
        model = double_model(run)
        optim = build_optimizer(run.optim, model.parameters())
        torch.manual_seed(3)
        if backend == "pyro":
            loss = pyro_loss(model, run)(batch)
        else:
            loss = torch_negative_elbo(model, batch, guide_draw(model, batch, 1.0), 1.0)
        optim.zero_grad()
        (loss / BATCH).backward()
        optim.step()
        stepped.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    start = torch.cat([p.detach().flatten() for p in double_model(run).parameters()])
    assert not torch.equal(stepped[0], start)
    assert torch.allclose(stepped[0], stepped[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"model": {"arch": "gumbel"}}, "pyro trains model.arch mlp or conv"),
        ({"loss": {"recon": "mse"}}, "loss.recon must be bce"),
        ({"loss": {"objective": "capacity"}}, "not capacity"),
    ],
)
def test_what_the_pyro_backend_does_not_do_is_a_problem_of_the_file(settings, fragment):
    tree = {"train": {"backend": "pyro"}, **settings}
    problems = run_config_problems(tree)
    assert [key for key, _ in problems] == ["train.backend"]
    assert fragment in problems[0][1]
    assert run_config_problems({"train": {"pyro_elbo": "trace"}}) == [
        ("train.pyro_elbo", "applies to train.backend: pyro only")
    ]


def test_an_unsupported_combination_exits_2_before_anything_is_tracked(tmp_path, mnist_root):
    (tmp_path / "grid.yaml").write_text(GRID.replace("arch: mlp", "arch: gumbel"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = Command(grid_args(tmp_path, uri, mnist_root), tmp_path)
    assert command.finish() == 2
    assert all("train.backend" in line for line in command.lines), command.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_without_pyro_the_backend_is_one_line(tmp_path, mnist_root):
    (tmp_path / "grid.yaml").write_text(GRID)
    (tmp_path / "pyro.py").write_text("raise ImportError('No module named pyro')\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = Command(grid_args(tmp_path, uri, mnist_root), tmp_path)
    assert command.finish() == 2
    assert command.lines == [
        'vaebench: error: train.backend: pyro needs Pyro (pip install -e ".[pyro]")'
    ]
    assert not (tmp_path / "mlflow.db").exists()


GRID = """
name: backends
base:
  data: {subset: 3000, validation: 1000, binarize: none}
  model: {arch: mlp, hidden: [64], z_dim: 8}
  train: {epochs: 2, batch_size: 128, eval_batch_size: 1000, device: cpu}
include:
  - {train.backend: torch}
  - {train.backend: pyro, train.pyro_elbo: meanfield}
  - {train.backend: pyro, train.pyro_elbo: trace}
seeds: [0]
"""


@pytest.mark.slow
def test_a_grid_of_both_backends_is_tracked_and_reported(tmp_path, mnist_root):
    (tmp_path / "grid.yaml").write_text(GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [arg for arg in grid_args(tmp_path, uri, mnist_root) if arg != "--no-report"]
    command = Command(args, tmp_path)
    assert command.finish() == 0, command.stderr
    runs = {r.info.run_name: r for r in children(all_runs(uri, "backends"))}
    assert set(runs) == {"torch-s0", "pyro-meanfield-s0", "pyro-trace-s0"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["vaebench.backend"] == name.split("-")[0]
        assert math.isfinite(run.data.metrics["test_elbo"])
    # the same modules, data and optimizer: after 2 epochs the bounds are close
    elbos = [run.data.metrics["test_elbo"] for run in runs.values()]
    assert max(elbos) - min(elbos) < 5.0, elbos
    report = (tmp_path / "results" / "backends" / "report.md").read_text()
    assert "pyro-meanfield" in report and "torch" in report
    pyro.clear_param_store()
