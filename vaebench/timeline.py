"""Where an invocation's seconds go (``run --profile FILE``, docs/performance.md#profile): the
phases of this process as a Chrome trace (``chrome://tracing`` or ui.perfetto.dev open it) and
a short table. Off, a phase costs one attribute check; the trainer's own timing is untouched.

Phases are leaves (none holds another), so their seconds add up; what no phase covers is
shown as "other". Only this process is traced: with ``--workers`` or Ray the runs train in
other processes, and the table shows the wait for them."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

# the categories a run's training is made of: the rest of the wall is the fixed work
TRAINING = ("epoch", "validation")


@dataclass
class Phase:
    category: str
    name: str
    start: float  # seconds since the process started
    seconds: float
    group: str  # the stack or run it belongs to ("" for the invocation's own work)
    thread: int


@dataclass
class Timeline:
    enabled: bool = False
    phases: list[Phase] = field(default_factory=list)
    group: str = ""  # the stack or run being trained now
    origin: float = 0.0  # the process's start, on the perf_counter clock

    def start(self) -> None:
        """From now on phases are kept; the process's start until now is its "imports"."""
        import psutil

        started = psutil.Process(os.getpid()).create_time()
        since_start = max(0.0, time.time() - started)
        self.origin = time.perf_counter() - since_start
        self.enabled = True
        self.phases.append(Phase("imports", "interpreter and imports", 0.0, since_start, "",
                                 threading.get_ident()))

    @contextlib.contextmanager
    def phase(self, category: str, name: str | None = None) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(category, name or category, began, time.perf_counter() - began)

    def add(self, category: str, name: str, began: float, seconds: float) -> None:
        """A phase timed by its caller (``began`` on the perf_counter clock)."""
        if self.enabled:
            self.phases.append(Phase(category, name, began - self.origin, seconds, self.group,
                                     threading.get_ident()))

    def wall(self) -> float:
        return time.perf_counter() - self.origin

    def write(self, path: Path) -> None:
        pid = os.getpid()
        events = [
            {"name": p.name, "cat": p.category, "ph": "X", "ts": round(p.start * 1e6),
             "dur": round(p.seconds * 1e6), "pid": pid, "tid": p.thread,
             "args": {"run": p.group} if p.group else {}}
            for p in self.phases
        ]
        from vaebench.atomic import write_text

        write_text(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))

    def table(self, stream: TextIO) -> None:
        """Seconds per category and per run, and the fixed work: the wall less training."""
        wall = self.wall()
        totals: dict[str, float] = {}
        for p in self.phases:
            totals[p.category] = totals.get(p.category, 0.0) + p.seconds
        covered = sum(totals.values())
        print(f"profile: {wall:.2f} s wall", file=stream)
        for category, seconds in [*totals.items(), ("other", max(0.0, wall - covered))]:
            print(f"  {category:<22} {seconds:8.2f} s  {100 * seconds / wall:5.1f} %", file=stream)
        groups: dict[str, dict[str, float]] = {}
        for p in self.phases:
            if p.group:
                mine = groups.setdefault(p.group, {})
                mine[p.category] = mine.get(p.category, 0.0) + p.seconds
        for group, mine in groups.items():
            parts = ", ".join(f"{c} {s:.2f}" for c, s in mine.items())
            print(f"  {group}: {parts} s", file=stream)
        training = sum(totals.get(category, 0.0) for category in TRAINING)
        print(f"  fixed work (wall less epochs and validation): {wall - training:.2f} s "
              f"({100 * (wall - training) / wall:.1f} %)", file=stream)


TIMELINE = Timeline()
phase = TIMELINE.phase
