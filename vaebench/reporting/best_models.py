"""The best runs of an invocation (a grid's groups, a study's best trials) as registered
MLflow models (docs/tracking.md#registered-models): each rebuilt from its ``config.yaml`` and
``state_dict.pt``, logged once per run, registered as a new version; reached via the Tracker."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vaebench.reporting.table import ALL_RUNS
from vaebench.spec.config import RunConfig, VaebenchError, first_line
from vaebench.tracking.served import run_config, served_model
from vaebench.tracking.tracker import Tracker

EXAMPLE_ROWS = 4  # test images in a model's input example

# a data config -> its test split's first images and labels, on the CPU
TestImages = Callable[[RunConfig], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BestRun:
    run_id: str
    run_name: str
    group: str  # its comparison group ("loss.recon=bce"), ALL_RUNS, or "trial 7"
    selected_on: str  # the metric (or objectives) it was selected on, "val_elbo"
    value: str  # its value of it, as text


@dataclass(frozen=True)
class Registered:
    name: str
    version: int
    run: BestRun
    seconds: float
    reused: bool  # an earlier invocation had logged the run's model


def registry_name(base: str, group: str) -> str:
    """``<grid>`` for a single group, ``<grid>.<values>`` otherwise (``quick.mse``); letters,
    digits, ``.``, ``_`` and ``-`` only (MLflow refuses ``/`` and ``:``), so it reads well in a
    models:/ URI."""
    name = _uri_safe(base, ".") or "vaebench"
    if group == ALL_RUNS:
        return name
    values = "-".join(part.split("=", 1)[-1] for part in group.split(", "))
    return f"{name}.{_uri_safe(values) or 'group'}"


def _uri_safe(text: str, keep: str = "") -> str:
    return re.sub(rf"[^A-Za-z0-9_{re.escape(keep)}-]+", "-", text).strip("-")


def register_best(
    tracker: Tracker, base: str, best: Sequence[BestRun], test_images: TestImages,
    invocation: str, stream=None,
) -> list[Registered]:
    """Register each of ``best``; one line per model. A run that cannot be registered (its
    artifacts gone, say) is one line on stderr: the runs are tracked whatever happens here."""
    stream = stream or sys.stdout
    registered = []
    for run in best:
        started = time.perf_counter()
        name = registry_name(base, run.group)
        try:
            config = run_config(tracker.artifact_bytes(run.run_id, "config.yaml").decode())
            module = served_model(config, tracker.artifact_bytes(run.run_id, "state_dict.pt"))
            images, labels = test_images(config)
            example = module.rows(images[:EXAMPLE_ROWS], labels[:EXAMPLE_ROWS]).numpy()
            tags = {
                "vaebench.run_id": run.run_id, "vaebench.run_name": run.run_name,
                "vaebench.compared_within": run.group, "vaebench.selected_on": run.selected_on,
                "vaebench.value": run.value, "vaebench.invocation": invocation,
            }
            description = (f"run {run.run_name}: the best of {run.group} on {run.selected_on} "
                           f"({run.value}), from invocation {invocation}")
            version, reused = tracker.register_model(
                run.run_id, module, example, config.train.epochs, name, tags, description
            )
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: stop, after saying what is not
            print(f"vaebench: registering stopped: {name} and the models after it are not "
                  "registered; the runs are all tracked", file=sys.stderr)
            exc.nothing_to_continue = True  # type: ignore[attr-defined]  # read by the cli
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            kind = "" if isinstance(exc, VaebenchError) else f"{type(exc).__name__}: "
            print(f"vaebench: {name}: not registered: {kind}{first_line(exc)}", file=sys.stderr)
            continue
        done = Registered(name, version, run, time.perf_counter() - started, reused)
        registered.append(done)
        print(f"registered model {name} version {version}: run {run.run_name} "
              f"({run.selected_on} {run.value}; {done.seconds:.1f} s) "
              f"-> mlflow.pytorch.load_model('models:/{name}/{version}')", file=stream)
    return registered
