"""Progress display: a tqdm bar per run on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

_prefix = ""  # set in a worker process: its lines say which worker they come from


def set_line_prefix(prefix: str) -> None:
    """Plain lines from now on (no bars: several processes share one terminal)."""
    global _prefix
    _prefix = prefix


def line_prefix() -> str:
    return _prefix


class RunProgress:

    def __init__(
        self, index: int, total: int, name: str, epochs: int, stream: TextIO | None = None,
        start: int = 0,
    ):
        self.stream = stream or sys.stderr
        self.label = f"{_prefix}[{index}/{total}] {name}"
        self.epochs = epochs
        self.interactive = self.stream.isatty() and not _prefix
        self.bar = None
        if self.interactive:
            self.bar = tqdm(total=epochs, initial=start, desc=self.label, unit="epoch",
                            file=self.stream, leave=True)
        if start and not self.interactive:
            print(f"{self.label} continues after epoch {start}", file=self.stream, flush=True)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        summary = f"loss={metrics['train_loss']:.2f}"
        if "val_elbo" in metrics:  # absent with data.validation: 0
            summary += f" val_elbo={metrics['val_elbo']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
            self.bar.update(1)
        else:
            line = f"{self.label} epoch {epoch}/{self.epochs} {summary}"
            print(line, file=self.stream, flush=True)

    def close(self, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if status != "FINISHED" or not self.interactive:
            print(f"{self.label} {status}", file=self.stream, flush=True)
