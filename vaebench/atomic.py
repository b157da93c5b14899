"""Files another process may read, written whole or not at all: a temporary file in the
target's folder, flushed to disk (``fsync``), then renamed over the target (``os.replace``,
atomic on POSIX filesystems). A reader sees the old file or the new one, never half of one;
a write that fails or is interrupted leaves the old file and no temporary one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file to write ``path``'s new content into; it becomes ``path`` when the block ends
    without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as file:
        file.write(text)
