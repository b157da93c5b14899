"""Run a grid: check it, train every variant, track each run, write the results table.

User errors (config, data, devices, URIs) surface before any MLflow run is
created, so a mistake never leaves a half-written run behind.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from vaebench.classifier import conditional_accuracy, load_classifier
from vaebench.config import DataConfig, VaebenchError, cross_section_problems, load_grid
from vaebench.data import Splits, load_splits, resolve_root
from vaebench.grid import RunSpec, expand
from vaebench.models import build_model
from vaebench.models.cvae import ConditionalVAE
from vaebench.plots import save_grid, save_latent_scatter, save_reconstructions
from vaebench.progress import RunProgress
from vaebench.tracking import MLflowTracker, Tracker, resolve_tracking_uri
from vaebench.train import TrainResult, build_optimizer, fit, resolve_device

PACKAGE = Path(__file__).resolve().parent  # vaebench's source folder
SUMMARY_COLUMNS = [
    "name",
    "status",
    "val_elbo",
    "test_elbo",
    "test_nll",
    "test_kl",
    "val_nmi",
    "test_nmi",
    "mean_epoch_seconds",
    "seconds",
]


@dataclass
class GridOutcome:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run name, error line)
    csv_path: Path | None = None
    report_folder: Path | None = None


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def preflight(runs: Sequence[RunSpec], data_root: Path) -> dict[tuple[str, str], Splits]:
    """Load every split the grid needs and build each model and optimizer once.

    Anything a user can get wrong fails here, before tracking starts. Returns
    the device-resident splits keyed by (data config, device), shared by runs.
    """
    splits: dict[tuple[str, str], Splits] = {}
    checked: set[str] = set()
    for run in runs:
        problems = cross_section_problems(run.config)
        if problems:
            raise VaebenchError("; ".join(f"{run.name}: {key}: {msg}" for key, msg in problems))
        device = resolve_device(run.config.train.device)
        data_key = (run.config.data.model_dump_json(), str(device))
        if data_key not in splits:
            splits[data_key] = load_splits(run.config.data, data_root, device)
        shape_key = run.config.model_dump_json(include={"model", "optim"})
        if shape_key not in checked:
            try:
                model = build_model(run.config.model, splits[data_key].image_shape)
            except ValueError as exc:
                raise VaebenchError(f"{run.name}: model: {exc}") from None
            build_optimizer(run.config.optim, model.parameters())
            checked.add(shape_key)
    return splits


def splits_for(
    cache: dict[tuple[str, str], Splits], data: DataConfig, device: torch.device
) -> Splits:
    return cache[(data.model_dump_json(), str(device))]


LATENT_SAMPLE = 2000  # test images in the latent picture
LATENT_SAMPLE_SEED = 0


def write_artifacts(folder: Path, run: RunSpec, result: TrainResult, splits: Splits) -> None:
    """Resolved config, state_dict, reconstructions, prior samples, latent picture; for a
    conditional model also one row of samples per digit with the same z in every row."""
    model = result.model
    config_text = yaml.safe_dump(run.config.model_dump(mode="json"), sort_keys=False)
    (folder / "config.yaml").write_text(config_text)
    torch.save(model.state_dict(), folder / "state_dict.pt")
    model.eval()
    test = splits.test
    with torch.no_grad():
        originals, labels = test.images[:16], test.labels[:16]
        recon = torch.sigmoid(model.reconstruct(originals, labels))
        save_reconstructions(folder / "reconstructions.png", originals, recon)
        generator = torch.Generator(device=originals.device).manual_seed(0)
        samples = torch.sigmoid(model.sample_prior(64, generator=generator))
        save_grid(folder / "samples.png", samples, columns=8)
        chosen = torch.randperm(
            len(test), generator=torch.Generator().manual_seed(LATENT_SAMPLE_SEED)
        )
        chosen = chosen[:LATENT_SAMPLE].to(test.images.device)
        mu, _ = model.encode(test.images[chosen], test.labels[chosen])
        save_latent_scatter(
            folder / "latent.png", mu.cpu().numpy(), test.labels[chosen].cpu().numpy(), run.name
        )
        if isinstance(model, ConditionalVAE):
            z = torch.randn(10, model.z_dim, generator=generator, device=model.device)
            rows = [
                torch.sigmoid(model.decode_label(z, torch.full((10,), d, device=model.device)))
                for d in range(10)
            ]
            save_grid(folder / "digits.png", torch.cat(rows), columns=10)


def extra_scores(
    run: RunSpec, model: torch.nn.Module, classifiers: ClassifierCache
) -> dict[str, float]:
    """Scores that need more than the test split: conditional accuracy for cvae runs."""
    if not isinstance(model, ConditionalVAE):
        return {}
    classifier = classifiers.get(run.config.data.dataset, model.device)
    return {"conditional_accuracy": conditional_accuracy(model, classifier)}


class ClassifierCache:
    """The fixed digit classifier per dataset, loaded (or trained) once per grid."""

    def __init__(self, data_root: Path):
        self.data_root = data_root
        self._loaded: dict[tuple[str, str], torch.nn.Module] = {}

    def get(self, dataset: str, device: torch.device) -> torch.nn.Module:
        key = (dataset, str(device))
        if key not in self._loaded:
            self._loaded[key] = load_classifier(dataset, self.data_root, device)
        return self._loaded[key]


def summarize(
    run: RunSpec, result: TrainResult, classifiers: ClassifierCache
) -> tuple[dict[str, float], dict[str, float]]:
    """(what is logged after the last epoch, every final value of the run).

    The summary holds what training scored after the last epoch (test metrics,
    clustering scores, likelihood, timing), the conditional accuracy, seconds
    and parameter count; the final values add the last epoch's metrics.
    """
    summary = {
        **result.summary,
        **extra_scores(run, result.model, classifiers),
        "seconds": result.seconds,
        "parameters": float(sum(p.numel() for p in result.model.parameters())),
    }
    return summary, {**result.final.as_dict(), **summary}


def code_version() -> str:
    """A hash of vaebench's own source files (``src-<12 hex>``): equal exactly when the code
    that trains and scores is equal, whatever the repository's commit, working-tree edits
    or install location."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return f"src-{digest.hexdigest()[:12]}"


@functools.cache
def device_name(device: torch.device) -> str:
    """The processor that computes: the GPU's name, or the CPU's model (floating-point paths,
    and so the numbers of a chaotic training run, differ between them)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def base_tags(**extra: str) -> dict[str, str]:
    """Tags every run of an invocation carries: versions, vaebench's code version and, in a
    git checkout, its commit.

    A report treats runs of one config and seed as reruns (one sample) only when
    their device, processor and ``vaebench.code`` agree too.
    """
    tags = {
        **extra,
        "vaebench.torch": torch.__version__,
        "vaebench.python": platform.python_version(),
        "vaebench.code": code_version(),
    }
    commit = git_commit(PACKAGE)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_tags(run: RunSpec) -> dict[str, str]:
    """What identifies one run's sample: its config key, seed, device and processor."""
    device = resolve_device(run.config.train.device)
    return {
        "vaebench.run_key": run.key,
        "vaebench.seed": str(run.config.seed),
        "vaebench.device": str(device),
        "vaebench.device_name": device_name(device),
    }


def run_one(
    run: RunSpec,
    index: int,
    total: int,
    tracker: Tracker,
    splits: Splits,
    grid_tags: dict[str, str],
    classifiers: ClassifierCache,
) -> dict[str, Any]:
    """Train and track one run; returns its results row. Raises what training raises."""
    device = resolve_device(run.config.train.device)
    run_id = tracker.start_run(run.name, {**run.params}, {**grid_tags, **run_tags(run)})
    progress = RunProgress(index, total, run.name, run.config.train.epochs)
    status = "FAILED"
    try:

        def on_epoch(metrics) -> None:
            values = metrics.as_dict()
            tracker.log_metrics(run_id, values, step=metrics.epoch)
            progress.epoch(metrics.epoch, values)

        result = fit(run.config, splits, device, on_epoch=on_epoch)
        summary, final = summarize(run, result, classifiers)
        tracker.log_metrics(run_id, summary, step=run.config.train.epochs)
        with tempfile.TemporaryDirectory(prefix="vaebench-") as folder:
            write_artifacts(Path(folder), run, result, splits)
            tracker.log_artifacts(run_id, Path(folder))
        tracker.end_run(run_id, "FINISHED")
        status = "FINISHED"
        return {
            "name": run.name,
            "key": run.key,
            "status": status,
            "run_id": run_id,
            **run.params,
            **final,
        }
    except BaseException as exc:
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        tracker.end_run(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", error)
        raise
    finally:
        progress.close(status)


def run_grid(
    grid_path: str | Path,
    tracking_uri: str | None = None,
    data_root: str | Path | None = None,
    results_dir: str | Path = "results",
    dry_run: bool = False,
    tracker: Tracker | None = None,
    report: bool = True,
) -> GridOutcome:
    """Check, expand and train a grid file; record it and return what happened.

    With ``report`` (and an MLflow tracker) the invocation's report follows:
    ``results/<grid>/`` and artifacts of the parent run.
    """
    grid_path = Path(grid_path)
    grid = load_grid(grid_path)
    runs = expand(grid)
    if dry_run:
        print_dry_run(runs)
        return GridOutcome()

    check_output_folder(Path(results_dir))
    root = resolve_root(data_root)
    splits = preflight(runs, root)
    classifiers = ClassifierCache(root)
    tracker = tracker or MLflowTracker(resolve_tracking_uri(tracking_uri))
    tags = base_tags(**{"vaebench.grid": grid.name, "vaebench.grid_file": str(grid_path)})
    started = time.strftime("%Y%m%d-%H%M%S")
    parent = tracker.start_grid(
        grid.name, f"{grid.name}-{started}", {**tags, "vaebench.runs": str(len(runs))}
    )
    outcome = GridOutcome()
    try:
        for index, run in enumerate(runs, start=1):
            device = resolve_device(run.config.train.device)
            try:
                row = run_one(
                    run,
                    index,
                    len(runs),
                    tracker,
                    splits_for(splits, run.config.data, device),
                    tags,
                    classifiers,
                )
            except Exception as exc:  # one failing variant does not stop the grid
                line = str(exc).splitlines()[0] if str(exc) else ""
                outcome.failed.append((run.name, f"{type(exc).__name__}: {line}"))
                row = {"name": run.name, "key": run.key, "status": "FAILED", **run.params}
            outcome.rows.append(row)
    except KeyboardInterrupt:
        tracker.end_run(parent, "KILLED")
        raise
    tracker.end_run(parent, "FAILED" if outcome.failed else "FINISHED")
    outcome.csv_path = write_results(outcome.rows, Path(results_dir), grid.name)
    print_summary(outcome)
    if report and isinstance(tracker, MLflowTracker):
        outcome.report_folder = report_invocation(tracker.uri, grid.name, results_dir, parent)
    return outcome


def report_invocation(uri: str, name: str, results_dir: str | Path, parent: str) -> Path | None:
    """The report of the invocation just run. The grid's runs are tracked by now, so a
    report that cannot be made (every run failed, say) is one line on stderr, and
    ``vaebench report`` can be run again later; it does not turn a grid into a crash."""
    from vaebench.report import make_report

    try:
        return make_report(name, uri, results_dir, parent_id=parent).folder
    except Exception as exc:  # noqa: BLE001 - see the docstring
        kind = "" if isinstance(exc, VaebenchError) else f"{type(exc).__name__}: "
        print(f"vaebench: no report: {kind}{exc}", file=sys.stderr)
        return None


def check_output_folder(folder: Path, option: str = "--results-dir") -> None:
    """Fail before training, without creating anything, if results could not be written to
    ``folder``: a file where a folder should be, or no write permission."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f" (in {folder})"
        raise VaebenchError(f"{option} {folder}: {existing} is a file, not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VaebenchError(f"{option} {folder}: {existing} is not writable")


def write_results(rows: list[dict[str, Any]], folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def print_dry_run(runs: Sequence[RunSpec], stream=None) -> None:
    stream = stream or sys.stdout
    print(f"{len(runs)} runs:", file=stream)
    for index, run in enumerate(runs, start=1):
        settings = " ".join(f"{k}={v}" for k, v in run.overrides)
        print(f"{index:4d}  {run.name:<40s} {run.key}  {settings}", file=stream)


def print_summary(outcome: GridOutcome, stream=None) -> None:
    stream = stream or sys.stdout
    table = pd.DataFrame(outcome.rows).reindex(columns=SUMMARY_COLUMNS)
    with pd.option_context("display.width", 120, "display.max_rows", 500):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"), file=stream)
    if outcome.csv_path:
        print(f"results: {outcome.csv_path}", file=stream)
    for name, error in outcome.failed:
        print(f"FAILED {name}: {error}", file=stream)
