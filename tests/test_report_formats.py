"""``report --format latex|markdown|csv``: the leaderboard as a table for a paper, with the
published figures of vaebench/reporting/literature.csv beside a grid's rows.

The LaTeX table's structure is checked (one tabular with booktabs rules, balanced braces, no
unescaped special character, the same number of cells in every row and one row per variant),
and where a LaTeX engine is installed (tests/run.sh installs Debian's texlive-latex-base and
texlive-latex-recommended) pdflatex compiles it in a minimal document.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from test_report import search_frame

from vaebench import cli
from vaebench.cli import main
from vaebench.reporting.formats import (
    FORMATS,
    latex_escape,
    markdown_escape,
    render_csv,
    render_latex,
    render_markdown,
)
from vaebench.reporting.literature import ESTIMATOR_NAMES, SETTINGS, load_literature
from vaebench.reporting.paper_table import Group, PaperTable, Row, paper_table
from vaebench.reporting.runs import METRICS, run_set_from_frame
from vaebench.reporting.table import leaderboard
from vaebench.spec.config import VaebenchError

LATEX_SPECIALS = set("&%$#_^~{}")


def latex_problems(text: str, allowed: str = "") -> list[str]:
    """What would stop ``text`` from compiling as the body of a cell or a paragraph: an
    unbalanced brace or a special character (& % $ # _ ^ ~) that is not escaped, but for the
    ``allowed`` ones (the & between cells)."""
    problems, depth, i = [], 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\":  # a command (letters) or an escaped character
            command = re.match(r"\\([A-Za-z]+|.)", text[i:])
            i += len(command.group(0)) if command else 1
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                problems.append(f"unbalanced }} at {i}")
                depth = 0
        elif char in LATEX_SPECIALS and char not in allowed:
            problems.append(f"unescaped {char!r} at {i}")
        i += 1
    return problems + (["unclosed {"] if depth else [])


def latex_rows(text: str) -> list[list[str]]:
    """The tabular's rows (lines ending in \\\\), split into cells on unescaped &."""
    body = text.split("\\begin{tabular}", 1)[1].split("\\end{tabular}", 1)[0]
    return [re.split(r"(?<!\\)&", line.removesuffix(r"\\").strip())
            for line in body.splitlines() if line.rstrip().endswith("\\\\")]


def row_width(cells: list[str]) -> int:
    spanned = re.match(r"\s*\\multicolumn\{(\d+)\}", cells[0])
    return int(spanned.group(1)) if spanned and len(cells) == 1 else len(cells)


def check_latex(text: str, width: int) -> list[list[str]]:
    for environment in ("\\begin{tabular}", "\\end{tabular}", "\\toprule", "\\bottomrule"):
        assert text.count(environment) == 1, environment
    assert "\\midrule" in text
    assert text.index("\\toprule") < text.index("\\midrule") < text.index("\\bottomrule")
    code = "\n".join(line for line in text.splitlines() if not line.startswith("%"))
    assert latex_problems(code, allowed="&") == []  # a & too many: a row too wide, below
    rows = latex_rows(text)
    assert [row_width(cells) for cells in rows] == [width] * len(rows)
    return rows


PDFLATEX = shutil.which("pdflatex")


def _booktabs_installed() -> bool:
    kpsewhich = shutil.which("kpsewhich")
    found = kpsewhich and subprocess.run([kpsewhich, "booktabs.sty"], capture_output=True)
    return bool(found and found.returncode == 0)


needs_latex = pytest.mark.skipif(
    not (PDFLATEX and _booktabs_installed() and shutil.which("dvi2tty")),
    reason="no pdflatex, booktabs or dvi2tty (tests/run.sh installs texlive-latex-base and "
           "texlive-latex-recommended)")
MINIMAL_DOCUMENT = r"""\documentclass{article}
\usepackage{booktabs}
\begin{document}
\input{table}
\end{document}
"""


def compile_latex(table: str, folder: Path, *options: str) -> subprocess.CompletedProcess:
    """pdflatex on a minimal document that inputs ``table`` (what the table's first line says
    it needs: booktabs), stopping at the first error."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.tex").write_text(table)
    (folder / "paper.tex").write_text(MINIMAL_DOCUMENT)
    return subprocess.run(
        [PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", *options, "paper.tex"],
        cwd=folder, capture_output=True, text=True, timeout=60,
    )


def typeset_text(table: str, folder: Path) -> str:
    """The text of the compiled page (a DVI file read back by dvi2tty): what a reader sees."""
    done = compile_latex(table, folder, "-output-format=dvi")
    assert done.returncode == 0, done.stdout[-2000:]
    return subprocess.run(["dvi2tty", "-w132", "paper.dvi"], cwd=folder, capture_output=True,
                          text=True, check=True, timeout=60).stdout


def assert_compiles(table: str, folder: Path) -> None:
    done = compile_latex(table, folder)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (folder / "paper.pdf").stat().st_size > 1000


# --- a likelihood grid, read back from a hand-made search_runs table ---------------------


def nll_run(name: str, seed: int, elbo: float, nll: float, images: str = "null",
            samples: str = "5000", binarize: str = "dynamic", **params: str) -> dict:
    return {"tags.mlflow.runName": f"{name}-s{seed}", "params.seed": str(seed),
            "params.model.arch": "mlp", "params.data.dataset": "mnist",
            "params.data.binarize": binarize, "params.loss.recon": "bce",
            "params.eval.iwae_samples": samples, "params.eval.iwae_images": images,
            "params.model.categories": "10", "metrics.val_elbo": elbo,
            "metrics.test_elbo": elbo + 1.0, "metrics.test_nll": nll,
            **{f"params.{key}": value for key, value in params.items()}}


LIKELIHOOD_RUNS = [
    *(nll_run("mlp_e50", seed, -99.0 - seed, 92.5 + seed / 10, **{"train.epochs": "50"})
      for seed in range(3)),
    nll_run("conv-e10-n1000", 0, -100.0, 90.8, images="1000", **{"train.epochs": "10"}),
]


def likelihood_table(rows=LIKELIHOOD_RUNS, metric: str = "val_elbo", columns=(),
                     literature: bool = True) -> PaperTable:
    run_set = run_set_from_frame(search_frame(rows), "likelihood", "1", "sqlite:///x.db")
    board = leaderboard(run_set, METRICS[metric])
    return paper_table(run_set, board, METRICS[metric], columns,
                       load_literature() if literature else None)


def test_latex_has_a_row_per_variant_and_the_burda_rows_beside_them():
    table = likelihood_table()
    text = render_latex(table)
    rows = check_latex(text, len(table.header))
    labels = [cells[0].strip() for cells in rows]
    assert labels[:3] == ["variant", r"mlp\_e50", "conv-e10-n1000"]
    assert rows[1][1].strip() == "3" and rows[2][1].strip() == "1"  # runs: the seeds
    assert r"\textbf{\ensuremath{-}100.00 \ensuremath{\pm} 1.00}" in rows[1][2]  # the best
    assert rows[1][4].strip() == r"92.60 \ensuremath{\pm} 0.10"  # test NLL, mean ± std
    assert rows[2][4].strip() == "90.80"  # one run: no spread shown
    published = [cells for cells in rows[3:]]
    assert [cells[0].split("(")[1].split(")")[0] for cells in published[:3]] == [
        "Burda et al. 2016"] * 3
    assert [cells[4].strip() for cells in published[:4]] == ["86.76", "85.54", "84.78", "89.78"]
    assert text.index("\\cmidrule") < text.index("Burda et al. 2016")
    assert "booktabs" in text.splitlines()[0]


def test_notes_say_where_the_published_setting_differs():
    table = likelihood_table()
    notes = {dict(table.notes)[row.note].split(":")[0]: dict(table.notes)[row.note]
             for group in table.groups for row in group.rows if row.published}
    burda = notes["Burda et al. 2016"]
    assert "Importance Weighted Autoencoders, ICLR 2016" in burda and "Table 1" in burda
    assert "The same as this grid's rows: dataset, binarization, estimator, " \
           "K (importance samples)." in burda
    assert "Not the same: test images: all there; 1,000 for conv-e10-n1000." in burda
    pythae = notes["Chadebec et al. 2022"]
    assert "The protocol is pythae's" in pythae
    assert "binarization: static there; dynamic for mlp_e50, conv-e10-n1000" in pythae
    assert "K (importance samples): 200 there; 5000 for mlp_e50, conv-e10-n1000" in pythae
    general = " ".join(text for marker, text in table.notes if not marker)
    assert "Mean ± sample standard deviation" in general and "not measured here" in general
    assert "upper bound on the NLL in expectation" in general


def test_a_grid_in_the_published_setting_has_no_difference_noted():
    rows = [nll_run("mlp", seed, -99.0, 92.0 + seed) for seed in range(2)]
    table = likelihood_table(rows, columns=("val_elbo", "test_nll"))
    burda = [table.note(row.note) for row in table.groups[0].rows if row.published][:3]
    assert len(burda) == 3 and not any("Not the same" in note for note in burda)
    assert table.header == ["variant", "runs", "val ELBO", "test NLL (nats)"]


def test_another_k_and_dataset_are_said_or_left_out():
    other_k = likelihood_table([nll_run("mlp", 0, -99.0, 95.0, samples="100")])
    notes = " ".join(text for _, text in other_k.notes)
    assert "K (importance samples): 5000 there; 100 for mlp" in notes
    fashion = nll_run("mlp", 0, -99.0, 95.0, **{"data.dataset": "fashion_mnist"})
    table = likelihood_table([fashion])
    assert not any(row.published for group in table.groups for row in group.rows)


def test_cluster_accuracy_is_compared_on_k_and_the_matching_of_clusters():
    def clustering(name: str, arch: str, categories: str, accuracy: float) -> dict:
        run = nll_run(name, 0, -99.0, 90.0, binarize="none", samples="0")
        return {**run, "params.model.arch": arch, "params.model.categories": categories,
                "metrics.test_nll": float("nan"), "metrics.test_accuracy": accuracy}

    table = likelihood_table([clustering("gm20", "gmvae", "20", 0.7),
                              clustering("vae", "mlp", "20", 0.6)], metric="val_elbo")
    assert table.header == ["variant", "runs", "val ELBO", "test ELBO", "test cluster accuracy"]
    notes = {table.note(row.note).split(":")[0]: table.note(row.note)
             for row in table.groups[0].rows if row.published}
    assert set(notes) == {"Dupont 2018", "Shu 2016"}
    # k-means always draws 10 clusters, whatever model.categories says
    assert "K (clusters): 10 there; 20 for gm20." in notes["Dupont 2018"]
    assert "Not known here: estimator, test images." in notes["Dupont 2018"]
    assert ("estimator: each cluster labelled with its most frequent digit there; clusters "
            "matched one-to-one to digits (Hungarian) for gm20, vae") in notes["Shu 2016"]
    assert "binarization: dynamic there; none for gm20, vae" in notes["Shu 2016"]


def test_comparison_groups_are_labelled_and_each_has_its_best():
    rows = [nll_run(f"{b}-mlp", seed, elbo - seed, 90.0 + seed, binarize=b)
            for b, elbo in (("dynamic", -99.0), ("static", -95.0)) for seed in range(2)]
    table = likelihood_table(rows, columns=("val_elbo", "test_nll"))
    assert [group.label for group in table.groups] == [
        "data.binarize=dynamic", "data.binarize=static"]
    text = render_latex(table)
    rows = check_latex(text, 4)
    assert text.count("\\multicolumn{4}{l}{\\textit{data.binarize=") == 2
    assert sum("\\textbf{" in cells[2] for cells in rows if len(cells) == 4) == 2
    static_notes = [table.note(row.note) for row in table.groups[1].rows if row.published]
    assert "binarization: dynamic there; static for static-mlp" in static_notes[0]
    assert "binarization" not in static_notes[3].split("Not the same")[-1]  # pythae: static


@needs_latex
def test_pdflatex_compiles_the_tables_and_refuses_a_broken_one(tmp_path):
    likelihood = render_latex(likelihood_table())
    assert_compiles(likelihood, tmp_path / "likelihood")
    rows = [nll_run(f"{b}-mlp_x", 0, -99.0, 90.0, binarize=b) for b in ("dynamic", "static")]
    assert_compiles(render_latex(likelihood_table(rows)), tmp_path / "groups")
    broken = likelihood.replace(r"mlp\_e50", "mlp_e50")  # an unescaped _: what escaping is for
    assert compile_latex(broken, tmp_path / "broken").returncode != 0


@needs_latex
def test_pdflatex_compiles_the_published_tables(tmp_path):
    published = sorted((REPO / "results" / "published").glob("*/table.tex"))
    assert len(published) >= 3  # jointvae, gmvae, iwae
    for table in published:
        assert_compiles(table.read_text(), tmp_path / table.parent.name)


@needs_latex
def test_names_that_latex_would_read_as_arguments_are_typeset_as_written(tmp_path):
    """\\ and \\midrule take a [ or * after them as their own: a variant named so would
    break the table or lose its first character."""
    names = ["[x]", "*star", "a*b[c]"]
    table = PaperTable(["variant", "runs", "val ELBO"],
                       [Group("g", [Row([name, "1", "-9.5"]) for name in names])], [])
    text = typeset_text(render_latex(table), tmp_path)
    for name in names:
        assert name in text  # "*star", not "star"


@needs_latex
@settings(max_examples=12, deadline=None)
@given(st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=30))
def test_pdflatex_compiles_any_printable_variant_name(tmp_path_factory, name):
    table = PaperTable(["variant", "runs", "val ELBO"],
                       [Group(name, [Row([name, "2", "-99.0"], bold=2)])], [])
    assert_compiles(render_latex(table), tmp_path_factory.mktemp("name"))


def test_markdown_and_csv_carry_the_same_rows():
    table = likelihood_table(literature=False)
    assert not any(row.published for row in table.groups[0].rows)
    markdown = render_markdown(table)
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert all(len(re.findall(r"(?<!\\)\|", line)) == len(table.header) + 1 for line in lines)
    assert lines[2].startswith("| mlp\\_e50 | 3 | **-100.00 ± 1.00** |")
    with_literature = likelihood_table()
    parsed = list(csv.DictReader(io.StringIO(render_csv(with_literature))))
    assert [row["source"] for row in parsed] == ["this grid"] * 2 + ["published"] * 4
    assert parsed[0]["variant"] == "mlp_e50" and parsed[0]["runs"] == "3"
    assert parsed[2]["test NLL (nats)"] == "86.76" and "Table 1" in parsed[2]["note"]
    assert all(row["compared_within"] == "all runs" for row in parsed)


def test_columns_are_chosen_and_checked():
    table = likelihood_table(columns=("test_nll", "val_elbo"))
    assert table.header == ["variant", "runs", "test NLL (nats)", "val ELBO"]
    assert table.groups[0].rows[0].bold == 3  # the ranking metric, wherever it stands
    no_rank = likelihood_table(columns=("test_nll",))
    assert all(row.bold is None for row in no_rank.groups[0].rows)
    with pytest.raises(VaebenchError, match="--columns: val_nmi not in this leaderboard"):
        likelihood_table(columns=("val_nmi",))


# --- properties of the escaping -----------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@given(TEXT)
def test_latex_escaping_leaves_no_special_and_balanced_braces(text):
    assert latex_problems(latex_escape(text)) == []


@given(st.lists(st.lists(TEXT, min_size=3, max_size=3), min_size=1, max_size=4), TEXT)
def test_any_variant_names_keep_every_row_the_same_width(cells, label):
    groups = [Group(label, [Row(row, bold=2) for row in cells]), Group("other", [
        Row([label, "", "1"], published=True, note="a")])]
    table = PaperTable(["variant", "runs", "val ELBO"], groups, [("", label), ("a", label)])
    rows = check_latex(render_latex(table), 3)
    assert len(rows) == 1 + 2 + len(cells) + 1  # header, group labels, variants, published
    for line in render_markdown(table).splitlines():
        if line.startswith("|"):
            assert len(re.findall(r"(?<!\\)\|", line)) == 4, line
    assert markdown_escape("a|b*c_d") == r"a\|b\*c\_d"
    parsed = list(csv.reader(io.StringIO(render_csv(table))))
    assert {len(row) for row in parsed} == {3 + 3}


# --- the data file, the docs and the command line -----------------------------------------


def test_every_published_figure_has_its_source_protocol_and_setting():
    literature = load_literature()
    assert len(literature) >= 6
    for _, figure in literature.iterrows():
        assert figure["source"] and figure["protocol"] and figure["cite"], figure["row"]
        assert figure["metric"] in METRICS and figure["dataset"] == "mnist"
        assert figure["binarize"] in ("none", "dynamic", "static")
        assert figure["estimator"] in ("", *ESTIMATOR_NAMES)
        assert figure["k"].isdigit() and figure["images"] in ("", "all")
    assert set(SETTINGS) <= set(literature.columns)
    docs = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    section = docs.split("### Published figures", 1)[1].split("\n## ", 1)[0]
    for _, figure in literature.iterrows():  # the docs list every row of the file
        assert f"{figure['value']:g}" in section and figure["cite"] in section, figure["row"]


def test_cli_formats_are_the_reports_and_columns_need_a_format(tmp_path, capsys):
    assert cli.TABLE_FORMATS == tuple(FORMATS)
    db = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["report", "x", "--tracking-uri", db, "--columns", "test_nll"]) == 2
    assert "--columns and --no-literature shape the table of --format" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["report", "x", "--format", "latex", "--columns", "test_nll,nonsense"])
    assert "nonsense: choose from val_elbo" in capsys.readouterr().err


# --- end to end: a tiny likelihood grid in a real store -------------------------------------

TINY_LIKELIHOOD = """
name: tinylik
base:
  data: {subset: 300, validation: 500, binarize: dynamic}
  model: {hidden: [64], z_dim: 2}
  train: {epochs: 1, batch_size: 64, eval_batch_size: 2500, device: cpu}
  eval: {iwae_samples: 4, iwae_images: 50}
matrix:
  loss.beta: [1, 4]
seeds: [0, 1]
"""


def test_report_format_latex_on_a_trained_grid(tmp_path, mnist_root, capsys):
    grid = tmp_path / "tinylik.yaml"
    grid.write_text(TINY_LIKELIHOOD)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = tmp_path / "results"
    common = ["--tracking-uri", uri, "--results-dir", str(results)]
    assert main(["run", str(grid), "--data-root", str(mnist_root), *common]) == 0
    folder = results / "tinylik"
    before = pd.read_csv(folder / "leaderboard.csv")
    capsys.readouterr()
    assert main(["report", "tinylik", *common, "--format", "latex"]) == 0
    out, err = capsys.readouterr()
    text = (folder / "table.tex").read_text()
    assert out == text and f"table: {folder / 'table.tex'}" in err
    rows = check_latex(text, 7)  # variant, runs, val/test ELBO, test NLL, accuracy, NMI
    assert [cells[0].strip() for cells in rows[1:3]] == list(before["variant"])
    assert [cells[1].strip() for cells in rows[1:3]] == ["2", "2"]
    assert "Burda et al. 2016" in text and "K (importance samples): 5000 there; 4 for" in text
    assert "test images: all there; 50 for" in text
    if PDFLATEX is not None:  # the structure above is checked either way
        assert_compiles(text, tmp_path / "paper")
    pd.testing.assert_frame_equal(pd.read_csv(folder / "leaderboard.csv"), before)
    assert main(["report", "tinylik", *common, "--format", "csv", "--no-literature"]) == 0
    parsed = list(csv.DictReader(io.StringIO((folder / "table.csv").read_text())))
    assert [row["source"] for row in parsed] == ["this grid", "this grid"]
    assert not (folder / "table.tex").exists()  # an earlier report's table is not left
    assert main(["report", "tinylik", *common]) == 0  # the default: as before
    out, _ = capsys.readouterr()
    assert "report:" in out and "ties best (val_elbo)" in out
    assert not (folder / "table.csv").exists()
