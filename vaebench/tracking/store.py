"""Where the MLflow store is: the URI, an SQLite file and its creation lock, a server's probe;
plain functions without MLflow, so that checking a URI costs no MLflow import."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from vaebench.spec.config import VaebenchError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


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
