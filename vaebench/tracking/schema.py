"""A new SQLite MLflow store starts as a copy of an empty schema that MLflow made once (its
migrations take 1.5 s per fresh store; see docs/performance.md). The template has no Default
experiment, whose artifact location is one store's folder. A copy MLflow refuses to open is an
error, not retried here: MLflow keeps a connection pool per store URI."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from vaebench.tracking.store import creation_lock

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

CACHE_ENV = "VAEBENCH_CACHE"  # the same folder the classifier's cache honours


def cache_folder() -> Path:
    chosen = os.environ.get(CACHE_ENV)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "vaebench"


def template_name() -> str:
    """Named by the versions and a digest of MLflow's migration scripts' names (each names its
    revision): builds of one version string with other migrations get another template."""
    from importlib.metadata import version
    from importlib.util import find_spec

    spec = find_spec("mlflow")
    folder = Path(next(iter(spec.submodule_search_locations))) / "store" / "db_migrations"
    names = sorted(p.name for p in (folder / "versions").glob("*.py"))
    migrations = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return (
        f"mlflow-schema-{version('mlflow')}-{migrations}-sqlalchemy-{version('sqlalchemy')}"
        f"-alembic-{version('alembic')}.db"
    )


def template() -> Path:
    """The template for the installed versions, made first if missing: renamed into place only
    when complete."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / template_name()
    with creation_lock(path):
        if path.exists():
            return path
        from mlflow.tracking import MlflowClient

        with tempfile.TemporaryDirectory(dir=folder, prefix=".schema-") as scratch:
            draft = Path(scratch) / "mlflow.db"
            MlflowClient(tracking_uri=f"sqlite:///{draft}").search_experiments(max_results=1)
            with contextlib.closing(sqlite3.connect(draft)) as db, db:
                db.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
                db.execute("DELETE FROM experiments WHERE experiment_id = 0")
            os.replace(draft, path)
    return path


def seed_store(db: Path) -> bool:
    """Copy the template to ``db`` (under the store's creation lock) if no store is there yet;
    True when it did. Any failure leaves ``db`` absent, for MLflow to create; a damaged template
    is removed (made again next time); a store another process made meanwhile is kept."""
    if db.exists():
        return False
    partial = db.with_name(f".{db.name}.{os.getpid()}.seeding")
    try:
        source = template()
        shutil.copyfile(source, partial)
        try:  # SQLite's own check of the copy, and the schema's revision is there
            with contextlib.closing(sqlite3.connect(partial)) as connection:
                checked = connection.execute("PRAGMA quick_check").fetchall()
                revisions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.DatabaseError:  # not a database, or no schema in it
            checked = revisions = []
        if checked != [("ok",)] or len(revisions) != 1:
            source.unlink()
            return False
        os.link(partial, db)  # never replaces a store that appeared meanwhile
    except Exception:  # noqa: BLE001 - the template is an optimisation; MLflow creates instead
        return False
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()
    return True


def open_store(uri: str, db: Path | None) -> MlflowClient:
    """MLflow's client of the store at ``uri`` (``db``: its SQLite file, if it is one), created
    first if new, seeded from the template under the creation lock."""
    from mlflow.tracking import MlflowClient

    seeded = False
    try:
        with creation_lock(db):
            seeded = db is not None and seed_store(db)
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # creates the schema once
    except Exception as exc:
        if not seeded:
            raise
        for path in (db, cache_folder() / template_name()):  # the store holds nothing yet
            with contextlib.suppress(OSError):
                path.unlink()
        raise ValueError(
            f"the new store, a copy of vaebench's schema template, did not open ({exc}); "
            "both are removed: run again"
        ) from None
    return client
