"""Progress display: a tqdm bar per run on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class RunProgress:
    """Shows "run k of N", the epoch and the latest losses of one run."""

    def __init__(
        self,
        index: int,
        total: int,
        name: str,
        epochs: int,
        stream: TextIO | None = None,
        start: int = 0,
    ):
        """``start``: epochs already done (a run continued from its checkpoint)."""
        self.stream = stream or sys.stderr
        self.label = f"[{index}/{total}] {name}"
        self.epochs = epochs
        self.interactive = self.stream.isatty()
        self.bar = (
            tqdm(
                total=epochs,
                initial=start,
                desc=self.label,
                unit="epoch",
                file=self.stream,
                leave=True,
            )
            if self.interactive
            else None
        )
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
            print(
                f"{self.label} epoch {epoch}/{self.epochs} {summary}", file=self.stream, flush=True
            )

    def close(self, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if status != "FINISHED" or not self.interactive:
            print(f"{self.label} {status}", file=self.stream, flush=True)
