"""Mid-run checkpoints: one file per MLflow run, written atomically, gone once the run ends.

A checkpoint holds what :func:`vaebench.training.loop.fit` needs to continue a run from its last
complete epoch as if it had never stopped (model, optimizer, every random state, the epochs'
metrics), plus the run's key and vaebench's code version: a checkpoint of other settings, code or
device is not continued. Files live in ``checkpoints/`` beside the SQLite store (or under
``--checkpoint-dir``), named by the run id. Writes go to a temporary file that is renamed over the
last one, so a process killed in the middle leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

from vaebench.atomic import atomic_file
from vaebench.signals import deferred_signals

FOLDER = "checkpoints"


def default_folder(sqlite_file: Path | None) -> Path:
    """``checkpoints/`` beside the SQLite store, else (a tracking server) in the working folder."""
    return (sqlite_file.resolve().parent if sqlite_file is not None else Path.cwd()) / FOLDER


class CheckpointStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._warned = False

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.pt"

    def save(self, run_id: str, state: dict[str, Any]) -> bool:
        """Write atomically; whether it was written. A checkpoint that cannot be written (disk
        full, permissions) is a warning, once: the run goes on, it just cannot be continued
        from this epoch if it stops."""
        path = self.path(run_id)
        with deferred_signals():
            try:
                with atomic_file(path) as file:
                    torch.save(state, file)
                return True
            except OSError as exc:
                if not self._warned:
                    print(
                        f"vaebench: warning: checkpoint {path} not written ({exc.strerror or exc});"
                        " this run cannot be continued if it stops",
                        file=sys.stderr,
                    )
                    self._warned = True
                return False

    def load(self, run_id: str) -> dict[str, Any] | None:
        """The run's checkpoint, or None if there is none or it cannot be read."""
        path = self.path(run_id)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or foreign file: start over
            print(f"vaebench: warning: checkpoint {path} unreadable ({exc}); "
                  "the run starts over", file=sys.stderr)
            return None

    def remove(self, run_id: str) -> None:
        with contextlib.suppress(OSError):
            self.path(run_id).unlink(missing_ok=True)
