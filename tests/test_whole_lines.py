"""Lines that several processes write to one stderr arrive whole (vaebench.whole_lines)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WRITER = """
import sys
from vaebench.whole_lines import write_whole_lines
write_whole_lines()
for number in range(int(sys.argv[2])):
    print(sys.argv[1], number, "x" * 40, file=sys.stderr)  # four writes, left to itself
"""


def lines_of_two_writers(count: int) -> list[str]:
    """The stderr lines of two processes writing ``count`` lines each to one pipe at once."""
    read, write = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, tag, str(count)],
                                stderr=write, env=env) for tag in ("a", "b")]
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    for writer in writers:
        assert writer.wait() == 0
    return text.splitlines()


def test_two_processes_lines_on_one_pipe_arrive_whole():
    count = 20000
    lines = lines_of_two_writers(count)
    assert len(lines) == 2 * count
    broken = [line for line in lines if not re.fullmatch(r"[ab] \d+ x{40}", line)]
    assert broken == []
    for tag in "ab":  # and in each process's order
        assert [int(line.split()[1]) for line in lines if line[0] == tag] == list(range(count))
