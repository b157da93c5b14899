"""End to end: tiny grids on a real MNIST subset, tracked into a temporary SQLite store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO
from mlflow.tracking import MlflowClient
from torch import nn

import vaebench.spec.config
from vaebench.cli import main
from vaebench.lifecycle.provenance import code_version
from vaebench.models import MODELS, build_model
from vaebench.models.base import GaussianVAE
from vaebench.spec.config import ModelConfig
from vaebench.subnormals import this_thread_flushes

TINY_GRID = """
name: tiny
base:
  data: {{subset: 512, validation: 1000}}
  model: {{hidden: [64], z_dim: 4, channels: [8, 16]}}
  train: {{epochs: 2, batch_size: 64, eval_batch_size: 2500, device: cpu}}
matrix:
  model.arch: [{archs}]
  loss.beta: [1, 4]
seeds: [0]
"""

ARTIFACTS = {
    "config.yaml", "reconstructions.png", "samples.png", "state_dict.pt", "latent.png",
    "latent.npz", "kl_per_dimension.json", "kl_per_dimension.png",
}
FINAL_SCORES = {
    "test_elbo", "test_recon", "test_kl", "test_nmi", "test_ari", "test_accuracy",
    "test_active_units", "test_mi", "val_nmi", "val_ari", "val_accuracy", "first_epoch_seconds",
    "mean_epoch_seconds", "mean_images_per_second",
}
EPOCH_METRICS = {
    "train_loss", "val_elbo", "val_recon", "val_kl", "val_mi", "val_active_units", "epoch_seconds",
}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_cli(tmp_path: Path, grid: Path, uri: str, mnist_root: Path, *extra: str) -> int:
    return main([
        "run", str(grid), "--tracking-uri", uri, "--data-root", str(mnist_root),
        "--results-dir", str(tmp_path / "results"), *extra,
    ])


def runs_of(uri: str, experiment: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


@pytest.fixture(scope="module")
def tiny_grid_result(tmp_path_factory, mnist_root):
    """One tiny grid (mlp and conv, beta 1 and 4) run once for the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp, conv"))
    os.environ["VAEBENCH_SYSTEM_METRICS_SECONDS"] = "0.2"  # samples within a short run
    try:
        status = run_cli(tmp_path, grid, uri, mnist_root)
    finally:
        del os.environ["VAEBENCH_SYSTEM_METRICS_SECONDS"]
    return tmp_path, uri, status


def test_every_run_names_its_data_its_source_and_its_machine(tiny_grid_result, mnist_root):
    """The runs table's Dataset and Source columns: each run's splits as dataset inputs
    (digest of the exact images, context, source folder), vaebench as the source; and the
    system metrics of the machine while it trained."""
    from mlflow.tracking import MlflowClient

    from vaebench.data import load_splits, split_digest
    from vaebench.spec.config import DataConfig

    _, uri, _ = tiny_grid_result
    client = MlflowClient(uri)
    children = runs_of(uri, "tiny")
    children = children[children["tags.mlflow.parentRunId"].notna()]
    splits = load_splits(DataConfig(subset=512, validation=1000), mnist_root,
                         torch.device("cpu"))
    expected = {
        ("mnist-train", "training", split_digest(splits.train)),
        ("mnist-validation", "validation", split_digest(splits.validation)),
        ("mnist-test", "test", split_digest(splits.test)),
    }
    for run_id in children["run_id"]:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        seen = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"],
                 i.dataset.digest) for i in inputs}
        assert seen == expected
        assert all(str(mnist_root / "MNIST" / "raw") in i.dataset.source for i in inputs)
    assert set(children["tags.mlflow.source.name"]) == {"vaebench"}
    # MLflow's system metrics, sampled while each run trained
    for metric in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert children[f"metrics.{metric}"].notna().all(), metric
    # other data, other digests: a larger subset, or static binarization
    for other in (DataConfig(subset=600, validation=1000),
                  DataConfig(subset=512, validation=1000, binarize="static")):
        train = load_splits(other, mnist_root, torch.device("cpu")).train
        assert split_digest(train) != split_digest(splits.train)


def test_the_best_run_is_a_registered_model_that_reconstructs_like_the_run(
    tiny_grid_result, mnist_root
):
    """The grid's best run (one group: all four runs, chosen on val_elbo) is version 1 of the
    registered model ``tiny``; loaded with mlflow.pytorch.load_model it reconstructs, encodes
    and decodes test images as the run's own weights do, rebuilt here from its artifacts."""
    from vaebench.data import load_splits
    from vaebench.spec.config import DataConfig, RunConfig

    _, uri, _ = tiny_grid_result
    client = MlflowClient(tracking_uri=uri)
    runs = runs_of(uri, "tiny")
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    best = children.sort_values("metrics.val_elbo", ascending=False).iloc[0]
    (version,) = client.search_model_versions("name='tiny'")
    assert int(version.version) == 1 and version.run_id == best["run_id"]
    assert version.tags["vaebench.run_id"] == best["run_id"]
    assert version.tags["vaebench.run_name"] == best["tags.mlflow.runName"]
    assert version.tags["vaebench.selected_on"] == "val_elbo"
    assert version.tags["vaebench.invocation"] == best["tags.mlflow.parentRunId"]
    (output,) = client.get_run(best["run_id"]).outputs.model_outputs  # the Models column
    assert version.source == f"models:/{output.model_id}"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"models:/tiny/{version.version}")

    folder = Path(client.download_artifacts(best["run_id"], ""))
    config = RunConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    model = build_model(config.model, (1, 28, 28))
    model.load_state_dict(torch.load(folder / "state_dict.pt", weights_only=True))
    model.eval()
    test = load_splits(DataConfig(subset=512, validation=1000), mnist_root,
                       torch.device("cpu")).test
    images = test.images[:64]
    rows = images.reshape(64, -1)
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.sigmoid(model.reconstruct(images)).reshape(64, -1)
        assert (loaded(rows) - expected).abs().max().item() <= 1e-6
        assert (loaded.encode(rows) - model.encode(images)[0]).abs().max().item() <= 1e-6
        decoded = torch.sigmoid(model.decode(z)).reshape(8, -1)
        assert (loaded.decode(z) - decoded).abs().max().item() <= 1e-6
    # as MLflow serves it: the pyfunc flavor, its signature and input example
    served = mlflow.pyfunc.load_model(f"models:/tiny/{version.version}")
    (spec,) = served.metadata.get_input_schema().inputs
    assert spec.shape == (-1, 784)
    assert np.abs(served.predict(rows.numpy()) - expected.numpy()).max() <= 1e-6
    example = served.metadata.load_input_example(
        mlflow.artifacts.download_artifacts(version.source)
    )
    assert np.array_equal(example, rows[:4].numpy())


def test_a_model_that_cannot_be_registered_is_one_line_and_changes_no_exit_status(
    tmp_path, mnist_root, tracking_uri, monkeypatch, capsys
):
    """Registering comes after the grid's runs are tracked: a model it cannot make (here its
    rebuilding fails) is one line, the grid still exits 0; a grid named with characters
    MLflow refuses in model names (":") is registered under a name without them."""
    import vaebench.reporting.best_models

    def broken(*_):
        raise RuntimeError("no weights on purpose")

    grid = write(tmp_path / "tiny.yaml",
                 TINY_GRID.format(archs="mlp").replace("name: tiny", "name: mnist:tiny"))
    monkeypatch.setattr(vaebench.reporting.best_models, "served_model", broken)
    assert run_cli(tmp_path, grid, tracking_uri, mnist_root) == 0
    err = capsys.readouterr().err
    assert "vaebench: mnist-tiny: not registered: RuntimeError: no weights on purpose" in err
    client = MlflowClient(tracking_uri=tracking_uri)
    assert client.search_registered_models() == []
    monkeypatch.undo()
    assert run_cli(tmp_path, grid, tracking_uri, mnist_root, "--rerun", "--no-report") == 0
    (version,) = client.search_model_versions("name='mnist-tiny'")
    assert int(version.version) == 1
    assert mlflow.get_tracking_uri() != tracking_uri or "MLFLOW_TRACKING_URI" not in os.environ


def test_ctrl_c_while_registering_says_the_runs_are_tracked(
    tmp_path, mnist_root, tracking_uri, monkeypatch, capsys
):
    """Ctrl-C after the grid's runs are tracked, while its best run is registered: exit 130,
    no invitation to rerun (there is nothing to continue), and the grid's runs FINISHED."""
    import vaebench.reporting.best_models

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(vaebench.reporting.best_models, "served_model", interrupted)
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp"))
    assert run_cli(tmp_path, grid, tracking_uri, mnist_root) == 130
    err = capsys.readouterr().err
    assert "vaebench: registering stopped: tiny and the models after it are not registered" in err
    assert "rerun the same command" not in err
    runs = runs_of(tracking_uri, "tiny")
    assert set(runs["status"]) == {"FINISHED"}


def test_a_dataset_another_process_created_meanwhile_is_logged_on_the_next_try(tmp_path):
    """MLflow looks a dataset up, then inserts it: a worker that loses that race to another
    (PostgreSQL: 'duplicate key value violates unique constraint "dataset_pk"') tries again
    and finds it; another error of the store is not retried."""
    from mlflow.exceptions import MlflowException

    from vaebench.data import SplitRecord
    from vaebench.tracking.tracker import MLflowTracker, TrackingError

    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_grid("race", "race-1", {})
    run_id = tracker.start_run("r", {}, {})
    split = SplitRecord("mnist-train", "training", "ab" * 8, "/data/MNIST/raw", 512)
    real = tracker.client.log_inputs
    calls = []

    def losing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException('duplicate key value violates unique constraint "dataset_pk"'
                                  " DETAIL: Key (experiment_id, name, digest) in datasets")
        return real(*args, **kwargs)

    tracker.client.log_inputs = losing_once
    tracker.log_inputs(run_id, [split])
    assert len(calls) == 2
    (logged,) = MlflowClient(tracker.uri).get_run(run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("mnist-train", "ab" * 8)

    def failing(*args, **kwargs):
        raise MlflowException("the store is read-only")

    tracker.client.log_inputs = failing
    with pytest.raises(TrackingError, match="read-only"):
        tracker.log_inputs(run_id, [split])


def test_tiny_grid_tracks_parent_and_finished_children(tiny_grid_result):
    tmp_path, uri, status = tiny_grid_result
    assert status == 0
    runs = runs_of(uri, "tiny")
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(children) == 4
    assert set(children["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    assert set(runs["status"]) == {"FINISHED"}
    assert set(children["tags.mlflow.runName"]) == {
        "mlp-b1-s0", "mlp-b4-s0", "conv-b1-s0", "conv-b4-s0"
    }
    # flattened params: every varied setting is a column of the compare view
    assert set(children["params.model.arch"]) == {"mlp", "conv"}
    assert set(children["params.loss.beta"]) == {"1.0", "4.0"}
    assert set(children["params.data.subset"]) == {"512"}
    for tag in ("vaebench.run_key", "vaebench.seed", "vaebench.device", "vaebench.torch",
                "vaebench.grid_file", "vaebench.code"):
        assert children[f"tags.{tag}"].notna().all(), tag
    # the code version hashes vaebench's source; the commit is this checkout's
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert set(children["tags.vaebench.code"]) == {code_version()}
    assert set(children["tags.mlflow.source.git.commit"]) == {head}
    assert children["tags.vaebench.device_name"].str.len().gt(0).all()
    # x86's FTZ and DAZ; in this test process torch's pool may have started before the command,
    # and then keeps computing with subnormals (test_subnormals runs the command's own case)
    assert set(children["tags.vaebench.subnormals"]) <= {"flushed", "mixed"}
    assert not this_thread_flushes()  # the command put this thread's mode back


def test_tiny_grid_logs_every_epoch_and_artifacts(tiny_grid_result):
    _, uri, _ = tiny_grid_result
    client = MlflowClient(tracking_uri=uri)
    runs = runs_of(uri, "tiny")
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    for run_id in children["run_id"]:
        for metric in EPOCH_METRICS:
            history = client.get_metric_history(run_id, metric)
            assert [m.step for m in history] == [1, 2], metric
        for metric in ("test_elbo", "test_nmi"):  # the test split is scored once
            assert [m.step for m in client.get_metric_history(run_id, metric)] == [2], metric
        elbo = client.get_metric_history(run_id, "val_elbo")
        recon = client.get_metric_history(run_id, "val_recon")
        kl = client.get_metric_history(run_id, "val_kl")
        for e, r, k in zip(elbo, recon, kl, strict=True):
            assert e.value == pytest.approx(-(r.value + k.value), rel=1e-6)
            assert k.value > 0 and r.value > 0
        names = {a.path for a in client.list_artifacts(run_id)}
        assert names == ARTIFACTS
        final = client.get_run(run_id).data.metrics
        for score in FINAL_SCORES:
            assert score in final, score
        assert 0 < final["test_nmi"] <= 1 and 0.1 <= final["test_accuracy"] <= 1
        assert 1 <= final["test_active_units"] <= 4
        assert final["test_elbo"] == pytest.approx(-(final["test_recon"] + final["test_kl"]))
        # the collapse diagnostics: the last validation pass's KL of each of the 4 dimensions
        assert final["val_active_units"] in range(5) and np.isfinite(final["val_mi"])
        path = Path(client.download_artifacts(run_id, "kl_per_dimension.json"))
        profile = json.loads(path.read_text())
        assert profile["split"] == "validation" and len(profile["nats"]) == 4
        last = max(kl, key=lambda m: m.step).value
        assert sum(profile["nats"]) == pytest.approx(last, rel=1e-5)


def test_tiny_grid_state_dict_loads_into_model(tiny_grid_result):
    _, uri, _ = tiny_grid_result
    client = MlflowClient(tracking_uri=uri)
    runs = runs_of(uri, "tiny")
    child = runs[runs["tags.mlflow.runName"] == "conv-b4-s0"].iloc[0]
    folder = client.download_artifacts(child["run_id"], "")
    state = torch.load(Path(folder) / "state_dict.pt", weights_only=True)
    with np.load(Path(folder) / "latent.npz") as latent:  # what the latent picture shows
        means, labels = latent["means"], latent["labels"]
    assert means.shape == (2000, 4) and labels.shape == (2000,)
    config = ModelConfig(arch="conv", hidden=[64], z_dim=4, channels=[8, 16])
    model = build_model(config, (1, 28, 28))
    model.load_state_dict(state)  # raises if shapes or names disagree


def test_tiny_grid_results_csv_matches_mlflow(tiny_grid_result):
    tmp_path, uri, _ = tiny_grid_result
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")
    runs = runs_of(uri, "tiny")
    children = runs[runs["tags.mlflow.parentRunId"].notna()].set_index("run_id")
    assert len(table) == 4
    assert set(table["status"]) == {"FINISHED"}
    for row in table.itertuples():
        run = children.loc[row.run_id]
        assert run["tags.vaebench.run_key"] == row.key
        assert run["metrics.test_elbo"] == pytest.approx(row.test_elbo)
        assert row.seconds > 0 and row.epoch_seconds > 0


def _exploding_builder(config: ModelConfig, image_shape):
    """A model family plugged in through the registry whose training step raises."""

    class Exploding(nn.Module):
        def forward(self, x):
            raise RuntimeError("exploded on purpose")

    model = build_model(config.model_copy(update={"arch": "mlp"}), image_shape)
    assert isinstance(model, GaussianVAE)
    model.decoder.append(Exploding())
    return model


def test_failing_variant_is_marked_failed_and_grid_goes_on(
    tmp_path, mnist_root, tracking_uri, monkeypatch, capsys
):
    monkeypatch.setitem(MODELS, "exploding", _exploding_builder)
    monkeypatch.setattr(vaebench.spec.config, "ARCHS", (*vaebench.spec.config.ARCHS, "exploding"))
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp, exploding"))
    status = run_cli(tmp_path, grid, tracking_uri, mnist_root, "--no-register")
    assert status == 1
    assert MlflowClient(tracking_uri=tracking_uri).search_registered_models() == []
    err = capsys.readouterr()
    assert "2 of 4 runs failed" in err.err
    assert "FAILED exploding-b1-s0: RuntimeError: exploded on purpose" in err.out
    runs = runs_of(tracking_uri, "tiny").set_index("tags.mlflow.runName")
    assert runs.loc["mlp-b1-s0", "status"] == "FINISHED"
    assert runs.loc["mlp-b4-s0", "status"] == "FINISHED"
    for name in ("exploding-b1-s0", "exploding-b4-s0"):
        assert runs.loc[name, "status"] == "FAILED"
        assert "exploded on purpose" in runs.loc[name, "tags.vaebench.error"]
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert list(parent["status"]) == ["FAILED"]
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")
    assert sorted(table["status"]) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]


def test_rerun_skips_finished_runs_and_rerun_flag_trains_them_again(
    tmp_path, mnist_root, tracking_uri, capsys
):
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp"))
    assert run_cli(tmp_path, grid, tracking_uri, mnist_root) == 0
    capsys.readouterr()
    assert run_cli(tmp_path, grid, tracking_uri, mnist_root) == 0  # nothing left to train
    out, err = capsys.readouterr()
    skipped = [line for line in err.splitlines() if "skipped: FINISHED already in run" in line]
    assert len(skipped) == 2 and "epoch" not in err
    assert "nothing to train" in out
    runs = runs_of(tracking_uri, "tiny")
    assert runs["tags.mlflow.parentRunId"].isna().sum() == 1  # no new invocation recorded
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")  # the table still covers the grid
    assert list(table["status"]) == ["FINISHED", "FINISHED"] and table["test_elbo"].notna().all()

    assert main([
        "run", str(grid), "--tracking-uri", tracking_uri, "--data-root", str(mnist_root),
        "--results-dir", str(tmp_path / "results"), "--rerun", "--no-report",
    ]) == 0
    runs = runs_of(tracking_uri, "tiny")
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert runs["tags.mlflow.parentRunId"].isna().sum() == 2
    assert len(children) == 4 and children["tags.vaebench.run_key"].nunique() == 2
    # same config and seed on CPU: the same numbers in both invocations
    assert children.groupby("tags.vaebench.run_key")["metrics.test_elbo"].nunique().eq(1).all()
    # each invocation that trained registered its best run (without a report too)
    versions = MlflowClient(tracking_uri=tracking_uri).search_model_versions("name='tiny'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    parents = runs[runs["tags.mlflow.parentRunId"].isna()].sort_values("start_time")
    for version, parent in zip(sorted(versions, key=lambda v: int(v.version)),
                               parents["run_id"], strict=True):
        assert version.tags["vaebench.invocation"] == parent
        trained = children[children["tags.mlflow.parentRunId"] == parent]
        assert version.run_id == trained.loc[trained["metrics.val_elbo"].idxmax(), "run_id"]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("sqlite:////no/such/folder/mlflow.db", "does not exist"),
        ("nosuchscheme://x", "tracking URI"),
    ],
)
def test_bad_tracking_uri_is_one_line_and_exit_2(tmp_path, mnist_root, capsys, uri, message):
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp"))
    assert run_cli(tmp_path, grid, uri, mnist_root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vaebench: error:") and message in err[0]
    assert not (tmp_path / "results").exists()


def test_missing_data_fails_before_anything_is_tracked(tmp_path, tracking_uri, capsys, monkeypatch):
    import dataclasses

    from vaebench import data

    closed = dataclasses.replace(data.DATASETS["mnist"], mirrors=("http://127.0.0.1:9/",))
    monkeypatch.setitem(data.DATASETS, "mnist", closed)
    data.load_arrays.cache_clear()
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp"))
    assert run_cli(tmp_path, grid, tracking_uri, tmp_path / "empty-root") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "VAEBENCH_DATA" in err[0]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_reference_mlp_reaches_published_elbo_on_full_mnist(mnist_root):
    """pytorch/examples' VAE, 10 epochs of all 60,000 training images (validation: 0, as the
    example trains): test -ELBO <= 106.5 (BCE on grey-level pixels, not a likelihood bound).

    Measured here (2 threads): seeds 0-3 gave 105.54, 105.79, 105.72, 105.49 (mean 105.64,
    sample std 0.14); the bound is about 6 standard deviations above the mean.
    """
    from vaebench.data import load_splits
    from vaebench.spec.config import RunConfig
    from vaebench.training.loop import fit

    config = RunConfig.model_validate({
        "data": {"validation": 0},
        "model": {"arch": "mlp", "hidden": [400], "z_dim": 20},
        "loss": {"recon": "bce", "beta": 1.0},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 10, "batch_size": 128, "device": "cpu"},
    })
    splits = load_splits(config.data, mnist_root, torch.device("cpu"))
    result = fit(config, splits, torch.device("cpu"))
    print(f"test -ELBO after 10 epochs: {-result.summary['test_elbo']:.2f}")
    assert -result.summary["test_elbo"] <= 106.5


# --- faults of the environment, caught before training ---------------------------------


def test_results_folder_that_is_a_file_fails_before_training(tmp_path, mnist_root, capsys):
    (tmp_path / "results").write_text("not a folder")
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_cli(tmp_path, grid, uri, mnist_root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--results-dir" in err[0] and "is a file, not a folder" in err[0]
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked, nothing trained
    (tmp_path / "results").unlink()  # the user moves the file away: the rerun completes
    assert run_cli(tmp_path, grid, uri, mnist_root) == 0
    assert pd.read_csv(tmp_path / "results" / "tiny.csv")["status"].eq("FINISHED").all()


def test_checkpoint_folder_that_is_a_file_fails_before_training(tmp_path, mnist_root, capsys):
    (tmp_path / "checkpoints").write_text("not a folder")  # where checkpoints/ would go
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp"))
    assert run_cli(tmp_path, grid, f"sqlite:///{tmp_path / 'mlflow.db'}", mnist_root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint-dir" in err[0] and "is a file" in err[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_an_astronomical_grid_is_refused_at_once_naming_its_size(tmp_path, capsys):
    thirty = ", ".join(str(i) for i in range(1, 31))
    grid = write(tmp_path / "huge.yaml", f"""
name: huge
matrix:
  loss.beta: [{thirty}]
  loss.beta_c: [{thirty}]
  model.z_dim: [{", ".join(str(i) for i in range(1, 19))}]
seeds: [0, 1, 2]
""")
    started = time.monotonic()
    assert main(["run", str(grid), "--dry-run"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip().splitlines()  # 30 x 30 x 18 x 3 seeds
    assert len(err) == 1 and "48,600 runs exceed the 10,000" in err[0]


def test_a_tracking_server_that_is_not_running_is_reported_within_seconds(
    tmp_path, mnist_root, capsys
):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    grid = write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp"))
    started = time.monotonic()
    assert run_cli(tmp_path, grid, f"http://127.0.0.1:{port}", mnist_root) == 2
    assert time.monotonic() - started < 30  # MLflow's own retries took minutes
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow server answers" in err[0]
    assert not (tmp_path / "results").exists()
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the user points at a store that answers
    assert run_cli(tmp_path, grid, local, mnist_root) == 0


EXIT_PROBE = """
import atexit, pathlib, sys, threading, time
import vaebench.cli

def late_write():
    time.sleep(0.3)
    pathlib.Path("thread-finished").write_text("joined")

def main_then_a_thread(argv=None):
    status = program(argv)
    threading.Thread(target=late_write).start()  # still running when main returns
    return status

class FreedByTeardown:  # the interpreter's teardown of modules would free it
    def __del__(self):
        pathlib.Path("teardown-ran").write_text("ran")

program, vaebench.cli.main = vaebench.cli.main, main_then_a_thread
vaebench.cli.freed_by_teardown = FreedByTeardown()
atexit.register(lambda: pathlib.Path("handler-ran").write_text("ran"))
sys.stdout.write("buffered, not yet flushed")
sys.argv = ["vaebench", *sys.argv[1:]]
vaebench.cli.entry()
"""


@pytest.mark.parametrize(
    ("args", "status"), [(["run", "missing.yaml"], 2), (["run", "tiny.yaml", "--dry-run"], 0)]
)
def test_the_program_exits_with_its_status_after_threads_and_exit_handlers(
    tmp_path, args, status
):
    """entry() skips the interpreter's module teardown, not what an exit must do."""
    write(tmp_path / "tiny.yaml", TINY_GRID.format(archs="mlp"))
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, *args], cwd=tmp_path, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == status, done.stderr
    assert (tmp_path / "thread-finished").read_text() == "joined"
    assert (tmp_path / "handler-ran").read_text() == "ran"
    assert not (tmp_path / "teardown-ran").exists()  # what the fast exit skips
    assert done.stdout.startswith("buffered, not yet flushed")
    if status:
        assert "missing.yaml" in done.stderr.strip().splitlines()[-1]


def test_a_profiler_around_the_program_still_writes_its_profile(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", "profile.out", "-m", "vaebench", "run",
         "missing.yaml"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "missing.yaml: cannot read" in done.stderr  # (cProfile swallows the exit status)
    assert (tmp_path / "profile.out").stat().st_size > 0


def test_a_run_shorter_than_the_sampling_interval_has_its_system_metrics(tmp_path, monkeypatch):
    """MLflow's monitor publishes only after its interval (10 s) if the run still runs: a
    quicker run gets what it sampled when it ends, once."""
    from vaebench.tracking.tracker import MLflowTracker

    monkeypatch.delenv("VAEBENCH_SYSTEM_METRICS", raising=False)
    monkeypatch.delenv("VAEBENCH_SYSTEM_METRICS_SECONDS", raising=False)
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.start_grid("quick", "quick-1", {})
    run_id = tracker.start_run("r", {}, {})
    with tracker.system_metrics(run_id):
        pass  # far shorter than 10 s
    tracker.end_run(run_id)
    history = tracker.client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == [0]
    assert tracker.client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
