"""Ctrl-C and SIGTERM (docs/resume.md): inside :func:`interruptible` the first one raises
:class:`Interrupted` in the main thread, a KeyboardInterrupt so that Optuna and every ``except
KeyboardInterrupt`` treat it as one; inside :func:`deferred_signals` it waits for the block's
end, so no write is cut in half; a second one ends the process and its registered children."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from vaebench.whole_lines import write_whole_lines

HANDLED = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(f"interrupted by {NAMES.get(signum, signal.Signals(signum).name)}")


class _State:
    active = False  # inside interruptible()
    received: int | None = None  # the first signal, once it came
    deferring = 0  # depth of deferred_signals() blocks
    pending: int | None = None  # a signal that came during a deferred block
    children: set[int] = set()


def _handle(signum: int, frame) -> None:
    if _State.received is not None:  # the second one: no more cleaning up
        print(f"vaebench: {NAMES.get(signum, signum)} again: exiting now", file=sys.stderr)
        for pid in list(_State.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(128 + signum)
    _State.received = signum
    if _State.deferring:
        _State.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as above for the duration of the block (main thread only;
    elsewhere the block runs with the handlers it has)."""
    if threading.current_thread() is not threading.main_thread() or _State.active:
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in HANDLED}
    _State.active, _State.received, _State.pending = True, None, None
    try:
        yield
    finally:
        if _State.received is None:  # after a first signal, a second one still exits at once
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        _State.active = False


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold a first signal until the block ends, then raise it. Signals reach the main thread
    only: elsewhere (a system-metrics thread, a future's callback) the block holds nothing,
    and must not raise the main thread's signal in a thread that cannot handle it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
        if not _State.deferring and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            raise Interrupted(signum)


def register_child(pid: int) -> None:
    """A worker process that a second signal kills with this one."""
    _State.children.add(pid)


def forget_child(pid: int) -> None:
    _State.children.discard(pid)


PR_SET_PDEATHSIG = 1


def become_helper_process() -> None:
    """In a helper process this one started: a process group of its own (a terminal's Ctrl-C
    reaches the invocation's process alone), deaf to SIGINT and SIGTERM (its parent decides
    when it stops), and killed when its parent dies (Linux)."""
    import ctypes

    os.setpgrp()
    write_whole_lines()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
