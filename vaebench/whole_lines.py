"""Each line written to stderr in one piece, for the processes of one invocation share it.

Python writes a non-interactive stderr through at each ``write``: ``print(text, file=
sys.stderr)`` is two system calls, the text and then its newline, and ``print(a, b)`` four.
When grid workers, background finishers and the invocation's own process write to one pipe
(a terminal, a log file, ``2>&1 | tee``), a line of one lands in the middle of a line of
another between those calls. Buffered to the end of each line instead, every line is one
``write`` of its own, which a pipe keeps whole (up to ``PIPE_BUF``, 4 KiB on Linux)."""

from __future__ import annotations

import io
import sys


def write_whole_lines() -> None:
    """From now on this process's stderr writes each line in one call."""
    if isinstance(sys.stderr, io.TextIOWrapper):  # a notebook's stream is left as it is
        sys.stderr.reconfigure(line_buffering=True, write_through=False)
