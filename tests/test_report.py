"""Reports: leaderboards over seeds, figures, report.md/html, and the MLflow UI in Chromium.

The end-to-end tests train one tiny 3-seed grid of grey-level BCE runs (and a second, 1-run
invocation of the same experiment), and a tiny grid of an mlp beside a cvae, into temporary
SQLite stores and read everything back. Reports rank on validation metrics and show the test
split's beside.
"""

from __future__ import annotations

import base64
import multiprocessing
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, mlflow_server
from mlflow.tracking import MlflowClient

from vaebench import cli
from vaebench.cli import main
from vaebench.reporting import report
from vaebench.reporting.render import (
    display_table,
    measurement_notes,
    render_html,
    render_markdown,
    verdict,
)
from vaebench.reporting.report import make_report
from vaebench.reporting.runs import (
    METRICS,
    RunSet,
    drop_repeats,
    picture_prefix,
    run_set_from_frame,
)
from vaebench.reporting.table import leaderboard
from vaebench.spec.catalogue import RANKABLE
from vaebench.spec.config import VaebenchError
from vaebench.spec.grid import SELECT_TAG

GRID = """
name: seeds3
base:
  data: {{subset: 300, validation: 500, binarize: none}}
  model: {{hidden: [64], z_dim: 2}}
  train: {{epochs: 2, batch_size: 64, eval_batch_size: 2500, device: cpu}}
matrix:
  loss.beta: [{betas}]
seeds: [{seeds}]
"""
CONDITIONAL_GRID = """
name: bounds
base:
  data: {subset: 300, validation: 500}
  model: {hidden: [64], z_dim: 2}
  train: {epochs: 2, batch_size: 64, eval_batch_size: 2500, device: cpu}
include:
  - {model.arch: mlp}
  - {model.arch: cvae}
seeds: [0]
"""
FIGURES = {"rate_distortion.png", "elbo_by_epoch.png", "nmi_by_epoch.png", "clustering.png",
           "epoch_seconds.png"}
PICTURES = {"best_samples.png", "best_reconstructions.png", "best_latent.png",
            "best_kl_per_dimension.png"}
REPORT_FILES = {"leaderboard.csv", "report.md", "report.html"} | FIGURES | PICTURES
SCREENSHOTS = REPO / "results" / "browser"


# --- unit: aggregation over a hand-made search_runs table ---------------------------------


def search_frame(rows: list[dict]) -> pd.DataFrame:
    """A table shaped like ``mlflow.search_runs``: one parent, the given children."""
    base = pd.Timestamp("2026-01-01", tz="UTC")
    parent = {"run_id": "p", "status": "FINISHED", "start_time": base,
              "tags.mlflow.runName": "grid-1", "tags.mlflow.parentRunId": None}
    children = [
        {"run_id": f"r{i}", "status": "FINISHED", "start_time": base + pd.Timedelta(seconds=i + 1),
         "tags.mlflow.parentRunId": "p", **row}
        for i, row in enumerate(rows)
    ]
    return pd.DataFrame([parent, *children])


def child(name: str, beta: float, seed: int, elbo: float, **metrics: float) -> dict:
    """A finished mlp run with validation ELBO ``elbo`` and the given other metrics."""
    return {"tags.mlflow.runName": name, "params.loss.beta": str(beta), "params.seed": str(seed),
            "params.model.arch": "mlp", "metrics.val_elbo": elbo,
            **{f"metrics.{k}": v for k, v in metrics.items()}}


def board(rows: list[dict], metric: str = "val_elbo") -> pd.DataFrame:
    run_set = run_set_from_frame(search_frame(rows), "grid", "1", "sqlite:///x.db")
    return leaderboard(run_set, METRICS[metric]).set_index("variant")


def test_one_seed_has_no_spread_and_its_ties_are_not_judged():
    table = board([child("b1-s0", 1, 0, -100.0), child("b4-s0", 4, 0, -120.0)])
    assert list(table.index) == ["b1", "b4"]
    assert table["runs"].tolist() == [1, 1]
    assert table["val_elbo_std"].isna().all()  # unknown, not 0
    assert table["ties_best"].tolist() == ["best", ""]


def test_ties_within_one_standard_deviation_are_marked():
    rows = [child(f"a-s{s}", 1, s, v) for s, v in enumerate([-100.0, -102.0, -104.0])]
    rows += [child(f"b-s{s}", 2, s, v) for s, v in enumerate([-103.0, -104.0, -105.0])]
    rows += [child(f"c-s{s}", 3, s, v) for s, v in enumerate([-120.0, -121.0, -122.0])]
    table = board(rows)
    assert list(table.index) == ["a", "b", "c"]
    assert table.loc["a", "val_elbo_std"] == pytest.approx(2.0)
    assert table["ties_best"].tolist() == ["best", "yes", "no"]  # |-104+102| <= 2; 19 > 2


def test_ranking_reads_validation_and_shows_test_beside():
    # slow is better on validation, fast on test: validation decides, test is only shown
    rows = [child("fast-s0", 1, 0, -100.0, test_elbo=-80.0),
            child("slow-s0", 2, 0, -90.0, test_elbo=-110.0)]
    table = board(rows)
    assert list(table.index) == ["slow", "fast"]
    assert table["test_elbo_mean"].tolist() == [-110.0, -80.0]
    shown = display_table(table.reset_index(), METRICS["val_elbo"])
    columns = list(shown.columns)
    assert columns.index("val ELBO") < columns.index("test ELBO")
    assert shown["test ELBO"].tolist() == ["-110.00", "-80.00"]
    assert "ties best (val_elbo)" in columns


def test_metric_direction_decides_the_best():
    rows = [child("fast-s0", 1, 0, -100.0, mean_epoch_seconds=1.0, val_nmi=0.2),
            child("slow-s0", 2, 0, -90.0, mean_epoch_seconds=3.0, val_nmi=0.5)]
    assert board(rows).index[0] == "slow"  # higher ELBO
    assert board(rows, "mean_epoch_seconds").index[0] == "fast"  # fewer seconds
    assert board(rows, "val_nmi").index[0] == "slow"


def test_bce_and_mse_elbos_are_ranked_apart_but_nmi_is_not():
    rows = [{**child(f"{recon}-b{beta}-s0", beta, 0, elbo, val_nmi=nmi, test_kl=kl),
             "params.loss.recon": recon}
            for recon, beta, elbo, nmi, kl in [("bce", 1, -100.0, 0.30, 25.0),
                                               ("bce", 4, -120.0, 0.50, 8.0),
                                               ("mse", 1, -30.0, 0.40, 11.0),
                                               ("mse", 4, -45.0, 0.60, 2.0)]]
    table = board(rows)
    assert list(table.index) == ["bce-b1", "bce-b4", "mse-b1", "mse-b4"]
    assert table["rank"].tolist() == [1, 2, 1, 2]
    assert table["compared_within"].tolist() == ["loss.recon=bce"] * 2 + ["loss.recon=mse"] * 2
    assert table["ties_best"].tolist() == ["best", "", "best", ""]
    text = verdict(table.reset_index(), METRICS["val_elbo"])
    assert "Runs with different loss.recon are ranked apart" in text
    assert "Best among loss.recon=bce: **bce-b1**" in text
    assert "Best among loss.recon=mse: **mse-b1**" in text
    by_nmi = board(rows, "val_nmi")  # not in the loss's units: one group
    assert list(by_nmi.index) == ["mse-b4", "bce-b4", "mse-b1", "bce-b1"]
    assert set(by_nmi["compared_within"]) == {"all runs"}
    assert by_nmi["rank"].tolist() == [1, 2, 3, 4]
    assert picture_prefix("loss.recon=bce", 2) == "best_bce_"
    assert picture_prefix("all runs", 1) == "best_"


def test_clustering_scores_of_another_cluster_count_are_ranked_apart():
    # NMI rises with the number of clusters: a K = 30 run must not be ranked among K = 10 ones.
    # Here it has the lowest NMI of all, and still ranks first in a group of its own.
    rows = [{**child(f"k{k}-b{beta}-s{seed}", beta, seed, -100.0, val_nmi=nmi),
             "params.model.categories": str(k)}
            for k, beta, nmis in [(10, 1, (0.60, 0.62)), (10, 4, (0.50, 0.52)),
                                  (30, 1, (0.40, 0.42))]
            for seed, nmi in enumerate(nmis)]
    by_nmi = board(rows, "val_nmi")
    assert list(by_nmi.index) == ["k10-b1", "k10-b4", "k30-b1"]
    assert by_nmi["compared_within"].tolist() == ["model.categories=10"] * 2 + [
        "model.categories=30"]
    assert by_nmi["rank"].tolist() == [1, 2, 1]
    assert by_nmi["runs"].tolist() == [2, 2, 2]
    text = verdict(by_nmi.reset_index(), METRICS["val_nmi"])
    assert "Runs with different model.categories are ranked apart" in text
    assert "Best among model.categories=30: **k30-b1**" in text
    # a bound of log p(x) is in the same units whatever K is: one group
    assert set(board(rows, "val_elbo")["compared_within"]) == {"all runs"}


def test_a_cvae_bound_of_log_p_x_given_y_is_ranked_apart():
    rows = [child("mlp-s0", 1, 0, -100.0, val_nmi=0.5),
            {**child("cvae-s0", 1, 0, -90.0, conditional_accuracy=0.9),
             "params.model.arch": "cvae"}]
    run_set = run_set_from_frame(search_frame(rows), "grid", "1", "sqlite:///x.db")
    assert run_set.runs.set_index("name")["likelihood_of"].to_dict() == {
        "mlp-s0": "p(x)", "cvae-s0": "p(x|y)"}
    table = leaderboard(run_set, METRICS["val_elbo"]).set_index("variant")
    assert table.loc["mlp", "compared_within"] == "likelihood_of=p(x)"
    assert table.loc["cvae", "compared_within"] == "likelihood_of=p(x|y)"
    assert table["rank"].tolist() == [1, 1] and table["ties_best"].tolist() == ["best", "best"]
    by_nmi = leaderboard(run_set, METRICS["val_nmi"]).set_index("variant")
    assert set(by_nmi["compared_within"]) == {"all runs"}  # not a bound: no group of its own
    assert by_nmi.loc["mlp", "rank"] == 1 and pd.isna(by_nmi.loc["cvae", "rank"])
    notes = measurement_notes(run_set, METRICS["val_elbo"])
    assert "cvae runs are given the label: their ELBO bounds log p(x|y)" in notes


def test_notes_say_what_the_numbers_are():
    def notes(**params: str) -> str:
        rows = [{**child("a-s0", 1, 0, -100.0, test_nll=95.0),
                 **{f"params.{k}": v for k, v in params.items()}}]
        run_set = run_set_from_frame(search_frame(rows), "grid", "1", "sqlite:///x.db")
        return measurement_notes(run_set, METRICS["val_elbo"])

    grey = notes(**{"data.binarize": "none", "loss.recon": "bce"})
    assert "ranked on val_elbo (validation split" in grey
    assert "not a likelihood bound (grey-level pixels)" in grey
    assert "not a bound." not in grey
    mse = notes(**{"data.binarize": "none", "loss.recon": "mse"})
    assert "squared error plus KL: not a bound" in mse and "grey-level" not in mse
    binary = notes(**{"data.binarize": "dynamic", "loss.recon": "bce",
                      "eval.iwae_samples": "100"})
    assert "grey-level" not in binary and "not a bound" not in binary
    assert "K = 100 samples" in binary


def test_unfinished_runs_are_counted_but_not_aggregated():
    rows = [child("a-s0", 1, 0, -100.0), child("a-s1", 1, 1, -110.0),
            {**child("a-s2", 1, 2, -500.0), "status": "FAILED"}]
    table = board(rows)
    assert table.loc["a", "runs"] == 2 and table.loc["a", "not_finished"] == 1
    assert table.loc["a", "val_elbo_mean"] == pytest.approx(-105.0)


def rerun(name: str, seed: int, elbo: float, key: str, device: str = "cpu",
          code: str = "c1", subnormals: str = "flushed") -> dict:
    return {**child(name, 1, seed, elbo), "tags.vaebench.run_key": key,
            "tags.vaebench.device": device, "tags.vaebench.code": code,
            "tags.vaebench.subnormals": subnormals}


def test_a_rerun_of_the_same_seed_is_not_a_second_sample():
    rows = [rerun("a-s0", 0, -100.0, "k0"), rerun("a-s1", 1, -110.0, "k1"),
            rerun("a-s0", 0, -100.0, "k0")]
    run_set = run_set_from_frame(search_frame(rows), "grid", "1", "sqlite:///x.db")
    assert run_set.repeats == 1 and list(run_set.runs["run_id"]) == ["r1", "r2"]
    table = leaderboard(run_set, METRICS["val_elbo"])
    assert table["runs"].tolist() == [2] and table["val_elbo_std"].item() == pytest.approx(
        np.std([-100.0, -110.0], ddof=1)
    )


def test_a_rerun_with_subnormals_kept_is_a_new_sample():
    rows = [rerun("a-s0", 0, -100.0, "k0"), rerun("a-s0", 0, -100.5, "k0", subnormals="kept"),
            rerun("a-s0", 0, -100.7, "k0", subnormals="kept")]  # a repeat of the second
    kept, repeats = drop_repeats(search_frame(rows).iloc[1:])  # the children
    assert repeats == 1 and list(kept["run_id"]) == ["r0", "r2"]


def test_a_rerun_on_another_device_or_code_version_is_a_new_sample():
    rows = [rerun("a-s0", 0, -100.0, "k0"),
            rerun("a-s0", 0, -101.0, "k0", device="cuda"),  # another floating-point path
            rerun("a-s0", 0, -102.0, "k0", code="c2"),  # another version of vaebench
            rerun("a-s0", 0, -103.0, "k0", device="cuda", code="c2"),
            rerun("a-s0", 0, -104.0, "k0", code="c2"),  # a repeat of r3: counted once
            {**rerun("a-s0", 0, -105.0, "k0"), "status": "FAILED"}]  # never a repeat
    runs = search_frame(rows).iloc[1:].reset_index(drop=True)
    kept, repeats = drop_repeats(runs)
    assert repeats == 1
    assert list(kept["run_id"]) == ["r0", "r1", "r3", "r4", "r5"]  # the later of r2, r4
    run_set = run_set_from_frame(search_frame(rows), "grid", "1", "sqlite:///x.db")
    assert run_set.repeats == 1
    table = leaderboard(run_set, METRICS["val_elbo"])
    assert table["runs"].tolist() == [4] and table["not_finished"].tolist() == [1]
    assert table["val_elbo_mean"].item() == pytest.approx(np.mean([-100.0, -101.0, -103.0,
                                                                   -104.0]))


def test_a_metric_missing_on_some_runs_is_counted_per_metric():
    rows = [child("a-s0", 1, 0, -100.0, val_nmi=0.5), child("a-s1", 1, 1, -110.0),
            child("a-s2", 1, 2, -120.0)]
    table = board(rows, "val_nmi")
    assert table.loc["a", "runs"] == 3 and table.loc["a", "val_nmi_count"] == 1
    assert np.isnan(table.loc["a", "val_nmi_std"]) and table.loc["a", "val_elbo_count"] == 3
    shown = display_table(table.reset_index(), METRICS["val_nmi"]).set_index("variant")
    assert shown.loc["a", "val NMI"] == "0.500 (n=1)"
    assert "single run show no spread" in verdict(table.reset_index(), METRICS["val_nmi"])


def test_variants_without_the_metric_are_listed_unranked():
    rows = [{**child("mn-s0", 1, 0, -100.0, val_nmi=0.5), "params.data.dataset": "mnist"},
            {**child("fa-s0", 1, 0, -200.0), "params.data.dataset": "fashion_mnist"},
            {**child("dead-s0", 4, 0, float("nan")), "params.data.dataset": "mnist",
             "status": "FAILED"}]
    table = board(rows, "val_nmi")
    assert table.loc["mn", "ties_best"] == "best" and table.loc["mn", "rank"] == 1
    assert pd.isna(table.loc["fa", "rank"]) and table.loc["fa", "ties_best"] == ""
    assert table.loc["dead", "runs"] == 0 and table.loc["dead", "not_finished"] == 1
    text = verdict(table.reset_index(), METRICS["val_nmi"])
    assert "Best among data.dataset=mnist: **mn**" in text and "**fa**" not in text
    assert "Unranked, without a value of val_nmi: " in text


def test_labels_drop_the_seed_and_partial_params_do_not_count_as_varied():
    rows = [{**child(f"s{seed}", 1, seed, -100.0 - seed), "params.data.subset": "512"}
            for seed in range(2)]
    rows.append({"tags.mlflow.runName": "trial-bad", "params.loss.beta": "2",
                 "params.seed": "0", "status": "FAILED"})  # an invalid trial's few params
    run_set = run_set_from_frame(search_frame(rows), "grid", "1", "sqlite:///x.db")
    assert run_set.runs["variant"].tolist() == ["all seeds", "all seeds", "trial-bad"]
    table = leaderboard(run_set, METRICS["val_elbo"])
    assert "data.subset" not in table and "model.arch" not in table
    assert table["runs"].tolist() == [2, 0]


def test_a_metric_no_run_has_is_a_clear_error():
    message = r"no run has the metric 'val_nmi' \(absent with data.validation: 0\)"
    with pytest.raises(VaebenchError, match=message + "; rank on one of these: val_elbo"):
        board([child("a-s0", 1, 0, -100.0)], "val_nmi")


def test_a_test_metric_is_refused_with_the_reason(tmp_path):
    for metric, instead in [("test_elbo", "val_elbo"), ("test_nmi", "val_nmi")]:
        with pytest.raises(VaebenchError) as refused:
            make_report("grid", f"sqlite:///{tmp_path / 'none.db'}", tmp_path, metric=metric)
        message = str(refused.value)
        assert f"{metric} is scored on the test split" in message
        assert f"select on {instead}" in message
    with pytest.raises(VaebenchError, match="choose one of val_elbo"):
        make_report("grid", f"sqlite:///{tmp_path / 'none.db'}", tmp_path, metric="nonsense")
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "grid").exists()


def report_metric_option() -> tuple[tuple[str, ...], str]:
    """(choices, default) of ``vaebench report --metric`` as the parser has them."""
    parser = cli._parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    metric = next(a for a in commands.choices["report"]._actions if a.dest == "metric")
    return tuple(metric.choices), metric.default


def test_cli_metric_choices_are_the_reports():
    assert report.DEFAULT_METRIC == "val_elbo" == cli.DEFAULT_METRIC
    assert cli.METRIC_NAMES == RANKABLE
    assert report_metric_option() == (RANKABLE, None)  # None: the grid file's select
    assert set(RANKABLE) <= set(METRICS)
    assert not any(name.startswith("test_") for name in RANKABLE)
    assert {"val_elbo", "val_nmi", "mean_epoch_seconds"} <= set(RANKABLE)


def test_documents_escape_text_and_embed_images(tmp_path):
    picture = tmp_path / "fig.png"
    picture.write_bytes(b"\x89PNG fake bytes")
    table = pd.DataFrame({"variant": ["a|b", "<i>"], "value": ["1 ± 2", "3"]})
    blocks = [("h1", "R & D"), ("p", "best: **a|b**"), ("table", table),
              ("img", (picture, "a caption"))]
    markdown = render_markdown(blocks)
    assert "| a\\|b | 1 ± 2 |" in markdown and "![fig](fig.png)" in markdown
    page = render_html(blocks, "t")
    assert "<h1>R &amp; D</h1>" in page and "<b>a|b</b>" in page and "&lt;i&gt;" in page
    embedded = base64.b64encode(picture.read_bytes()).decode()
    assert f'src="data:image/png;base64,{embedded}"' in page and "fig.png" not in page


def test_report_errors_are_one_line_and_create_no_store(tmp_path, capsys):
    db = tmp_path / "none.db"
    assert main(["report", "x", "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not db.exists()
    MlflowClient(f"sqlite:///{db}").create_experiment("other")
    assert main(["report", "x", "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "no experiment named 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "other", "--tracking-uri", f"sqlite:///{db}", "--metric", "x"])
    assert exit_info.value.code == 2
    assert "argument --metric: invalid choice: 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a test metric is not a choice
        main(["report", "other", "--tracking-uri", f"sqlite:///{db}", "--metric", "test_elbo"])
    assert exit_info.value.code == 2
    assert "argument --metric: invalid choice: 'test_elbo'" in capsys.readouterr().err


# --- end to end: a 3-seed grid in a real store ---------------------------------------------


def helper_processes_left_within(seconds: float) -> list:
    """This process's live multiprocessing children after up to ``seconds`` (a killed one is
    reaped by the asking)."""
    deadline = time.monotonic() + seconds
    while (left := multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def store(tmp_path_factory, mnist_root):
    """seeds3 (grey-level BCE) run twice: 2 variants x 3 seeds (reported automatically into
    results1), then one more run of beta 1 with --no-report (results2)."""
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--tracking-uri", uri, "--data-root", str(mnist_root)]
    first = tmp / "seeds3.yaml"
    first.write_text(GRID.format(betas="1, 4", seeds="0, 1, 2"))
    assert main(["run", str(first), *common, "--results-dir", str(tmp / "results1")]) == 0
    # the finishing helper (started on a machine of 2 cores or more) drew the report's figures
    # during registration; the run closed it after the report
    assert helper_processes_left_within(5.0) == []
    second = tmp / "again.yaml"
    second.write_text(GRID.format(betas="1", seeds="7"))
    assert main(
        ["run", str(second), *common, "--results-dir", str(tmp / "results2"), "--no-report"]
    ) == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["seeds3"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()].sort_values("start_time")
    return tmp, uri, runs, list(parents["run_id"])


def test_run_writes_the_report_and_logs_it_on_the_parent(store):
    tmp, uri, runs, (first, second) = store
    folder = tmp / "results1" / "seeds3"
    assert {p.name for p in folder.iterdir()} == REPORT_FILES
    for name in REPORT_FILES - {"leaderboard.csv", "report.md", "report.html"}:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    logged = {Path(a.path).name for a in MlflowClient(uri).list_artifacts(first, "report")}
    assert logged == REPORT_FILES
    assert not (tmp / "results2" / "seeds3").exists()  # --no-report
    markdown = (folder / "report.md").read_text()
    for name in FIGURES | PICTURES:
        assert f"]({name})" in markdown
    assert "6 finished runs in 2 variants" in markdown


# the leaderboard columns seeds3's runs have: <name>_mean/_std/_count from metrics.<name>
SEEDS3_METRICS = ("val_elbo", "test_elbo", "test_recon", "test_kl", "val_active_units", "val_mi",
                  "val_nmi", "test_nmi", "test_accuracy", "test_ari", "mean_epoch_seconds")


def test_three_seeds_match_a_direct_pandas_computation(store):
    tmp, _, runs, (first, _) = store
    table = pd.read_csv(tmp / "results1" / "seeds3" / "leaderboard.csv").set_index("loss.beta")
    children = runs[runs["tags.mlflow.parentRunId"] == first]
    assert len(children) == 6
    expected = children.groupby(children["params.loss.beta"].astype(float)).agg(
        runs=("run_id", "count"),
        **{f"{name}_{stat}": (f"metrics.{name}", stat)
           for name in SEEDS3_METRICS for stat in ("mean", "std", "count")},
    )
    assert sorted(table.index) == [1.0, 4.0]
    for column in expected:
        assert np.allclose(table.loc[expected.index, column], expected[column]), column
    for name in SEEDS3_METRICS:
        assert (table[f"{name}_count"] == 3).all(), name
    assert not {"test_nll_mean", "conditional_accuracy_mean"} & set(table.columns)
    assert (table["runs"] == 3).all() and (table["val_elbo_std"] > 0).all()
    best = expected["val_elbo_mean"].idxmax()  # chosen on validation
    assert table.loc[best, "rank"] == 1 and table.loc[best, "ties_best"] == "best"
    other = table.loc[[b for b in table.index if b != best][0]]
    gap = abs(other["val_elbo_mean"] - table.loc[best, "val_elbo_mean"])
    within = gap <= max(other["val_elbo_std"], table.loc[best, "val_elbo_std"])
    assert other["ties_best"] == ("yes" if within else "no")
    shown = (tmp / "results1" / "seeds3" / "report.md").read_text()
    row = table.loc[best]
    assert f"{row['val_elbo_mean']:.2f} ± {row['val_elbo_std']:.2f}" in shown
    assert f"{row['test_elbo_mean']:.2f} ± {row['test_elbo_std']:.2f}" in shown  # beside
    assert f"{row['test_nmi_mean']:.3f} ± {row['test_nmi_std']:.3f}" in shown
    # the collapse diagnostics beside them, with what they are
    assert f"{row['val_mi_mean']:.2f} ± {row['val_mi_std']:.2f}" in shown
    assert "val MI (I(x; z), estimated on 128 validation images" in shown
    assert "![best_kl_per_dimension](best_kl_per_dimension.png)" in shown
    assert ": kl_per_dimension*" in shown  # its caption: the run, the picture


def test_a_grey_level_bce_report_ranks_on_validation_with_test_beside(store):
    tmp, _, runs, (first, _) = store
    children = runs[runs["tags.mlflow.parentRunId"] == first]
    assert set(children["params.data.binarize"]) == {"none"}
    assert set(children["params.loss.recon"]) == {"bce"}
    folder = tmp / "results1" / "seeds3"
    markdown = (folder / "report.md").read_text()
    assert "not a likelihood bound (grey-level pixels)" in markdown
    assert "Ranked on val ELBO, higher is better." in markdown
    assert "ranked on val_elbo (validation split" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| rank |"))
    labels = [cell.strip() for cell in header.strip("|").split("|")]
    for label in ("val ELBO", "test ELBO", "test reconstruction", "test KL (nats)",
                  "val active units", "val MI (nats)", "val NMI", "test NMI",
                  "ties best (val_elbo)"):
        assert label in labels, label
    assert labels.index("val ELBO") < labels.index("test ELBO")
    assert "test NLL (nats)" not in labels  # no estimate on grey-level pixels
    columns = list(pd.read_csv(folder / "leaderboard.csv").columns)
    for name in ("val_elbo", "test_elbo", "test_recon", "test_kl", "test_nmi"):
        assert {f"{name}_mean", f"{name}_std", f"{name}_count"} <= set(columns), name
    assert columns.index("val_elbo_mean") < columns.index("test_elbo_mean")
    assert "not a likelihood bound (grey-level pixels)" in (folder / "report.html").read_text()


def test_report_covers_the_latest_invocation_unless_all(store, capsys):
    tmp, uri, _, _ = store
    latest = tmp / "latest"
    assert main(["report", "seeds3", "--tracking-uri", uri, "--results-dir", str(latest)]) == 0
    table = pd.read_csv(latest / "seeds3" / "leaderboard.csv")
    assert table["runs"].tolist() == [1] and table["val_elbo_std"].isna().all()
    assert table["test_elbo_std"].isna().all()
    assert "single run show no spread" in (latest / "seeds3" / "report.md").read_text()
    every = tmp / "every"
    assert main(["report", "seeds3", "--tracking-uri", uri, "--results-dir", str(every),
                 "--all", "--metric", "mean_epoch_seconds"]) == 0
    table = pd.read_csv(every / "seeds3" / "leaderboard.csv").set_index("loss.beta")
    assert table.loc[1.0, "runs"] == 4 and table.loc[4.0, "runs"] == 3
    assert table["mean_epoch_seconds_mean"].idxmin() == table["rank"].idxmin()
    assert "ties best (mean_epoch_seconds)" in (every / "seeds3" / "report.md").read_text()
    assert "report:" in capsys.readouterr().out


# --- end to end: a cvae beside an mlp ------------------------------------------------------


def run_grid_text(tmp_path: Path, text: str, mnist_root: Path) -> tuple[str, Path]:
    """``vaebench run`` of a grid file with ``text`` into a new store: (its URI, results)."""
    name = text.split("name: ", 1)[1].split()[0]
    grid = tmp_path / f"{name}.yaml"
    grid.write_text(text)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = tmp_path / "results"
    assert main(["run", str(grid), "--tracking-uri", uri, "--data-root", str(mnist_root),
                 "--results-dir", str(results)]) == 0
    return uri, results


def test_a_cvae_and_an_mlp_are_ranked_in_different_groups(tmp_path, mnist_root):
    uri, results = run_grid_text(tmp_path, CONDITIONAL_GRID, mnist_root)
    folder = results / "bounds"
    table = pd.read_csv(folder / "leaderboard.csv").set_index("model.arch")
    assert sorted(table.index) == ["cvae", "mlp"]
    assert table.loc["mlp", "compared_within"] == "likelihood_of=p(x)"
    assert table.loc["cvae", "compared_within"] == "likelihood_of=p(x|y)"
    assert table["rank"].tolist() == [1, 1]
    assert table["ties_best"].tolist() == ["best", "best"]
    assert table["val_elbo_count"].tolist() == [1, 1]
    assert table["test_elbo_count"].tolist() == [1, 1]  # shown beside, each in its group
    assert table.loc["cvae", "test_nmi_count"] == 0  # a cvae's clusters are not scored
    assert table.loc["mlp", "test_nmi_count"] == 1
    assert table.loc["cvae", "conditional_accuracy_count"] == 1
    markdown = (folder / "report.md").read_text()
    assert "Runs with different likelihood_of are ranked apart" in markdown
    assert "cvae runs are given the label: their ELBO bounds log p(x|y)" in markdown
    assert "## Best variant, among likelihood_of=p(x):" in markdown
    assert "## Best variant, among likelihood_of=p(x|y):" in markdown
    assert any(p.name.startswith("best_p-x-y-_") for p in folder.iterdir())


# CONDITIONAL_GRID's runs as two MLP variants, one epoch, chosen on validation NMI
SELECTING_GRID = CONDITIONAL_GRID.replace("name: bounds", "name: selecting").replace(
    "epochs: 2", "epochs: 1").split("include:")[0] + (
    "matrix:\n  loss.beta: [1, 8]\nseeds: [0]\nselect: val_nmi\n")


def test_a_grid_file_selects_what_its_report_ranks_and_registers_on(tmp_path, mnist_root):
    """``select: val_nmi``: the run's report ranks on it, the registered model is the run with
    the best val_nmi (whichever has the better ELBO), and ``report`` ranks on it unless told."""
    uri, results = run_grid_text(tmp_path, SELECTING_GRID, mnist_root)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["selecting"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent["tags.vaebench.select"] == "val_nmi"
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    best = children.loc[children["metrics.val_nmi"].idxmax()]
    (version,) = MlflowClient(uri).search_model_versions("name='selecting'")
    assert version.run_id == best["run_id"]
    assert version.tags["vaebench.selected_on"] == "val_nmi"
    table = pd.read_csv(results / "selecting" / "leaderboard.csv")
    assert table.loc[table["rank"] == 1, "loss.beta"].item() == float(best["params.loss.beta"])
    again = make_report("selecting", uri, tmp_path / "again")
    assert again.metric.name == "val_nmi" and again.best_runs[0].run_id == best["run_id"]
    assert make_report("selecting", uri, tmp_path / "told", metric="val_elbo").metric.name == (
        "val_elbo")


# --- real browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui(store):
    """One ``mlflow server`` on the store for the browser tests; its base URL."""
    tmp, uri, _, _ = store
    with mlflow_server(uri, tmp / "server.log") as url:
        yield url


def test_mlflow_ui_shows_the_runs_nested_under_their_grid(store, ui, browser):
    _, uri, runs, (first, _) = store
    children = runs[runs["tags.mlflow.parentRunId"] == first]
    parent_name = runs.loc[runs["run_id"] == first, "tags.mlflow.runName"].item()
    experiment = runs["experiment_id"].iloc[0]
    browser.set_window_size(2200, 1000)  # the Models column beside MLflow's assistant panel
    try:
        _check_runs_table(browser, ui, uri, first, children, parent_name, experiment)
    finally:
        browser.set_window_size(1600, 1000)


def _check_runs_table(browser, ui, uri, first, children, parent_name, experiment):
    """The grid's runs nested under their parent, each child's Dataset, Source and Models
    cells; then the screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)

    def link(name: str):
        return browser.find_elements(By.XPATH, f"//a[normalize-space()='{name}']")

    browser.get(f"{ui}/#/experiments/{experiment}/runs")
    wait.until(lambda _: link(parent_name))
    assert not any(link(name) for name in children["tags.mlflow.runName"])  # collapsed
    row = link(parent_name)[0].find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
    row.find_element(By.XPATH, ".//button").click()  # the expander beside the name
    wait.until(lambda _: all(link(name) for name in children["tags.mlflow.runName"]))
    parent_x = link(parent_name)[0].location["x"]
    for name in children["tags.mlflow.runName"]:
        assert link(name)[0].location["x"] > parent_x, f"{name} is not indented"
    # the Dataset, Source and Models columns of each child's row
    client = MlflowClient(uri)
    (version,) = [v for v in client.search_model_versions("name='seeds3'")
                  if v.tags["vaebench.invocation"] == first]
    for run_id, name in zip(children["run_id"], children["tags.mlflow.runName"],
                            strict=True):
        row = link(name)[0].find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
        cells = {
            column: browser.find_element(
                By.CSS_SELECTOR,
                f"[role='row'][row-index='{row.get_attribute('row-index')}'] "
                f"[col-id='attributes.`{column}`']",
            ).text
            for column in ("Dataset", "Source", "Models")
        }
        inputs = client.get_run(run_id).inputs.dataset_inputs
        train = next(i.dataset for i in inputs if i.dataset.name == "mnist-train")
        assert cells["Dataset"].startswith(f"mnist-train ({train.digest})"), cells
        assert cells["Source"] == "vaebench"
        assert cells["Models"] == ("model" if run_id == version.run_id else "-"), cells
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOTS / "mlflow-ui.png"))


def test_mlflow_ui_lists_the_registered_models_versions(store, ui, browser):
    """Each invocation registered the grid's best run: the registered model's page lists
    both versions, and a version's page links back to its run."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, uri, runs, _ = store
    versions = MlflowClient(uri).search_model_versions("name='seeds3'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    wait = WebDriverWait(browser, 60)

    def links(text: str):
        return browser.find_elements(By.XPATH, f"//a[normalize-space()='{text}']")

    browser.get(f"{ui}/#/models/seeds3")
    wait.until(lambda _: links("Version 1") and links("Version 2"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOTS / "mlflow-registered-model.png"))
    newest = max(versions, key=lambda v: int(v.version))
    name = runs.loc[runs["run_id"] == newest.run_id, "tags.mlflow.runName"].item()
    links("Version 2")[0].click()
    wait.until(lambda _: links(name))  # the version's source run


def test_report_html_images_all_load_in_the_browser(store, browser):
    tmp, _, _, _ = store
    page = tmp / "results1" / "seeds3" / "report.html"
    browser.get(page.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
    )
    assert len(images) == len(FIGURES | PICTURES)
    for alt, complete, width in images:
        assert complete and width > 0, alt
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1400, 4000)
    assert browser.save_screenshot(str(SCREENSHOTS / "report.png"))
    browser.set_window_size(1600, 1000)


def test_report_tsne_draws_the_best_runs_latent_means(store):
    tmp, uri, _, _ = store
    folder = tmp / "tsne"
    assert main(["report", "seeds3", "--tracking-uri", uri, "--results-dir", str(folder),
                 "--all", "--tsne"]) == 0
    drawn = folder / "seeds3" / "best_latent_tsne.png"
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](best_latent_tsne.png)" in (folder / "seeds3" / "report.md").read_text()


def test_latent_pictures_pca_matches_scikit_learn_and_tsne_is_on_request():
    from sklearn.decomposition import PCA

    from vaebench.plots import embed_2d

    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    coords, name = embed_2d(points)
    assert name == "PCA"
    assert np.allclose(coords, PCA(n_components=2).fit_transform(points), atol=1e-8)
    coords, name = embed_2d(points, "tsne")
    assert name == "t-SNE" and coords.shape == (300, 2)
    line, name = embed_2d(points[:, :1], "tsne")  # one latent dimension: on a line
    assert name == "PCA" and np.all(line[:, 1] == 0)


@pytest.mark.parametrize(("selects", "expected"), [
    (["val_nmi"], "val_nmi"),
    (["val_nmi", "val_elbo"], "val_elbo"),  # the latest invocation's file decides
    (["val_elbo", "val_nmi"], "val_nmi"),
    (["val_nmi", None], "val_elbo"),  # an invocation from before select: the default
    (["val_nmi", "test_nmi"], "val_elbo"),  # a tag a report cannot rank on: the default
    (None, "val_elbo"),  # no parent run carries the tag
])
def test_a_report_ranks_on_the_select_of_the_latest_invocation(selects, expected):
    """``parents`` are sorted by start time (``run_set_from_frame``)."""
    parents = pd.DataFrame({"run_id": ["p1", "p2"][: len(selects or [0])]})
    if selects is not None:
        parents[f"tags.{SELECT_TAG}"] = selects
    run_set = RunSet("g", "1", "sqlite://", parents, pd.DataFrame(), [])
    assert report.chosen_metric(run_set) == expected


def test_the_best_of_an_invocation_is_chosen_on_its_grids_select(tmp_path):
    """What registration takes without a report (``run --no-report``): two finished runs of a
    real store, one better on val_elbo, the other on val_nmi; the parent run's select decides
    unless a metric is named."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("picked")
    parent = client.create_run(experiment, tags={SELECT_TAG: "val_nmi"}).info.run_id
    ids = {}
    for beta, elbo, nmi in ((1, -100.0, 0.30), (4, -120.0, 0.45)):
        run = client.create_run(experiment, run_name=f"b{beta}",
                                tags={"mlflow.parentRunId": parent})
        ids[beta] = run.info.run_id
        client.log_param(ids[beta], "loss.beta", beta)
        client.log_param(ids[beta], "seed", 0)
        for name, value in (("val_elbo", elbo), ("val_nmi", nmi), ("test_elbo", elbo)):
            client.log_metric(ids[beta], name, value)
        client.set_terminated(ids[beta], "FINISHED")
    client.set_terminated(parent, "FINISHED")
    (chosen,) = report.best_of_invocation(uri, "picked", parent)
    assert (chosen.run_id, chosen.selected_on) == (ids[4], "val_nmi")
    (told,) = report.best_of_invocation(uri, "picked", parent, "val_elbo")
    assert (told.run_id, told.selected_on) == (ids[1], "val_elbo")
