"""Clustering and conditional models: scores, the categorical KL, schedules, Gumbel samples,
and a tiny end-to-end clustering grid tracked in MLflow."""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from vaebench.cli import main
from vaebench.data import load_splits
from vaebench.models import build_model
from vaebench.models.gumbel import TemperatureSchedule, categorical_kl_uniform
from vaebench.models.losses import LossTerms, Objective, batch_marginal_kl, capacity
from vaebench.scoring.clustering import cluster_accuracy, clustering_scores
from vaebench.spec.config import FAMILY_DEFAULTS, LossConfig, ModelConfig, RunConfig, flatten
from vaebench.spec.grid import GridSpec, expand
from vaebench.training.loop import fit

DEFAULTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "clustering.md"

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
    config = LossConfig(objective="capacity", gamma=10.0, capacity_z=4.0, capacity_c=4.0,
                        capacity_steps=10)
    objective = Objective(config, categories=10)
    batch = 4
    terms = LossTerms(recon=torch.tensor(400.0),
                      kl={"kl_z": torch.tensor(4 * 3.0), "kl_c": torch.tensor(4 * 1.0)})
    # at step 5 of 10: C_z = C_c = 2 (below ln 10); per image |3 - 2| and |1 - 2|, times the batch
    expected = 400.0 + 10 * batch * (abs(3.0 - 2.0) + abs(1.0 - 2.0))
    assert objective(terms, batch, step=5).item() == pytest.approx(expected, rel=1e-6)
    # at step 8 the ramp is at 3.2 nats: C_z follows it, C_c is held at ln 10 = 2.303
    expected = 400.0 + 10 * batch * (abs(3.0 - 3.2) + abs(1.0 - math.log(10)))
    assert objective(terms, batch, step=8).item() == pytest.approx(expected, rel=1e-6)


def test_jointvae_mnist_capacity_reaches_log_k_where_its_code_does():
    """JointVAE's MNIST setting: C_c ramps towards 5 nats over 25,000 steps, capped at ln 10."""
    objective = Objective(LossConfig(objective="capacity", capacity_c=5.0), categories=10)
    first_at_ceiling = math.ceil(math.log(10) / 5.0 * 25000)
    assert objective.target("kl_c", first_at_ceiling - 1) < math.log(10)
    assert objective.target("kl_c", first_at_ceiling) == pytest.approx(math.log(10))
    assert objective.target("kl_c", 25000) == pytest.approx(math.log(10))
    assert objective.target("kl_z", 12500) == pytest.approx(2.5)
    # by default C_c ramps to ln K itself, over the whole ramp
    default = Objective(LossConfig(objective="capacity"), categories=10)
    assert default.target("kl_c", 12500) == pytest.approx(math.log(10) / 2)


def test_elbo_objective_weights_each_kl():
    terms = LossTerms(recon=torch.tensor(100.0),
                      kl={"kl_z": torch.tensor(10.0), "kl_c": torch.tensor(2.0)})
    objective = Objective(LossConfig(beta=2.0, beta_c=5.0), categories=10)
    assert objective(terms, 1, 0).item() == pytest.approx(100 + 20 + 10)
    assert terms.negative_elbo.item() == pytest.approx(112.0)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 12), categories=st.integers(2, 12), seed=st.integers(0, 10**6),
       scale=st.floats(0.1, 8.0))
def test_per_image_kl_is_information_plus_batch_marginal_kl(batch, categories, seed, scale):
    """E_x KL(q(c|x) || U) = I(x; c) + KL(q(c) || U) with q(c) the batch mean of q(c|x)."""
    logits = scale * torch.randn(batch, categories, generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.float64)
    q = torch.softmax(logits, dim=1)
    marginal = q.mean(dim=0)
    information = (q * (q / marginal).log()).sum() / batch
    uniform = torch.distributions.Categorical(
        probs=torch.full((categories,), 1 / categories, dtype=torch.float64))
    marginal_kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(probs=marginal), uniform)
    assert batch_marginal_kl(logits).item() == pytest.approx(batch * marginal_kl.item(),
                                                             rel=1e-9, abs=1e-9)
    per_image = categorical_kl_uniform(logits) / batch
    assert per_image.item() == pytest.approx((information + marginal_kl).item(), rel=1e-9,
                                             abs=1e-9)


def test_batch_marginal_objective_weighs_the_marginal_kl_and_keeps_the_elbo():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])  # confident, balanced: marginal KL 0
    terms = LossTerms(recon=torch.tensor(50.0),
                      kl={"kl_z": torch.tensor(3.0), "kl_c": categorical_kl_uniform(logits)},
                      category_logits=logits)
    marginal = Objective(LossConfig(beta=2.0, beta_c=5.0, kl_c="batch_marginal"), categories=2)
    assert marginal(terms, 2, 0).item() == pytest.approx(50.0 + 2 * 3.0, abs=1e-5)
    per_image = Objective(LossConfig(beta=2.0, beta_c=5.0), categories=2)
    assert per_image(terms, 2, 0).item() == pytest.approx(
        50.0 + 6.0 + 5 * categorical_kl_uniform(logits).item(), rel=1e-6)
    assert terms.negative_elbo.item() == pytest.approx(
        53.0 + categorical_kl_uniform(logits).item(), rel=1e-6)  # the reported bound


def test_temperature_anneals_exponentially_from_start_to_end():
    schedule = TemperatureSchedule([1.0, 0.5])
    assert schedule.at(0, 101) == pytest.approx(1.0)
    assert schedule.at(50, 101) == pytest.approx(math.sqrt(0.5))
    assert schedule.at(100, 101) == pytest.approx(0.5)
    assert TemperatureSchedule(0.67).at(60, 101) == pytest.approx(0.67)


# --- the Gumbel-softmax joint model ---------------------------------------------------


def documented_family_defaults() -> dict[str, dict]:
    """The YAML block docs/clustering.md gives as the families' defaults."""
    text = DEFAULTS_PAGE.read_text()
    match = re.search(r"<!-- family defaults -->\s*```yaml\n(.*?)```", text, re.S)
    assert match, "docs/clustering.md: no ```yaml block after <!-- family defaults -->"
    return {arch: flatten(settings) for arch, settings in yaml.safe_load(match.group(1)).items()}


def test_family_defaults_are_the_documented_ones():
    documented = documented_family_defaults()
    assert set(documented) == set(FAMILY_DEFAULTS)
    for arch, values in documented.items():
        resolved = flatten(RunConfig.model_validate({"model": {"arch": arch}}).model_dump())
        assert {key: resolved[key] for key in values} == values, arch
        assert set(FAMILY_DEFAULTS[arch]) <= set(values), arch


def test_a_files_own_value_beats_the_family_default():
    gumbel = {"model": {"arch": "gumbel"}}
    assert RunConfig.model_validate({**gumbel, "loss": {"beta": 2.0}}).loss.beta == 2.0
    assert RunConfig.model_validate({"model": {"arch": "mlp"}}).loss.beta == 1.0
    built = RunConfig(model=ModelConfig(arch="gumbel"), loss=LossConfig(beta_c=3.0))
    assert built.loss.beta == FAMILY_DEFAULTS["gumbel"]["loss.beta"] and built.loss.beta_c == 3.0
    grid = GridSpec(name="g", base={}, matrix={"model.arch": ["mlp", "gumbel"]})
    betas = {run.config.model.arch: run.config.loss.beta for run in expand(grid)}
    assert betas == {"mlp": 1.0, "gumbel": FAMILY_DEFAULTS["gumbel"]["loss.beta"]}
    fixed = GridSpec(name="g", base={"loss": {"beta": 4.0}}, matrix={"model.arch": ["gumbel"]})
    assert [run.config.loss.beta for run in expand(fixed)] == [4.0]


def test_family_defaults_follow_a_section_assigned_later():
    config = RunConfig()
    config.model = ModelConfig(arch="gumbel")
    assert isinstance(config.loss, LossConfig)
    assert (config.loss.beta, config.loss.kl_c) == (10.0, "batch_marginal")
    assert "beta" not in config.loss.model_fields_set  # filled, not set by the user
    config.model = ModelConfig(arch="mlp")  # another family: the section defaults again
    assert (config.loss.beta, config.loss.kl_c) == (1.0, "per_image")
    config.loss = LossConfig(beta=3.0)
    config.model = ModelConfig(arch="gumbel")
    assert (config.loss.beta, config.loss.kl_c) == (3.0, "batch_marginal")


def test_family_defaults_are_elbo_settings_and_leave_a_null_section_an_error():
    capacity = RunConfig.model_validate({"model": {"arch": "gumbel"},
                                         "loss": {"objective": "capacity"}})
    assert (capacity.loss.beta, capacity.loss.kl_c) == (1.0, "per_image")  # both unused there
    for arch in ("mlp", "gumbel"):  # the same error whatever the family
        with pytest.raises(ValidationError, match="loss"):
            RunConfig.model_validate({"model": {"arch": arch}, "loss": None})


def test_jointvae_net_has_the_papers_layers():
    """Conv 32-64-64 (4x4, stride 2), a 256-unit dense layer, and the mirror image back."""
    model = build_model(ModelConfig(arch="gumbel", backbone="conv", channels=[32, 64, 64],
                                    dense=[256], z_dim=10, categories=10), (1, 28, 28))
    linear_in = [m.in_features for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert linear_in == [64 * 3 * 3]
    assert model.head.in_features == 256 and model.category_head.in_features == 256
    widths = [(m.in_features, m.out_features) for m in model.decoder
              if isinstance(m, torch.nn.Linear)]
    assert widths == [(20, 256), (256, 64 * 3 * 3)]
    assert model(torch.rand(2, 1, 28, 28)).logits.shape == (2, 1, 28, 28)
    plain = build_model(ModelConfig(arch="conv", channels=[32, 64]), (1, 28, 28))
    assert not [m for m in plain.encoder if isinstance(m, torch.nn.Linear)]


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
