"""The leaderboard as a table a paper can include (``report --format``): a row per variant with
mean ± std over its seeds and their count, in the report's comparison groups, and published
figures (vaebench.reporting.literature) beside them with a note on each one's setting."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from vaebench.reporting.literature import Comparison, beside, variant_settings
from vaebench.reporting.render import mean_std, measurement_notes, metric_cells
from vaebench.reporting.runs import METRICS, RunSet
from vaebench.spec.catalogue import MetricInfo
from vaebench.spec.config import VaebenchError

# shown beside the ranking metric by default, where the runs have them
HEADLINE = ("test_elbo", "test_nll", "test_accuracy", "test_nmi", "conditional_accuracy")
FIXED_HEADER = ("variant", "runs")


@dataclass
class Row:
    cells: list[str]
    published: bool = False  # a published figure, not one of this grid's variants
    bold: int | None = None  # the cell (column index) of its group's best value
    note: str = ""  # the marker of its note in PaperTable.notes


@dataclass
class Group:
    label: str  # the comparison group, "loss.recon=bce" (or "all runs")
    rows: list[Row] = field(default_factory=list)


@dataclass
class PaperTable:
    header: list[str]
    groups: list[Group]
    notes: list[tuple[str, str]]  # (marker, text); marker "": a note on the whole table

    @property
    def grouped(self) -> bool:
        """Whether the groups are labelled: only where there are several."""
        return len(self.groups) > 1

    def note(self, marker: str) -> str:
        return dict(self.notes).get(marker, "") if marker else ""


def table_metrics(
    table: pd.DataFrame, metric: MetricInfo, requested: Sequence[str] = ()
) -> list[MetricInfo]:
    """The metric columns: ``requested``, else the ranking metric and the :data:`HEADLINE`
    metrics the leaderboard has."""
    present = [name for name in METRICS if f"{name}_mean" in table]
    if requested:
        missing = [name for name in requested if name not in present]
        if missing:
            raise VaebenchError(
                f"--columns: {', '.join(missing)} not in this leaderboard; "
                f"its metrics: {', '.join(present)}"
            )
        return [METRICS[name] for name in dict.fromkeys(requested)]
    names = [metric.name, *(n for n in HEADLINE if n in present and n != metric.name)]
    return [METRICS[name] for name in names]


def paper_table(
    run_set: RunSet, table: pd.DataFrame, metric: MetricInfo, columns: Sequence[str] = (),
    literature: pd.DataFrame | None = None,
) -> PaperTable:
    """``table`` (a :func:`vaebench.reporting.table.leaderboard`) with ``literature``'s figures
    of the shown metrics on the grid's datasets after each group's variants."""
    shown = table_metrics(table, metric, columns)
    groups: list[Group] = []
    notes = [("", statistics_note(metric, shown)), ("", measurement_notes(run_set, metric))]
    for label, rows in table.groupby("compared_within", sort=False):
        group = Group(str(label), variant_rows(rows, shown, metric))
        for comparison in published_beside(run_set, rows, shown, literature):
            marker = note_marker(sum(1 for m, _ in notes if m))
            group.rows.append(published_row(comparison.figure, shown, marker))
            notes.append((marker, figure_note(comparison)))
        groups.append(group)
    return PaperTable([*FIXED_HEADER, *(m.label for m in shown)], groups, notes)


def note_marker(index: int) -> str:
    """a, b, ..., z, aa, ab, ...: the ``index``-th (from 0) note's letters."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = string.ascii_lowercase[rest] + letters
    return letters


def variant_rows(rows: pd.DataFrame, shown: list[MetricInfo], metric: MetricInfo) -> list[Row]:
    cells = [rows["variant"].astype(str).tolist(), rows["runs"].astype(str).tolist()]
    cells += [metric_cells(rows, m) for m in shown]
    best = len(FIXED_HEADER) + shown.index(metric) if metric in shown else None
    return [
        Row(list(row), bold=best if tie == "best" else None)
        for row, tie in zip(zip(*cells, strict=True), rows["ties_best"], strict=True)
    ]


def published_beside(
    run_set: RunSet, rows: pd.DataFrame, shown: list[MetricInfo],
    literature: pd.DataFrame | None,
) -> list[Comparison]:
    """The published figures of the shown metrics on the datasets of ``rows``' variants."""
    if literature is None:
        return []
    comparisons = []
    for m in shown:
        if not (literature["metric"] == m.name).any():
            continue
        settings = variant_settings(run_set, m.name)
        settings = settings[settings.index.isin(rows["variant"])]
        if not settings.empty:
            comparisons += beside(literature, m.name, settings)
    return comparisons


def published_row(figure: pd.Series, shown: list[MetricInfo], marker: str) -> Row:
    values = [
        mean_std(figure["value"], figure["std"], m.digits) if m.name == figure["metric"] else ""
        for m in shown
    ]
    label = f"{figure['row']} ({figure['cite']})"
    return Row([label, figure["runs"] or "–", *values], published=True, note=marker)


def figure_note(comparison: Comparison) -> str:
    figure = comparison.figure
    text = f"{figure['cite']}: {figure['source']}. {figure['protocol']}."
    text += f" The same as this grid's rows: {', '.join(comparison.same)}."
    if comparison.differences:
        text += f" Not the same: {'; '.join(comparison.differences)}."
    if comparison.unstated:
        text += f" Not known here: {', '.join(comparison.unstated)}."
    return text


def statistics_note(metric: MetricInfo, shown: list[MetricInfo]) -> str:
    text = (
        "Mean ± sample standard deviation over each variant's finished runs (runs: their "
        "number, one seed each); a single run shows no spread; (n=k): k of the runs have the "
        f"value. Variants are ranked within their comparison group on {metric.label}"
    )
    if metric in shown:
        text += "; bold: the group's best"
    return text + ". Published figures are their sources' own, not measured here."
