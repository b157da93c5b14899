"""A new SQLite store is a copy of MLflow's empty schema: the same store MLflow would make."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from vaebench.spec.config import VaebenchError
from vaebench.tracking.schema import seed_store, template
from vaebench.tracking.tracker import MLflowTracker


def schema_of(db: Path) -> tuple[list[tuple], list[tuple[str]], list[tuple]]:
    """Every table's and index's definition, the Alembic revision and the workspaces rows.

    A definition is its SQL's comma-separated parts in sorted order, and a table's columns in
    their order: MLflow's own migrations list a table's constraints in an order that differs
    from one creation to the next (two stores MLflow made itself differed so)."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        objects = connection.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
            "ORDER BY type, name"
        ).fetchall()
        definitions = [
            (kind, name, sorted(part.strip() for part in (sql or "").split(",")),
             connection.execute(f"PRAGMA table_info('{name}')").fetchall())
            for kind, name, sql in objects
        ]
        revision = connection.execute("SELECT * FROM alembic_version").fetchall()
        workspaces = connection.execute("SELECT * FROM workspaces").fetchall()
    return definitions, revision, workspaces


def default_experiment(db: Path) -> tuple:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        return connection.execute(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments"
        ).fetchall()


def test_a_seeded_store_is_the_store_mlflow_makes_itself(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("VAEBENCH_CACHE", str(tmp_path / "cache"))
    by_mlflow, seeded = tmp_path / "mlflow" / "mlflow.db", tmp_path / "seeded" / "mlflow.db"
    for folder in (by_mlflow.parent, seeded.parent):
        folder.mkdir()
        monkeypatch.chdir(folder)  # MLflow puts the Default experiment's artifacts here
        if folder == seeded.parent:
            assert seed_store(seeded)
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()

    assert schema_of(seeded) == schema_of(by_mlflow)
    assert default_experiment(seeded) == [
        (0, "Default", str(seeded.parent / "mlruns" / "0"), "active")
    ]
    assert default_experiment(by_mlflow) == [
        (0, "Default", str(by_mlflow.parent / "mlruns" / "0"), "active")
    ]


def test_the_tracker_seeds_a_new_store_and_leaves_an_existing_one(tmp_path, monkeypatch):
    import mlflow.store.db.utils

    monkeypatch.setenv("VAEBENCH_CACHE", str(tmp_path / "cache"))
    template()  # made first: from here on MLflow must not create a schema

    def refuse(engine):
        raise AssertionError("MLflow created the schema: the store was not seeded")

    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", refuse)
    db = tmp_path / "mlflow.db"
    tracker = MLflowTracker(f"sqlite:///{db}")
    parent = tracker.start_grid("seeded", "invocation", {})
    run = tracker.start_run("s0", {"loss.beta": 1.0}, {})
    tracker.log_metrics(run, {"val_elbo": -100.0}, step=1)
    tracker.end_run(run)
    tracker.end_run(parent)
    assert not seed_store(db)  # a store is there: it is not replaced
    reopened = MLflowTracker(f"sqlite:///{db}")
    assert [e.name for e in reopened.client.search_experiments()] == ["seeded", "Default"]
    assert reopened.client.get_run(run).data.metrics == {"val_elbo": -100.0}


def test_an_unusable_cache_leaves_the_store_to_mlflow(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("VAEBENCH_CACHE", str(blocked))
    db = tmp_path / "mlflow.db"
    assert not seed_store(db)
    assert not db.exists() and not list(tmp_path.glob(".mlflow.db.*"))
    MLflowTracker(f"sqlite:///{db}")  # MLflow creates the schema itself
    assert schema_of(db)[1]


def test_a_damaged_template_is_made_again_and_the_store_created_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEBENCH_CACHE", str(tmp_path / "cache"))
    damaged = template()
    damaged.write_bytes(damaged.read_bytes()[:5000])  # truncated
    first = tmp_path / "first" / "mlflow.db"
    first.parent.mkdir()
    MLflowTracker(f"sqlite:///{first}")  # MLflow creates this one itself
    assert schema_of(first)[1] and not damaged.exists()
    second = tmp_path / "second" / "mlflow.db"
    second.parent.mkdir()
    assert seed_store(second) and damaged.exists()  # made again, and used


def test_a_copy_mlflow_refuses_is_removed_with_its_template(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEBENCH_CACHE", str(tmp_path / "cache"))
    stale = template()
    with contextlib.closing(sqlite3.connect(stale)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = 'an-older-revision'")
    db = tmp_path / "mlflow.db"
    with pytest.raises(VaebenchError, match="schema template, did not open .*run again"):
        MLflowTracker(f"sqlite:///{db}")
    assert not db.exists() and not stale.exists()
    MLflowTracker(f"sqlite:///{tmp_path / 'again.db'}")  # a new template, a sound store
    assert schema_of(tmp_path / "again.db")[1] == schema_of(stale)[1]
