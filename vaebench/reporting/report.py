"""Reports (docs/metrics.md#reports): ``make_report`` puts the package's modules together."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vaebench.atomic import write_text
from vaebench.reporting.best_models import BestRun
from vaebench.reporting.figures import FIGURES, Drawings, write_figures
from vaebench.reporting.formats import FORMATS
from vaebench.reporting.literature import load_literature
from vaebench.reporting.paper_table import paper_table
from vaebench.reporting.render import (
    Block,
    display_table,
    render_html,
    render_markdown,
    report_blocks,
)
from vaebench.reporting.runs import METRICS, RunSet, fetch_best_pictures, select_runs
from vaebench.reporting.table import best_runs, leaderboard
from vaebench.spec.catalogue import DEFAULT_RANKING, MetricInfo, ranking_problem
from vaebench.spec.config import VaebenchError
from vaebench.spec.grid import SELECT_TAG
from vaebench.tracking.store import resolve_tracking_uri

DEFAULT_METRIC = DEFAULT_RANKING
DOCUMENTS = ("leaderboard.csv", "report.md", "report.html")
TABLES = tuple(file for file, _ in FORMATS.values())
REPORT_ARTIFACT_PATH = "report"


@dataclass(frozen=True)
class TableRequest:
    """``report --format``: the leaderboard as a table for a paper (docs/metrics.md,
    "Tables for a paper")."""

    format: str  # a key of vaebench.reporting.formats.FORMATS
    columns: tuple[str, ...] = ()  # metrics to show (default: paper_table.table_metrics')
    literature: bool = True  # published figures beside the grid's rows


@dataclass
class Report:
    folder: Path
    leaderboard: pd.DataFrame
    metric: MetricInfo
    files: list[Path] = field(default_factory=list)
    best_runs: list[BestRun] = field(default_factory=list)  # one per comparison group
    table: str | None = None  # the formatted table, with --format


def make_report(
    name: str, tracking_uri: str | None = None, results_dir: str | Path = "results",
    metric: str | None = None, all_invocations: bool = False, parent_id: str | None = None,
    stream=None, tsne: bool = False, table_request: TableRequest | None = None,
) -> Report:
    """Write ``results/<name>/``: leaderboard.csv, report.md, report.html and the figures,
    and log them as artifacts (under ``report/``) of the covered invocation's parent run.
    With ``tsne``, the best runs' pictures add a t-SNE of their latent means; with
    ``table_request``, the table it asks for is written too (table.tex, .md or .csv) and
    printed in place of the text leaderboard. ``metric`` None: the one the grid file selects
    on (:func:`chosen_metric`)."""
    return start_report(
        name, tracking_uri, results_dir, metric, all_invocations, parent_id, stream, tsne,
        table_request,
    ).finish()


@dataclass
class StartedReport:
    """A report chosen and tabled, its figures being drawn: :meth:`finish` waits for them,
    then writes report.md and report.html (which embeds them), logs the report's files to the
    store and prints it. A report that fails on the way leaves no report.md or .html."""

    report: Report
    run_set: RunSet
    figures: Drawings
    blocks: list[Block]
    title: str
    stream: Any

    def finish(self) -> Report:
        self.figures.wait()
        folder = self.report.folder
        write_text(folder / "report.md", render_markdown(self.blocks))
        write_text(folder / "report.html", render_html(self.blocks, self.title))
        for path in self.report.files:
            self.run_set.client.log_artifact(
                self.run_set.report_parent, str(path), REPORT_ARTIFACT_PATH)
        print_report(self.report, self.stream or sys.stdout)
        return self.report


def start_report(
    name: str, tracking_uri: str | None = None, results_dir: str | Path = "results",
    metric: str | None = None, all_invocations: bool = False, parent_id: str | None = None,
    stream=None, tsne: bool = False, table_request: TableRequest | None = None,
    figures: Drawings | None = None,
) -> StartedReport:
    """:func:`make_report` up to its figures, which ``figures`` draws (the invocation's helper
    process, while this process registers models; default: drawn here when
    :meth:`StartedReport.finish` waits for them)."""
    if figures is None:
        figures = Drawings()
    if metric is not None and (why := ranking_problem(metric)) is not None:
        raise VaebenchError(f"--metric {metric!r}: {why}")
    run_set = select_runs(resolve_tracking_uri(tracking_uri), name, all_invocations, parent_id)
    chosen = METRICS[metric or chosen_metric(run_set)]
    table = leaderboard(run_set, chosen)
    text = None if table_request is None else formatted_table(run_set, table, chosen, table_request)
    folder = Path(results_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    stale_files = [*DOCUMENTS, *TABLES, *FIGURES, *(p.name for p in folder.glob("best_*.png"))]
    for stale in stale_files:
        (folder / stale).unlink(missing_ok=True)  # an earlier report's, e.g. another group's
    write_text(folder / "leaderboard.csv", table.to_csv(index=False))
    drawn = write_figures(run_set, table, folder, figures)
    runs = best_runs(run_set, table, chosen)
    bests = [(run, fetch_best_pictures(run_set, run, folder, len(runs), tsne)) for run in runs]
    blocks = report_blocks(run_set, table, chosen, drawn, bests)
    files = [folder / document for document in DOCUMENTS]
    if table_request is not None:
        files.append(folder / FORMATS[table_request.format][0])
        write_text(files[-1], text)
    files += drawn + [picture for _, pictures in bests for picture in pictures]
    best = [as_best_run(run, chosen) for run, _ in bests]
    report = Report(folder, table, chosen, files, best, text)
    return StartedReport(report, run_set, figures, blocks, f"vaebench report: {name}", stream)


def formatted_table(
    run_set: RunSet, table: pd.DataFrame, metric: MetricInfo, request: TableRequest
) -> str:
    literature = load_literature() if request.literature else None
    render = FORMATS[request.format][1]
    return render(paper_table(run_set, table, metric, request.columns, literature))


def as_best_run(run: pd.Series, metric: MetricInfo) -> BestRun:
    """A group's best run (a row of :func:`best_runs`) as the record registration takes."""
    run_id, name, group = (str(run[key]) for key in ("run_id", "name", "compared_within"))
    return BestRun(run_id, name, group, metric.name, f"{run[metric.name]:.6g}")


def chosen_metric(run_set: RunSet) -> str:
    """What a report ranks on unless told: the ``select`` of the grid file of the latest
    invocation it covers (a tag of its parent run), else :data:`DEFAULT_METRIC`."""
    tags = run_set.parents.get(f"tags.{SELECT_TAG}")
    latest = tags.iloc[-1] if tags is not None and len(tags) else None
    return latest if ranking_problem(latest) is None else DEFAULT_METRIC


def best_of_invocation(
    uri: str, name: str, parent_id: str | None, metric: str | None = None
) -> list[BestRun]:
    """Each comparison group's best run on ``metric`` (None: :func:`chosen_metric`), as a report
    would choose it, without writing the report; ``parent_id`` None: of every invocation."""
    run_set = select_runs(uri, name, parent_id is None, parent_id)
    chosen = METRICS[metric or chosen_metric(run_set)]
    table = leaderboard(run_set, chosen)
    return [as_best_run(run, chosen) for run in best_runs(run_set, table, chosen)]


def print_report(report: Report, stream) -> None:
    """The text leaderboard, or the formatted table alone (``> table.tex`` keeps just it,
    the paths go to stderr)."""
    if report.table is not None:
        stream.write(report.table)
        table_file = next(path for path in report.files if path.name in TABLES)
        print(f"report: {report.folder / 'report.html'}\ntable: {table_file}", file=sys.stderr)
        return
    shown = display_table(report.leaderboard.head(10), report.metric)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(shown.to_string(index=False), file=stream)
    if len(report.leaderboard) > 10:
        print(f"... {len(report.leaderboard) - 10} more variants in leaderboard.csv", file=stream)
    print(f"report: {report.folder / 'report.html'}", file=stream)
