"""``run --dry-run``: the runs a grid file expands to and the stacks they would train in,
answered at once (no torch, no MLflow: a test holds this module's imports to that).

This module imports neither torch, nor mlflow, nor optuna.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from vaebench.grid import RunSpec, expand, load_grid
from vaebench.stack_plan import plan_stacks


def dry_run(grid_path: str | Path, max_stack: int, stream=None) -> None:
    """Check and expand the grid file; print its runs and their stacks; create nothing."""
    runs = expand(load_grid(Path(grid_path)))
    print_dry_run(runs, plan_stacks([run.config for run in runs], max_stack), stream)


def print_dry_run(runs: Sequence[RunSpec], stacks: Sequence[Sequence[int]], stream=None) -> None:
    """The runs in the grid's order, each with its stack (``-``: trains alone)."""
    stream = stream or sys.stdout
    label = {}
    numbered = [group for group in stacks if len(group) > 1]
    for number, group in enumerate(numbered, start=1):
        label.update({index: f"s{number}/{len(group)}" for index in group})
    print(
        f"{len(runs)} runs, {len(numbered)} stacks (column stack: stack number/its size; "
        "-: trains alone):",
        file=stream,
    )
    for index, run in enumerate(runs):
        settings = " ".join(f"{k}={v}" for k, v in run.overrides)
        stack = label.get(index, "-")
        print(f"{index + 1:4d}  {stack:>6s}  {run.name:<40s} {run.key}  {settings}", file=stream)
