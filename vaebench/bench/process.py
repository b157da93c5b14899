"""Benchmark: whole processes from fresh folders, ``vaebench run`` of a 2-epoch grid against
:mod:`vaebench.bench.conventional_script`, alternating, and ``run --dry-run``; see
docs/performance.md (Whole processes)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from vaebench.bench.timing import REFERENCE
from vaebench.data import resolve_root

SCRIPT = Path(__file__).with_name("conventional_script.py")
SHIPPED_GRID = Path(__file__).resolve().parents[2] / "experiments" / "grid.yaml"


def reference_grid(epochs: int) -> dict:
    base = {**REFERENCE, "train": {**REFERENCE["train"], "epochs": epochs}}
    return {"name": "process-bench", "base": base, "seeds": [0]}


def time_process(command: list[str], cwd: Path) -> float:
    """Wall seconds of ``command`` run in ``cwd``; a failure raises with its standard error."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main(data_root: str | None, repeats: int = 3, epochs: int = 2) -> int:
    root = str(resolve_root(data_root).resolve())
    with tempfile.TemporaryDirectory(prefix="vaebench-process-") as scratch:
        grid = Path(scratch) / "two_epochs.yaml"
        grid.write_text(yaml.safe_dump(reference_grid(epochs), sort_keys=False))
        run = [sys.executable, "-m", "vaebench", "run"]
        commands = {
            f"vaebench run ({epochs} epochs)": [*run, str(grid), "--data-root", root],
            f"conventional script ({epochs} epochs)": [
                sys.executable, str(SCRIPT), "--data-root", root, "--epochs", str(epochs)
            ],
        }
        print(
            f"whole processes from a fresh folder, {repeats} of each, alternating; MLP VAE "
            "784-400-20, BCE, Adam 1e-3, batch 128, CPU"
        )
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeats):
            for name, command in commands.items():
                seconds[name].append(time_process(command, Path(tempfile.mkdtemp(dir=scratch))))
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        for name, values in seconds.items():
            listed = ", ".join(f"{v:.1f}" for v in values)
            print(f"{name:<34s} median {medians[name]:5.1f} s  ({listed})")
        ours, conventional = medians.values()
        print(f"vaebench / conventional = {ours / conventional:.2f}")
        if SHIPPED_GRID.exists():
            dry = [*run, str(SHIPPED_GRID), "--dry-run"]
            times = [time_process(dry, Path(scratch)) for _ in range(repeats)]
            print(f"run {SHIPPED_GRID.name} --dry-run: median {statistics.median(times):.2f} s")
    return 0
