"""Shared fixtures: the real MNIST data root and a temporary MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The data root holding real MNIST: $VAEBENCH_DATA, else ../shared/data beside the repo."""
    root = Path(os.environ.get("VAEBENCH_DATA") or REPO.parent / "shared" / "data").resolve()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"no MNIST under {root}/MNIST/raw: set VAEBENCH_DATA to a data root")
    return root


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True, scope="session")
def classifier_cache(tmp_path_factory):
    """Keep the digit classifier's cache out of the shared data folder (trained once a session)."""
    folder = tmp_path_factory.mktemp("classifier-cache")
    saved = os.environ.get("VAEBENCH_CACHE")
    os.environ["VAEBENCH_CACHE"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("VAEBENCH_CACHE", None)
    else:
        os.environ["VAEBENCH_CACHE"] = saved
