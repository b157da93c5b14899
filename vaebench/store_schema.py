"""A new SQLite MLflow store starts as a copy of an empty schema that MLflow made once.

MLflow creates a store's schema by running its Alembic migrations one after another, about
1.5 s of Python on this project's CPUs: a tenth of a 2-epoch run's whole process, and
paid again by every fresh folder (and every test that trains into a temporary store). The
schema depends only on the versions of MLflow, SQLAlchemy and Alembic, so vaebench has
MLflow create it once per set of versions into a template file, removes the one row that
belongs to a particular store (the Default experiment, whose artifact location is that
store's folder), and copies the template to each new store. MLflow then opens the copy as
a store of its current schema and adds the Default experiment of this store itself, as it
does for any store that lacks it.

The template lives in ``$VAEBENCH_CACHE``, else ``~/.cache/vaebench``. Anything that goes
wrong with it (a read-only home, a damaged file) leaves the store to MLflow's own creation:
the template saves time, it never decides whether a store can be created.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from vaebench.tracking_store import creation_lock

CACHE_ENV = "VAEBENCH_CACHE"  # the same folder the classifier's cache honours


def cache_folder() -> Path:
    chosen = os.environ.get(CACHE_ENV)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "vaebench"


def template_name() -> str:
    from importlib.metadata import version

    return (
        f"mlflow-schema-{version('mlflow')}-sqlalchemy-{version('sqlalchemy')}"
        f"-alembic-{version('alembic')}.db"
    )


def _make_template(path: Path) -> None:
    """MLflow creates a store at a temporary name; its Default experiment is dropped; the
    file is renamed to ``path`` only when complete."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".schema-") as scratch:
        draft = Path(scratch) / "mlflow.db"
        client = MlflowClient(tracking_uri=f"sqlite:///{draft}")
        client.search_experiments(max_results=1)  # creates the schema
        with contextlib.closing(sqlite3.connect(draft)) as db, db:
            db.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        os.replace(draft, path)


def template() -> Path:
    """The template for the installed versions, made first if missing."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / template_name()
    with creation_lock(path):
        if not path.exists():
            _make_template(path)
    return path


def seed_store(db: Path) -> bool:
    """Copy the template to ``db`` if no store is there yet; True when it did. Call it under
    the store's creation lock. Any failure leaves ``db`` absent, for MLflow to create."""
    if db.exists():
        return False
    partial = db.with_name(f".{db.name}.{os.getpid()}.seeding")
    try:
        shutil.copyfile(template(), partial)
        os.replace(partial, db)
    except Exception:  # noqa: BLE001 - the template is an optimisation; MLflow creates instead
        with contextlib.suppress(OSError):
            partial.unlink()
        return False
    return True
