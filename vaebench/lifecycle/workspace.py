from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from vaebench.data import SplitRecord, Splits, split_records
from vaebench.lifecycle.post_run import InlineFinisher
from vaebench.lifecycle.preflight import check_before_tracking, preflight, splits_key
from vaebench.scoring.classifier import ClassifierCache
from vaebench.spec.config import RunConfig
from vaebench.spec.grid import RunSpec
from vaebench.training.checkpoint import CheckpointStore


@functools.cache
def _digest_thread() -> ThreadPoolExecutor:
    """The process's one thread that hashes splits (every Workspace's)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaebench-digest")


os.register_at_fork(after_in_child=_digest_thread.cache_clear)  # a child has no such thread


class Workspace:
    """What the runs of one invocation share in this process. ``checkpoints`` None: runs are not
    checkpointed (a study's trials, which are never continued); ``finisher``: here, unless the
    caller hands the trained runs to a background process."""

    def __init__(self, data_root: Path, checkpoints: CheckpointStore | None):
        self.data_root = data_root
        self.checkpoints = checkpoints
        self.finisher = InlineFinisher()
        self.classifiers = ClassifierCache(data_root)
        self._splits: dict[tuple[str, str], Splits] = {}
        # the splits' digests, hashed in a thread (hashlib lets go of the GIL) while the
        # store opens and the first run starts: 0.5 s for MNIST's on the CPU
        self._records: dict[tuple[str, str], Future[list[SplitRecord]]] = {}

    def check(self, runs: Sequence[RunSpec]) -> None:
        """The quick part of the preflight: what must fail before the store is even opened."""
        check_before_tracking(runs, self.data_root)

    def prepare(self, runs: Sequence[RunSpec]) -> None:
        self._splits.update(preflight(runs, self.data_root, self._splits))
        for run in runs:
            key = splits_key(run)
            if key not in self._records:
                self._records[key] = _digest_thread().submit(
                    split_records, self._splits[key], run.config.data, self.data_root
                )

    def split_records_for(self, run: RunSpec) -> list[SplitRecord]:
        """The run's splits as MLflow dataset inputs (their digests computed once)."""
        self.load_splits(run)
        return self._records[splits_key(run)].result()

    def load_splits(self, run: RunSpec) -> Splits:
        """The run's splits on its device, loaded (and preflighted) the first time."""
        if splits_key(run) not in self._splits:
            self.prepare([run])
        return self._splits[splits_key(run)]

    def test_images(self, config: RunConfig, count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """A registered model's input example: the first test images and labels, on the CPU."""
        test = self.load_splits(RunSpec("example", "", config, ())).test
        return test.images[:count].cpu(), test.labels[:count].cpu()
