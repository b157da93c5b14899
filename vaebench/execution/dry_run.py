"""``run --dry-run``: the runs a grid file expands to and the stacks they would train in,
answered at once: no MLflow or Optuna, and torch only to resolve ``train.device: auto`` for
conv runs (:func:`trains_on_cpu`; a test holds an mlp grid's dry run to no torch).
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path

from vaebench.spec.config import RunConfig
from vaebench.spec.grid import expand, load_grid
from vaebench.stacking.plan import plan_stacks


def dry_run(
    grid_path: str | Path, max_stack: int, stream=None, stack_everywhere: bool = False
) -> None:
    runs = expand(load_grid(Path(grid_path)))
    configs = [run.config for run in runs]
    stacks = plan_stacks(configs, max_stack, cpu_rule(stack_everywhere))
    stream = stream or sys.stdout
    numbered = [group for group in stacks if len(group) > 1]
    label = {i: f"s{n}/{len(group)}" for n, group in enumerate(numbered, start=1) for i in group}
    print(f"{len(runs)} runs, {len(numbered)} stacks (column stack: stack number/its size; "
          "-: trains alone):", file=stream)
    for index, run in enumerate(runs):
        settings = " ".join(f"{k}={v}" for k, v in run.overrides)
        stack = label.get(index, "-")
        print(f"{index + 1:4d}  {stack:>6s}  {run.name:<40s} {run.key}  {settings}", file=stream)


def cpu_rule(stack_everywhere: bool) -> Callable[[RunConfig], bool]:
    """Whether a run that stacks on CUDA only trains on the CPU; with ``stack_everywhere``
    (``--stack on``) never, so that it stacks on any device."""
    return (lambda config: False) if stack_everywhere else trains_on_cpu


def trains_on_cpu(config: RunConfig) -> bool:
    """``train.device: auto`` is the CPU with a CPU build of torch (read from its version,
    without importing it); with another build, torch is asked."""
    if config.train.device != "auto":
        return config.train.device == "cpu"
    if "+cpu" in importlib.metadata.version("torch"):
        return True
    import torch

    return not torch.cuda.is_available()

