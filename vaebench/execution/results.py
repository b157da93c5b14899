"""A grid invocation's results: its rows, ``results/<grid>.csv`` and the summary printed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vaebench.atomic import write_text
from vaebench.execution.grid_work import WorkRecord
from vaebench.reporting.best_models import Registered
from vaebench.spec.grid import RunSpec

SUMMARY_COLUMNS = ["name", "status", "val_elbo", "test_elbo", "test_nll", "test_kl", "val_nmi",
                   "test_nmi", "mean_epoch_seconds", "seconds"]


@dataclass
class GridOutcome:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run name, error line)
    skipped: int = 0  # FINISHED before this invocation
    worker_errors: list[str] = field(default_factory=list)  # a line per worker that died
    csv_path: Path | None = None
    report_folder: Path | None = None
    registered: list[Registered] = field(default_factory=list)  # the best runs' models


def take_work(outcome: GridOutcome, record: WorkRecord) -> None:
    outcome.rows += record.rows
    outcome.failed += record.failed
    outcome.skipped += record.skipped


def close_results(outcome: GridOutcome, results: Path, name: str, runs: Sequence[RunSpec]) -> None:
    """What is known so far, in the grid's order."""
    order = {run.key: index for index, run in enumerate(runs)}
    outcome.rows.sort(key=lambda row: order[row["key"]])
    outcome.csv_path = results / f"{name}.csv"
    table = pd.DataFrame(outcome.rows)
    write_text(outcome.csv_path, table.to_csv(index=False))  # read by other processes
    with pd.option_context("display.width", 120, "display.max_rows", 500):
        print(table.reindex(columns=SUMMARY_COLUMNS).to_string(
            index=False, float_format=lambda v: f"{v:.2f}"
        ))
    print(f"results: {outcome.csv_path}")
    for run_name, error in outcome.failed:
        print(f"FAILED {run_name}: {error}")
