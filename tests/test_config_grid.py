"""Grid files: loading, validation errors (one line each, naming file and key), expansion, CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vaebench.models
import vaebench.spec.config
from vaebench.cli import main
from vaebench.spec.config import ConfigError, RunConfig
from vaebench.spec.grid import GridSpec, expand, load_grid, run_key
from vaebench.spec.yaml_file import read_yaml

DESIGN_GRID = """\
name: design
base:
  data: {subset: 500}
  train: {epochs: 1, batch_size: 64}
matrix:
  model.arch: [mlp, conv]
  loss.recon: [bce, mse]
  optim.name: [adam, rmsprop]
  loss.beta: [1, 4]
exclude:
  - {model.arch: conv, loss.recon: mse}
include:
  - {model.arch: mlp, loss.recon: bce, optim.name: adam, loss.beta: 1, model.z_dim: 2}
seeds: [0, 1]
"""


def write_grid(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_grid(path)
    problems = info.value.problems
    assert problems, "ConfigError without problems"
    assert str(info.value) == "\n".join(problems)
    return problems


def matching(problems: list[str], path: Path, key: str, *fragments: str) -> list[str]:
    """Lines that start with the file, name ``key`` right after it, and contain ``fragments``."""
    return [
        line
        for line in problems
        if line.startswith(f"{path}: {key}:") and all(f in line for f in fragments)
    ]


# ---------------------------------------------------------------------------
# a valid DESIGN-style grid


@pytest.fixture
def design_grid(tmp_path: Path) -> GridSpec:
    return load_grid(write_grid(tmp_path, DESIGN_GRID))


def test_load_grid_reads_every_section(design_grid: GridSpec, tmp_path: Path) -> None:
    assert design_grid.name == "design"
    assert design_grid.source == str(tmp_path / "grid.yaml")
    assert list(design_grid.matrix) == ["model.arch", "loss.recon", "optim.name", "loss.beta"]
    assert design_grid.exclude == [{"model.arch": "conv", "loss.recon": "mse"}]
    assert len(design_grid.include) == 1
    assert design_grid.seeds == [0, 1]


def test_expand_counts_names_and_unique_keys(design_grid: GridSpec) -> None:
    runs = expand(design_grid)
    assert len(runs) == ((16 - 4) + 1) * 2 == 26
    names = [run.name for run in runs]
    assert "mlp-bce-adam-b4-s0" in names
    assert "mlp-bce-adam-b1-z2-s1" in names  # the include, named by its extra setting
    assert len(set(names)) == len(names)
    assert len({run.key for run in runs}) == len(runs)
    # excluded combinations are gone, kept ones are there
    assert not any(n.startswith("conv-mse-") for n in names)
    assert "conv-bce-rmsprop-b1-s1" in names
    assert "mlp-mse-rmsprop-b4-s1" in names


def test_expand_applies_overrides_to_each_config(design_grid: GridSpec) -> None:
    for run in expand(design_grid):
        assert isinstance(run.config, RunConfig)
        overrides = dict(run.overrides)
        assert run.config.model.arch == overrides["model.arch"]
        assert run.config.loss.recon == overrides["loss.recon"]
        assert run.config.optim.name == overrides["optim.name"]
        assert run.config.loss.beta == float(overrides["loss.beta"])
        assert run.config.model.z_dim == overrides.get("model.z_dim", 20)
        # base settings survive in every run
        assert run.config.data.subset == 500
        assert run.config.train.epochs == 1
        assert run.config.train.batch_size == 64
        assert run.name.endswith(f"-s{run.config.seed}")
        assert run.params["loss.beta"] == run.config.loss.beta
        assert run.key == run_key(run.config)

    by_name = {run.name: run for run in expand(design_grid)}
    extra = by_name["mlp-bce-adam-b1-z2-s0"].config
    assert (extra.model.arch, extra.model.z_dim, extra.loss.beta, extra.seed) == ("mlp", 2, 1.0, 0)
    b4 = by_name["mlp-bce-adam-b4-s0"].config
    assert (b4.model.arch, b4.loss.recon, b4.optim.name) == ("mlp", "bce", "adam")
    assert b4.loss.beta == 4.0


def test_keys_are_stable_and_depend_on_seed(design_grid: GridSpec, tmp_path: Path) -> None:
    first = [(run.name, run.key) for run in expand(design_grid)]
    again = [(run.name, run.key) for run in expand(design_grid)]
    reloaded = [(run.name, run.key) for run in expand(load_grid(tmp_path / "grid.yaml"))]
    assert first == again == reloaded

    by_name = dict(first)
    assert by_name["mlp-bce-adam-b4-s0"] != by_name["mlp-bce-adam-b4-s1"]
    config = expand(design_grid)[0].config
    reseeded = config.model_copy(update={"seed": config.seed + 1})
    assert run_key(reseeded) != run_key(config)
    assert run_key(config.model_copy()) == run_key(config)


def test_settings_added_later_keep_the_keys_of_runs_stored_before_them() -> None:
    # the keys vaebench 3aff946 (before model.dense and loss.kl_c) gave these configs
    capacity = {"model": {"arch": "gumbel", "backbone": "conv"}, "loss": {"objective": "capacity"}}
    assert run_key(RunConfig()) == "00f0e8baf9a926e3"
    assert run_key(RunConfig.model_validate({**capacity, "seed": 3})) == "2053147b034b7c3b"
    # away from the value that reproduces the old runs, a new setting is in the key
    assert run_key(RunConfig.model_validate({"model": {"dense": [64]}})) != "00f0e8baf9a926e3"
    assert run_key(RunConfig.model_validate({"loss": {"kl_c": "batch_marginal"}})) != (
        "00f0e8baf9a926e3"
    )
    iwae = {"loss": {"objective": "iwae", "iwae_k": 5}}
    assert run_key(RunConfig.model_validate(iwae)) != run_key(
        RunConfig.model_validate({"loss": {"objective": "iwae"}}))


def test_grid_without_matrix_is_one_run_per_seed(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "name: single\nseeds: [3, 7]\n")
    runs = expand(load_grid(path))
    assert [run.name for run in runs] == ["s3", "s7"]
    assert [run.config.seed for run in runs] == [3, 7]


def test_grid_of_includes_alone_runs_just_those(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path, "name: g\ninclude:\n  - {loss.beta: 2}\n  - {loss.beta: 3}\nseeds: [0]\n"
    )
    runs = expand(load_grid(path))
    assert [run.name for run in runs] == ["b2-s0", "b3-s0"]
    assert [run.config.loss.beta for run in runs] == [2.0, 3.0]


def test_boolean_axis_reads_as_flag(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "name: g\nmatrix:\n  model.batch_norm: [true, false]\n")
    runs = expand(load_grid(path))
    assert [run.name for run in runs] == ["bn-s0", "nobn-s0"]
    assert [run.config.model.batch_norm for run in runs] == [True, False]


def test_distinct_runs_that_read_the_same_get_their_key_appended(tmp_path: Path) -> None:
    # "/" and " " are dropped from names, so these two different configs read alike
    path = write_grid(
        tmp_path,
        """\
        name: g
        include:
          - {optim.kwargs: {tag: "a/b"}}
          - {optim.kwargs: {tag: "a_b"}}
        """,
    )
    runs = expand(load_grid(path))
    assert len(runs) == 2
    assert runs[0].key != runs[1].key
    assert len({run.name for run in runs}) == 2
    for run in runs:
        assert run.name.endswith(f"-{run.key[:6]}")
        assert "/" not in run.name


# ---------------------------------------------------------------------------
# validation errors: one line per problem, naming the file and the dotted key

BAD_GRIDS = {
    "unknown-top-level-key": (
        "name: g\nmodels: {}\n",
        "models",
        ("unknown key", "valid: name, base, matrix"),
    ),
    "unknown-key-in-section": (
        "name: g\nbase:\n  train: {epoch: 3}\n",
        "base.train.epoch",
        ("unknown key", "train.epochs", "train.batch_size"),
    ),
    "unknown-section": (
        "name: g\nbase:\n  trainer: {epochs: 3}\n",
        "base.trainer",
        ("unknown key", "valid sections", "model"),
    ),
    "wrong-type": (
        "name: g\nbase:\n  train: {epochs: ten}\n",
        "base.train.epochs",
        ("integer",),
    ),
    "epochs-range": ("name: g\nbase:\n  train: {epochs: 0}\n", "base.train.epochs", ("1",)),
    "lr-range": ("name: g\nbase:\n  optim: {lr: 0}\n", "base.optim.lr", ("greater than 0",)),
    "beta-range": ("name: g\nbase:\n  loss: {beta: -0.5}\n", "base.loss.beta", ("0",)),
    "z_dim-range": ("name: g\nbase:\n  model: {z_dim: 0}\n", "base.model.z_dim", ("1",)),
    "batch_size-range": (
        "name: g\nbase:\n  train: {batch_size: 0}\n",
        "base.train.batch_size",
        ("1",),
    ),
    "empty-matrix-axis": ("name: g\nmatrix:\n  loss.beta: []\n", "matrix.loss.beta", ("empty",)),
    "matrix-axis-not-a-list": (
        "name: g\nmatrix:\n  loss.beta: 4\n",
        "matrix.loss.beta",
        ("list",),
    ),
    "matrix-unknown-key": (
        "name: g\nmatrix:\n  model.depth: [1, 2]\n",
        "matrix.model.depth",
        ("unknown key", "model.z_dim"),
    ),
    "matrix-unknown-section": (
        "name: g\nmatrix:\n  trainer.epochs: [1, 2]\n",
        "matrix.trainer.epochs",
        ("unknown key", "valid sections"),
    ),
    "matrix-bad-value": (
        "name: g\nmatrix:\n  loss.beta: [1, 2, -1]\n",
        "matrix.loss.beta[2]",
        ("0",),
    ),
    "matrix-bad-model-value": (
        "name: g\nmatrix:\n  model.arch: [mlp, resnet]\n",
        "matrix.model.arch[1]",
        ("unknown model 'resnet'", "mlp", "conv"),
    ),
    "unknown-model": (
        "name: g\nbase:\n  model: {arch: resnet}\n",
        "base.model.arch",
        ("unknown model 'resnet'; valid: mlp, conv, gumbel, cvae",),
    ),
    "unknown-optimizer": (
        "name: g\nbase:\n  optim: {name: sgd}\n",
        "base.optim.name",
        ("adam", "rmsprop"),
    ),
    "unknown-recon-loss": (
        "name: g\nbase:\n  loss: {recon: l1}\n",
        "base.loss.recon",
        ("bce", "mse"),
    ),
    "include-bad-value": (
        "name: g\ninclude:\n  - {train.epochs: 0}\n",
        "include[0].train.epochs",
        ("1",),
    ),
    "include-unknown-key": (
        "name: g\ninclude:\n  - {loss.delta: 1}\n",
        "include[0].loss.delta",
        ("unknown key", "loss.beta"),
    ),
    "repeated-seed": ("name: g\nseeds: [0, 1, 0]\n", "seeds", ("repeated seed",)),
    "seeds-not-integers": ("name: g\nseeds: [a, 1]\n", "seeds", ("integers",)),
    "exclude-not-an-axis": (
        "name: g\nmatrix:\n  model.arch: [mlp, conv]\nexclude:\n  - {optim.name: adam}\n",
        "exclude[0].optim.name",
        ("not a matrix axis",),
    ),
    "missing-name": ("base:\n  train: {epochs: 1}\n", "name", ("required",)),
    "name-with-path-separator": ("name: a/b\n", "name", ("path separators",)),
    "name-with-quote": ("name: it's\n", "name", ("must not contain quotes",)),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS), ids=list(BAD_GRIDS))
def test_each_validation_error_names_file_and_key(tmp_path: Path, case: str) -> None:
    text, key, fragments = BAD_GRIDS[case]
    path = write_grid(tmp_path, text)
    problems = problems_of(path)
    assert matching(problems, path, key, *fragments), problems
    assert all(line.startswith(f"{path}: ") for line in problems)
    assert all("\n" not in line for line in problems)


def test_yaml_syntax_error_reports_line_number(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "name: g\nbase:\n  train: epochs: 1\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: line 3: YAML syntax error")


def test_grid_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "- just\n- a list\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: ") and "mapping" in problems[0]


def test_missing_grid_file_is_a_user_error(tmp_path: Path) -> None:
    from vaebench.spec.config import VaebenchError

    path = tmp_path / "nope.yaml"
    with pytest.raises(VaebenchError, match="nope.yaml: cannot read"):
        load_grid(path)


def test_duplicate_runs_are_reported(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path,
        """\
        name: g
        matrix:
          model.arch: [mlp, conv]
          loss.beta: [1, 4]
        include:
          - {model.arch: conv, loss.beta: 4}
        """,
    )
    grid = load_grid(path)  # the file itself is well formed
    with pytest.raises(ConfigError) as info:
        expand(grid)
    problems = info.value.problems
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: duplicate run: ")
    assert "conv-b4-s0" in problems[0]


def test_include_equal_to_base_default_is_a_duplicate(tmp_path: Path) -> None:
    # setting a value the matrix run already has, via a differently spelled include
    path = write_grid(
        tmp_path,
        """\
        name: g
        matrix:
          loss.beta: [1, 4]
        include:
          - {loss.beta: 1.0, model.z_dim: 20}
        seeds: [5]
        """,
    )
    with pytest.raises(ConfigError, match="duplicate run"):
        expand(load_grid(path))


def test_several_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path,
        """\
        name: g
        colour: blue
        base:
          train: {epochs: 0}
          optim: {name: sgd}
        matrix:
          loss.beta: [1, -1]
          model.depth: [2]
        seeds: [1, 1]
        select: test_nmi
        """,
    )
    problems = problems_of(path)
    assert len(problems) >= 3
    for key in ("colour", "base.train.epochs", "base.optim.name", "matrix.loss.beta[1]",
                "matrix.model.depth", "seeds", "select"):
        assert matching(problems, path, key), (key, problems)
    assert len(problems) == len(set(problems))


@pytest.mark.parametrize(("select", "fragment"), [
    ("test_nmi", "scored on the test split"),
    ("bogus", "'bogus': choose one of val_elbo, val_nmi"),
    ("val_mi", "'val_mi': choose one of val_elbo"),  # logged, but not what a report ranks on
    ("[val_nmi]", "['val_nmi']: choose one of val_elbo"),
    # a test metric whose validation twin a report does not rank on: what it does rank on
    ("test_accuracy", "select on one of val_elbo, val_nmi"),
])
def test_select_must_be_a_metric_a_report_ranks_on(tmp_path: Path, select: str, fragment: str):
    path = write_grid(tmp_path, f"name: g\nselect: {select}\n")
    assert matching(problems_of(path), path, "select", fragment)


@pytest.mark.parametrize(("axis", "why"), [
    ("model.arch: [mlp, cvae]", "cvae models do not report it"),
    ("data.validation: [0, 1000]", "data.validation is 0 (no validation split)"),
])
def test_select_must_be_logged_by_every_run(tmp_path: Path, axis: str, why: str) -> None:
    """A metric some runs do not log would fail their report only after the training."""
    path = write_grid(tmp_path, f"""\
        name: g
        base: {{train: {{epochs: 1}}}}
        matrix:
          {axis}
          loss.beta: [1, 4]
        select: val_nmi
        """)
    with pytest.raises(ConfigError) as info:
        expand(load_grid(path))
    assert len(info.value.problems) == 1
    assert matching(info.value.problems, path, "select", "val_nmi is not logged by 2 of 4 runs")
    assert f"{why}; select what every run logs" in info.value.problems[0]


def test_a_grid_without_validation_trains_where_its_file_leaves_select_unset(tmp_path: Path):
    """Its report and registration then say why they have nothing to rank (docs/tracking.md)."""
    path = write_grid(tmp_path, "name: g\nbase: {data: {validation: 0}}\nmatrix:\n"
                                "  loss.beta: [1, 4]\n")
    assert len(expand(load_grid(path))) == 2
    named = write_grid(tmp_path, "name: g\nbase: {data: {validation: 0}}\nselect: val_elbo\n")
    with pytest.raises(ConfigError, match="select: val_elbo is not logged by 1 of 1 runs"):
        expand(load_grid(named))


def test_select_of_a_metric_every_run_logs(tmp_path: Path) -> None:
    path = write_grid(tmp_path, "name: g\nmatrix:\n  model.arch: [mlp, conv]\nselect: val_nmi\n")
    assert len(expand(load_grid(path))) == 2
    path = write_grid(tmp_path, "name: g\nmatrix:\n  model.arch: [mlp, cvae]\n")  # val_elbo
    assert len(expand(load_grid(path))) == 2


def test_select_defaults_to_the_validation_elbo(tmp_path: Path) -> None:
    assert load_grid(write_grid(tmp_path, "name: g\n")).select == "val_elbo"
    assert load_grid(write_grid(tmp_path, "name: g\nselect: val_nmi\n")).select == "val_nmi"


# ---------------------------------------------------------------------------
# the command line


def test_cli_run_on_invalid_grid_tracks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = write_grid(
        tmp_path, "name: g\nbogus: 1\nbase:\n  train: {epochs: 0}\n", name="bad.yaml"
    )
    db = tmp_path / "mlflow.db"
    status = main(["run", str(bad), "--tracking-uri", f"sqlite:///{db}"])
    out, err = capsys.readouterr()
    assert status == 2
    lines = err.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("vaebench: error: ") for line in lines)
    assert any(f"{bad}: bogus:" in line for line in lines)
    assert any(f"{bad}: base.train.epochs:" in line for line in lines)
    assert "Traceback" not in err
    assert not db.exists()
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "results").exists()


def test_cli_run_duplicate_runs_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    text = "name: g\nmatrix:\n  loss.beta: [1]\ninclude:\n  - {loss.beta: 1}\n"
    path = write_grid(tmp_path, text)
    db = tmp_path / "mlflow.db"
    status = main(["run", str(path), "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("vaebench: error: ") and "duplicate run" in err
    assert "Traceback" not in err
    assert not db.exists()


def test_cli_dry_run_lists_runs_and_tracks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_grid(tmp_path, DESIGN_GRID)
    db = tmp_path / "mlflow.db"
    status = main(["run", str(path), "--dry-run", "--tracking-uri", f"sqlite:///{db}"])
    out, err = capsys.readouterr()
    assert status == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith("26 runs, ") and "stacks" in lines[0]
    assert len(lines) == 27
    for run in expand(load_grid(path)):
        assert any(run.name in line and run.key in line for line in lines[1:]), run.name
    assert "mlp-bce-adam-b4-s0" in out
    assert not db.exists()
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "results").exists()


def test_dry_run_answers_without_importing_torch_or_mlflow(tmp_path: Path) -> None:
    """What keeps ``--dry-run`` instant: it stops before the heavy libraries load (torch
    only to resolve ``train.device: auto`` for conv runs, which this grid has none of)."""
    path = write_grid(tmp_path, DESIGN_GRID.replace("model.arch: [mlp, conv]", "model.arch: [mlp]"))
    script = textwrap.dedent(
        f"""
        import sys
        from vaebench.cli import main
        assert main(["run", {str(path)!r}, "--dry-run", "--stack", "auto"]) == 0
        heavy = sorted({{"torch", "mlflow", "optuna", "pandas", "matplotlib"}} & set(sys.modules))
        print("heavy:", heavy)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "s1/" in done.stdout  # the stacks were planned
    assert done.stdout.strip().endswith("heavy: []")


SHIPPED = sorted(
    path
    for path in (Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")
    if "space" not in read_yaml(path)  # study files for `vaebench tune`: see test_tune.py
)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_experiment_validates_and_expands(path: Path) -> None:
    runs = expand(load_grid(path))
    assert runs and len({r.key for r in runs}) == len(runs)
    assert len({r.name for r in runs}) == len(runs)


def test_shipped_experiment_sizes() -> None:
    sizes = {p.stem: len(expand(load_grid(p))) for p in SHIPPED}
    assert sizes["quick"] == 16
    assert sizes["reference"] == 3
    assert sizes["grid"] == 48
    assert sizes["clustering"] == 14
    assert sizes["likelihood"] == 2
    assert sizes["gumbel"] == sizes["jointvae"] == sizes["gmvae"] == 3


def test_names_lead_with_the_family_when_the_grid_mixes_families(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path,
        "name: g\nbase: {model: {arch: gumbel}}\n"
        "matrix:\n  model.backbone: [mlp, conv]\n  model.tau: [0.5, [1.0, 0.5]]\n"
        "include:\n  - {model.arch: cvae}\n",
    )
    names = [run.name for run in expand(load_grid(path))]
    assert names == [
        "gumbel-mlp-tau0.5-s0", "gumbel-mlp-tau1to0.5-s0",
        "gumbel-conv-tau0.5-s0", "gumbel-conv-tau1to0.5-s0", "cvae-s0",
    ]


# ---------------------------------------------------------------------------
# module boundaries: reading config, grid and study files needs no torch


def test_config_names_every_model_family() -> None:
    """A family registered in vaebench.models must be named in vaebench.spec.config.ARCHS."""
    assert set(vaebench.models.MODELS) == set(vaebench.spec.config.ARCHS)


HEAVY = ("torch", "vaebench.models", "vaebench.training", "mlflow", "optuna")


@pytest.mark.parametrize(
    "module",
    [f"vaebench.spec.{name}" for name in ("config", "grid", "study", "catalogue")],
)
def test_light_modules_import_nothing_heavy(module: str) -> None:
    # validating every family checks that model.arch needs no import of vaebench.models
    code = (
        f"import sys, {module}\n"
        "from vaebench.spec.config import ARCHS, RunConfig\n"
        "for arch in ARCHS:\n"
        "    RunConfig.model_validate({'model': {'arch': arch}})\n"
        f"print(*[name for name in {HEAVY!r} if name in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "", f"importing {module} imports {out.stdout.strip()}"
