"""Files another process may read are written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vaebench import atomic
from vaebench.atomic import atomic_file, write_text


def test_a_write_that_fails_halfway_leaves_the_old_file_and_nothing_else(tmp_path: Path):
    target = tmp_path / "results.csv"
    write_text(target, "old,complete\n")
    with pytest.raises(RuntimeError), atomic_file(target, "w") as file:
        file.write("new,half")
        raise RuntimeError("the process stops here")
    assert target.read_text() == "old,complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left
    write_text(target, "new,complete\n")
    assert target.read_text() == "new,complete\n"


def test_the_classifier_cache_appears_whole(tmp_path: Path, mnist_root, monkeypatch):
    """Both files of the cvae classifier's cache (weights, and the metadata with their
    checksum) appear by a rename of a complete file: a process reading the cache while
    another writes it finds the old files or the new ones, never half a file."""
    from vaebench.scoring.classifier import load_classifier

    renamed: list[str] = []
    rename = os.replace

    def spying_replace(source, destination):
        renamed.append(Path(destination).name)
        return rename(source, destination)

    monkeypatch.setenv("VAEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(atomic.os, "replace", spying_replace)
    load_classifier("mnist", mnist_root, torch.device("cpu"))
    assert sorted(renamed) == ["mnist-classifier-v2.json", "mnist-classifier-v2.pt"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(renamed)


def test_removing_a_checkpoint_removes_a_write_a_sigkill_cut_short(tmp_path):
    """A process killed inside atomic_file leaves its temporary file: the run's end takes it."""
    from vaebench.training.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path)
    assert store.save("run1", {"epoch": 1})
    (tmp_path / ".run1.pt.abc123.part").write_bytes(b"half")
    (tmp_path / ".run2.pt.abc123.part").write_bytes(b"another run's")
    store.remove("run1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run2.pt.abc123.part"]
