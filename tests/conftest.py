"""Shared fixtures: the real MNIST data root, a temporary MLflow store, an MLflow server and
a headless Chromium."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--window-size=1600,1000",
)


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Debian Chromium driven by selenium. A machine without it fails the test with
    the reason (tests/run.sh installs it); it never skips."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(
            f"no {' or '.join(missing)}: install Debian's chromium and chromium-driver "
            "(bash tests/run.sh does)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(
    backend_uri: str, log: Path, cwd: Path | None = None, timeout: float = 90.0
) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on a free loopback port, in a session of its own (so that
    :func:`stop_server` ends its workers too); returns it and its base URL once /health
    answers. Artifacts go under ``cwd`` (default: the working folder)."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with log.open("w") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            pytest.fail(f"mlflow server not up after {timeout} s:\n{log.read_text()}")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the server's whole process group and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, sig)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@contextlib.contextmanager
def mlflow_server(backend_uri: str, log: Path, timeout: float = 90.0, cwd: Path | None = None):
    """``mlflow server`` on a free loopback port; yields its base URL once /health answers."""
    server, url = start_mlflow_server(backend_uri, log, cwd, timeout)
    try:
        yield url
    finally:
        stop_server(server)
