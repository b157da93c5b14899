"""A throw-away PostgreSQL server from the local binaries, on a free loopback port.

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` system
user (``runuser``), in a folder it owns. ``.ci/run`` installs Debian's ``postgresql``
where the binaries are missing; a machine without them fails the test with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

USER = "vaebench"


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail(f"no {name}: install PostgreSQL (Debian: apt-get install postgresql)")
    return found


def _as_server_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _run(args: list[str]) -> None:
    done = subprocess.run(_as_server_user() + args, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """A PostgreSQL server listening on 127.0.0.1 only; yields a SQLAlchemy URL
    (``postgresql+psycopg://``) for each of ``databases``, created empty, and ``port``."""
    folder = Path(tempfile.mkdtemp(prefix="vaebench-pg-"))
    if os.geteuid() == 0:  # the server's user owns its folder (not reachable under pytest's)
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
    data = folder / "data"
    port = free_port()
    _run([_binary("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"])
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder}"
    _run([_binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"),
          "-w", "start"])
    try:
        for name in databases:
            _run([_binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, name])
        urls = {name: f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{name}" for name in databases}
        yield {**urls, "port": str(port)}
    finally:
        subprocess.run(
            _as_server_user() + [_binary("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


def addresses_on(ports: set[int]) -> list[str]:
    """Every local address (``ss -ltn``) that listens on one of ``ports``."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    found = [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]
    return [address for address in found if int(address.rsplit(":", 1)[1]) in ports]
