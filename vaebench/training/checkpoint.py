"""Mid-run checkpoints: one file per MLflow run, written atomically, gone once the run ends
(docs/resume.md#checkpoints)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import torch

from vaebench.atomic import atomic_file
from vaebench.signals import deferred_signals

FOLDER = "checkpoints"


def default_folder(sqlite_file: Path | None) -> Path:
    return (sqlite_file.resolve().parent if sqlite_file is not None else Path.cwd()) / FOLDER


class CheckpointStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._warned = False

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.pt"

    def save(self, run_id: str, state: dict[str, Any]) -> bool:
        """Whether it was written: one that cannot be is a warning, once, and the run goes on;
        a full disk stops the runs (``DiskFull``, from ``atomic_file``)."""
        path = self.path(run_id)
        with deferred_signals():
            try:
                serialized = io.BytesIO()  # written whole: a full disk is an OSError, not
                torch.save(state, serialized)  # torch's "unexpected pos" RuntimeError
                with atomic_file(path) as file:
                    file.write(serialized.getbuffer())
                return True
            except OSError as exc:  # a full disk is DiskFull: the runs stop
                if not self._warned:
                    print(
                        f"vaebench: warning: checkpoint {path} not written ({exc.strerror or exc});"
                        " this run cannot be continued if it stops",
                        file=sys.stderr,
                    )
                    self._warned = True
                return False

    def load(self, run_id: str) -> dict[str, Any] | None:
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
            for part in self.folder.glob(f".{run_id}.pt.*.part"):  # a write a SIGKILL cut short
                part.unlink(missing_ok=True)
