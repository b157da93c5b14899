"""Where the MLflow store is: the URI, an SQLite file and its creation lock, a server's probe;
plain functions without MLflow, so that checking a URI costs no MLflow import."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

from vaebench.spec.config import VaebenchError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
T = TypeVar("T")


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri.removeprefix(prefix)).expanduser() if uri.startswith(prefix) else None


# MLflow's HTTP client retries for minutes before it reports a server that went away; these
# bound a dead server to seconds (the user's own values win)
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


@contextlib.contextmanager
def creation_lock(db: Path | None):
    """For an SQLite store, an exclusive lock on ``<file>.lock`` while the store is opened:
    processes that create one SQLite schema at once corrupt it, so they take turns."""
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:  # not left to the close: a process forked meanwhile shares the descriptor
            fcntl.flock(lock, fcntl.LOCK_UN)


SERVER_PROBE_SECONDS = 5.0


def check_server(uri: str, timeout: float = SERVER_PROBE_SECONDS) -> None:
    """A tracking server must answer its ``/health`` within seconds (MLflow retries for minutes)."""
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            if reply.status == 200:
                return
            reason = f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # refused, unreachable, timed out, malformed
        reason = str(getattr(exc, "reason", None) or exc)
    raise VaebenchError(
        f"tracking URI {uri}: no MLflow server answers at {url} within {timeout:g} s ({reason})"
    )


LOCK_WAIT_ENV = "VAEBENCH_STORE_WAIT"  # seconds a locked SQLite store is waited for (60)


def while_locked(uri: str, call: Callable[[], T]) -> T:
    """``call()``, tried again while another process (a backup, an ``sqlite3`` shell) holds
    the SQLite store locked, for up to ``$VAEBENCH_STORE_WAIT`` seconds, saying once who holds
    it; then the lock's error is raised. Each try waits SQLite's own 5 s first."""
    deadline = None
    while True:
        try:
            return call()
        except Exception as exc:
            if "database is locked" not in str(exc):
                raise
            if deadline is None:
                wait = float(os.environ.get(LOCK_WAIT_ENV, 60))
                deadline = time.monotonic() + wait
                print(f"vaebench: the MLflow store {uri} is locked by {_holders(uri)}; waiting "
                      f"up to {wait:.0f} s (${LOCK_WAIT_ENV})", file=sys.stderr, flush=True)
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def _holders(uri: str) -> str:
    """The other processes that have the store's file open, as ``pid N (name)``."""
    db, found = sqlite_path(uri), []
    path = str(db.resolve()) if db is not None else None
    for process in psutil.process_iter(["pid", "name"]) if path else ():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and any(f.path == path for f in process.open_files()):
                found.append(f"pid {process.pid} ({process.info['name']})")
    return ", ".join(found) or "another process"
