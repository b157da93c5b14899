"""Clustering and conditional models: scores, the categorical KL, schedules, Gumbel samples,
and a tiny end-to-end clustering grid tracked in MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from vaebench.cli import main
from vaebench.config import LossConfig, ModelConfig, RunConfig
from vaebench.data import load_splits
from vaebench.losses import LossTerms, Objective, capacity
from vaebench.metrics import active_units, cluster_accuracy, clustering_scores
from vaebench.models import build_model
from vaebench.models.gumbel import TemperatureSchedule, categorical_kl_uniform
from vaebench.train import fit

# --- scores on hand-made label sets -------------------------------------------------


def test_permuted_perfect_clustering_scores_one():
    labels = np.repeat(np.arange(10), 7)
    clusters = (labels * 3 + 1) % 10  # a relabelling: same partition
    scores = clustering_scores(labels, clusters)
    assert scores == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "accuracy": 1.0}


def test_hungarian_accuracy_on_a_hand_made_case():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    clusters = np.array([2, 2, 1, 0, 0, 0, 1, 1, 1, 2])
    # best matching: cluster 2->0 (2 right), 0->1 (3 right), 1->2 (3 right) = 8 of 10
    assert cluster_accuracy(labels, clusters) == pytest.approx(0.8)


def test_single_cluster_scores_zero_nmi_and_chance_accuracy():
    labels = np.repeat(np.arange(4), 5)
    scores = clustering_scores(labels, np.zeros_like(labels))
    assert scores["nmi"] == pytest.approx(0.0)
    assert scores["ari"] == pytest.approx(0.0)
    assert scores["accuracy"] == pytest.approx(0.25)


def test_nmi_matches_its_definition_on_a_small_case():
    labels = np.array([0, 0, 1, 1])
    clusters = np.array([0, 1, 1, 1])
    # I(L;C) with arithmetic-mean normalisation, computed by hand from the joint table
    joint = np.array([[1, 1], [0, 2]]) / 4
    pl, pc = joint.sum(1), joint.sum(0)
    mi = sum(joint[i, j] * math.log(joint[i, j] / (pl[i] * pc[j]))
             for i in range(2) for j in range(2) if joint[i, j] > 0)
    entropy = lambda p: -sum(v * math.log(v) for v in p if v > 0)  # noqa: E731
    expected = mi / ((entropy(pl) + entropy(pc)) / 2)
    assert clustering_scores(labels, clusters)["nmi"] == pytest.approx(expected)


def test_active_units_counts_dimensions_with_variance_above_threshold():
    rng = np.random.default_rng(0)
    mu = np.column_stack([rng.normal(0, 1, 500), rng.normal(0, 0.01, 500), rng.normal(3, 0.5, 500)])
    assert active_units(mu) == 2


# --- the categorical KL, the capacity schedule, the temperature -----------------------


def test_categorical_kl_to_uniform_matches_a_direct_computation():
    logits = torch.randn(6, 10)
    q = torch.softmax(logits, dim=1)
    direct = (q * (q / 0.1).log()).sum()
    assert categorical_kl_uniform(logits).item() == pytest.approx(direct.item(), rel=1e-5)
    uniform = torch.distributions.Categorical(probs=torch.full((6, 10), 0.1))
    via_torch = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits),
                                                  uniform).sum()
    assert categorical_kl_uniform(logits).item() == pytest.approx(via_torch.item(), rel=1e-5)
    assert categorical_kl_uniform(torch.zeros(3, 10)).item() == pytest.approx(0.0, abs=1e-6)


def test_capacity_rises_linearly_then_holds():
    assert capacity(5.0, 0, 100) == 0.0
    assert capacity(5.0, 50, 100) == pytest.approx(2.5)
    assert capacity(5.0, 100, 100) == 5.0
    assert capacity(5.0, 1000, 100) == 5.0


def test_capacity_objective_per_image_and_capped_at_log_k():
    config = LossConfig(objective="capacity", gamma=10.0, capacity_z=4.0, capacity_c=9.0,
                        capacity_steps=10)
    objective = Objective(config, categories=10)
    assert objective.maximum["kl_c"] == pytest.approx(math.log(10))
    batch = 4
    terms = LossTerms(recon=torch.tensor(400.0),
                      kl={"kl_z": torch.tensor(4 * 3.0), "kl_c": torch.tensor(4 * 1.0)})
    # half-way: C_z = 2, C_c = ln(10)/2; per image |3 - 2| and |1 - 1.151|, times the batch
    expected = 400.0 + 10 * batch * (abs(3.0 - 2.0) + abs(1.0 - math.log(10) / 2))
    assert objective(terms, batch, step=5).item() == pytest.approx(expected, rel=1e-6)


def test_elbo_objective_weights_each_kl():
    terms = LossTerms(recon=torch.tensor(100.0),
                      kl={"kl_z": torch.tensor(10.0), "kl_c": torch.tensor(2.0)})
    objective = Objective(LossConfig(beta=2.0, beta_c=5.0), categories=10)
    assert objective(terms, 1, 0).item() == pytest.approx(100 + 20 + 10)
    assert terms.negative_elbo.item() == pytest.approx(112.0)


def test_temperature_anneals_exponentially_from_start_to_end():
    schedule = TemperatureSchedule([1.0, 0.5])
    assert schedule.at(0, 101) == pytest.approx(1.0)
    assert schedule.at(50, 101) == pytest.approx(math.sqrt(0.5))
    assert schedule.at(100, 101) == pytest.approx(0.5)
    assert TemperatureSchedule(0.67).at(60, 101) == pytest.approx(0.67)


# --- the Gumbel-softmax joint model ---------------------------------------------------


@pytest.mark.parametrize("backbone", ["mlp", "conv"])
def test_hard_gumbel_samples_are_one_hot_and_gradients_reach_the_category_head(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="gumbel", backbone=backbone, z_dim=3, hidden=[32],
                                    channels=[4, 8], hard=True), (1, 28, 28))
    captured = {}
    first = model.decoder[0]
    hook = first.register_forward_hook(lambda mod, inp, out: captured.update(latent=inp[0]))
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    hook.remove()
    c = captured["latent"][:, 3:]
    assert torch.equal(c.sum(dim=1), torch.ones(5))
    assert set(c.unique().tolist()) == {0.0, 1.0}
    assert out.category_logits.shape == (5, 10)
    F.binary_cross_entropy_with_logits(out.logits, x).backward()
    grad = model.category_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_soft_gumbel_samples_are_on_the_simplex_not_one_hot():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="gumbel", hard=False, hidden=[16], z_dim=2), (1, 28, 28))
    captured = {}
    model.decoder[0].register_forward_hook(lambda mod, inp, out: captured.update(latent=inp[0]))
    model(torch.rand(4, 1, 28, 28))
    c = captured["latent"][:, 2:]
    assert torch.allclose(c.sum(dim=1), torch.ones(4))
    assert ((c > 0) & (c < 1)).all()


def test_gumbel_run_logs_nmi_per_epoch_and_anneals_tau(mnist_root):
    config = RunConfig.model_validate({
        "data": {"subset": 512, "validation": 1000},
        "model": {"arch": "gumbel", "hidden": [64], "z_dim": 4, "tau": [1.0, 0.5]},
        "train": {"epochs": 3, "batch_size": 64, "device": "cpu"},
    })
    splits = load_splits(config.data, mnist_root, torch.device("cpu"))
    result = fit(config, splits, torch.device("cpu"))
    taus = [m.values["tau"] for m in result.history]
    assert taus[0] > taus[1] > taus[2] == pytest.approx(0.5)
    for m in result.history:
        assert 0 <= m.values["val_nmi"] <= 1
        assert m.values["val_kl"] == pytest.approx(m.values["val_kl_z"] + m.values["val_kl_c"])
        assert 0 <= m.values["val_kl_c"] <= math.log(10) + 1e-6
    # the last epoch's val_nmi is not scored again after training; the other validation
    # clustering scores come from that epoch's evaluation
    assert "val_nmi" not in result.summary
    assert {"val_ari", "val_accuracy"} <= set(result.summary)
    assert 0 <= result.summary["test_kl_c"] <= math.log(10) + 1e-6


def test_cvae_decoder_depends_on_the_label():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cvae", hidden=[32], z_dim=2, condition_encoder=True),
                        (1, 28, 28))
    z = torch.zeros(2, 2)
    a = model.decode_label(z, torch.tensor([3, 3]))
    b = model.decode_label(z, torch.tensor([3, 7]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="labels"):
        model(torch.rand(2, 1, 28, 28))


# --- end to end ----------------------------------------------------------------------

CLUSTER_GRID = """
name: clusters
base:
  data: {subset: 600, validation: 1000}
  model: {hidden: [64], z_dim: 4, channels: [8, 16]}
  train: {epochs: 2, batch_size: 64, device: cpu}
include:
  - {model.arch: gumbel, loss.objective: capacity, model.tau: [1.0, 0.5]}
  - {model.arch: gumbel, model.backbone: conv}
  - {model.arch: mlp}
  - {model.arch: cvae}
"""


def test_tiny_clustering_grid_tracks_scores_and_pictures(tmp_path, mnist_root):
    grid = tmp_path / "clusters.yaml"
    grid.write_text(CLUSTER_GRID)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    status = main(["run", str(grid), "--tracking-uri", uri, "--data-root", str(mnist_root),
                   "--results-dir", str(tmp_path / "results")])
    assert status == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["clusters"])
    children = runs[runs["tags.mlflow.parentRunId"].notna()].set_index("tags.mlflow.runName")
    assert len(children) == 4 and set(children["status"]) == {"FINISHED"}
    client = MlflowClient(tracking_uri=uri)
    for name, run in children.iterrows():
        scores = ("test_active_units",) if name.startswith("cvae") else (
            "test_nmi", "test_ari", "test_accuracy", "val_nmi", "test_active_units"
        )
        for score in scores:
            assert np.isfinite(run[f"metrics.{score}"]), (name, score)
        artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
        assert "latent.png" in artifacts, name
    gumbel = [name for name in children.index if name.startswith("gumbel")]
    assert len(gumbel) == 2
    for name in gumbel:
        history = client.get_metric_history(children.loc[name, "run_id"], "val_nmi")
        assert [m.step for m in history[:2]] == [1, 2]  # per epoch, then the final value
        assert np.isfinite(children.loc[name, "metrics.test_kl_c"])
    cvae = children.loc[[n for n in children.index if n.startswith("cvae")][0]]
    assert 0 <= cvae["metrics.conditional_accuracy"] <= 1
    # the cvae's encoder sees the label: its clusters are not scored as unsupervised ones
    assert np.isnan(cvae["metrics.test_nmi"]) and np.isnan(cvae["metrics.val_nmi"])
    assert "digits.png" in {a.path for a in client.list_artifacts(cvae["run_id"])}
    table_columns = Path(tmp_path / "results" / "clusters.csv").read_text().splitlines()[0]
    for column in ("test_nmi", "test_ari", "test_accuracy", "test_active_units",
                   "conditional_accuracy"):
        assert column in table_columns.split(",")


# The README's clustering config after 10 epochs on 50,000 training images, measured on this
# workplace's 2-core CPU with this test's fit() call: test NMI over seeds 0-7 with one torch
# thread 0.373, 0.531, 0.382, 0.446, 0.414, 0.512, 0.513, 0.420, and over seeds 0-4 with two
# threads (as CI runs) 0.270, 0.550, 0.515, 0.381, 0.340: 13 runs, mean 0.434, sample std
# 0.085. A 10-epoch NMI is chaotic in floating-point paths: a thread count or another CPU is
# another sample of that spread (seed 0: 0.373 on one thread, 0.270 on two). So the NMI floor
# sits under the mean minus 3 standard deviations (0.178): it catches a broken clustering
# (scores misaligned with labels, an unused c: NMI near 0), not a weaker seed. The objective
# is checked where it is not chaotic: the capacity term drives KL_c to its target ln 10 =
# 2.303 nats (2.243-2.269 in the 10 runs that printed it); a model ignoring c stays near 0.
GUMBEL_NMI_FLOOR = 0.15
GUMBEL_KL_C_FLOOR = 2.0


@pytest.mark.slow
def test_gumbel_clusters_full_mnist(mnist_root):
    """The README's clustering config on MNIST (50,000 training images) for 10 epochs."""
    config = RunConfig.model_validate({
        "model": {"arch": "gumbel", "backbone": "mlp", "hidden": [512, 256], "z_dim": 10,
                  "categories": 10, "tau": 0.5, "hard": True},
        "loss": {"objective": "capacity", "gamma": 30.0, "capacity_z": 5.0,
                 "capacity_steps": 5000},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 10, "batch_size": 64, "device": "cpu"},
    })
    splits = load_splits(config.data, mnist_root, torch.device("cpu"))
    result = fit(config, splits, torch.device("cpu"))
    summary, validation_nmi = result.summary, result.final.values["val_nmi"]
    print(f"gumbel NMI after 10 epochs: test {summary['test_nmi']:.4f}, "
          f"validation {validation_nmi:.4f}")
    assert summary["test_kl_c"] >= GUMBEL_KL_C_FLOOR
    assert summary["test_nmi"] >= GUMBEL_NMI_FLOOR
    assert validation_nmi >= GUMBEL_NMI_FLOOR
