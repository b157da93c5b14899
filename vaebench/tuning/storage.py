"""Where an Optuna study lives (docs/tuning.md), named by one string checked before anything
is created."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from vaebench.spec.config import VaebenchError, first_line
from vaebench.tracking.store import sqlite_path

MEMORY = "memory"
JOURNAL = "journal:"
SQLITE_TIMEOUT_S = 60  # several processes share one SQLite file; wait for the lock
# Optuna's heartbeat on RDB storages: a trial that has not beaten for GRACE seconds is stale
# ($VAEBENCH_HEARTBEAT_SECONDS: tests)
HEARTBEAT_SECONDS = int(os.environ.get("VAEBENCH_HEARTBEAT_SECONDS", 60))
GRACE_BEATS = 3
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def resolve_storage(chosen: str | None, tracking_uri: str) -> str:
    """A SQLAlchemy URL, ``journal:<file>`` or ``memory``; default: ``optuna.db`` beside the
    MLflow SQLite file, else in the working folder."""
    if not chosen:
        db = sqlite_path(tracking_uri)
        return f"sqlite:///{(db.parent if db is not None else Path('.')) / 'optuna.db'}"
    chosen = chosen.strip()
    if chosen in (MEMORY, ":memory:"):
        return MEMORY
    if chosen.startswith(JOURNAL) or "://" in chosen:
        return chosen
    if chosen.endswith(".log"):
        return JOURNAL + chosen
    return f"sqlite:///{chosen}"


def display_storage(ref: str) -> str:
    if "://" not in ref:
        return ref
    from sqlalchemy.engine import make_url

    try:
        return make_url(ref).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given
        return ref


def check_storage(ref: str) -> None:
    if ref == MEMORY:
        return
    path = Path(ref.removeprefix(JOURNAL)) if ref.startswith(JOURNAL) else sqlite_path(ref)
    if path is not None:
        if not path.expanduser().resolve().parent.is_dir():
            raise VaebenchError(f"storage {ref}: folder {path.parent} does not exist")
        return
    from sqlalchemy.engine import make_url

    try:
        make_url(ref).get_dialect().import_dbapi()
    except ImportError as exc:
        raise VaebenchError(f"storage {display_storage(ref)}: {first_line(exc)} (install the "
                            'database driver; for postgresql+psycopg:// URLs: pip install -e '
                            '".[postgres]")') from None
    except Exception as exc:  # noqa: BLE001 - unparsable URL, unknown dialect
        raise VaebenchError(f"storage {display_storage(ref)}: {first_line(exc)}") from None


def heartbeat_seconds(storage: optuna.storages.BaseStorage) -> int | None:
    """How often a trial on ``storage`` beats, None where it has no heartbeat (journal files,
    memory: there vaebench's own lease in the trial's user attributes stands in)."""
    interval = getattr(storage, "get_heartbeat_interval", None)  # RDB, and Optuna's cache of it
    return interval() if interval is not None else None


def open_storage(ref: str, on_stale: StaleCallback | None = None) -> optuna.storages.BaseStorage:
    """``on_stale``: Optuna's callback for each trial it fails for a stopped heartbeat."""
    if ref == MEMORY:
        return optuna.storages.InMemoryStorage()
    if ref.startswith(JOURNAL):
        path = Path(ref.removeprefix(JOURNAL)).expanduser()
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.journal.JournalStorage(backend)
    local = ref.startswith("sqlite")
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if local else None
    for attempt in range(2):
        try:
            return optuna.storages.RDBStorage(
                ref, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_BEATS * HEARTBEAT_SECONDS,
                heartbeat_stale_trial_callback=on_stale)
        except Exception as exc:  # noqa: BLE001 - unreachable server, bad credentials, ...
            if attempt == 0 and not local:  # another process creating the tables just now
                time.sleep(1.0)
                continue
            raise VaebenchError(f"storage {display_storage(ref)}: {first_line(exc)}") from None
    raise AssertionError("unreachable")
