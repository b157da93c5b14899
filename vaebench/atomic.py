"""Files another process may read, written whole or not at all: a temporary file in the
target's folder, ``fsync``'d, then renamed over it (``os.replace``, atomic on POSIX). A reader
sees the old file or the new one; a failed or interrupted write leaves the old file only, and
a full disk is one :class:`~vaebench.spec.config.DiskFull` naming the file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from vaebench.spec.config import DiskFull


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file for ``path``'s new content; it becomes ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(name, path)
    except OSError as exc:
        if DiskFull.behind(exc):
            raise DiskFull(path) from None
        raise
    finally:
        Path(name).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as file:
        file.write(text)
