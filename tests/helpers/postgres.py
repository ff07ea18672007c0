"""A throwaway PostgreSQL cluster on 127.0.0.1 for tests (Debian's postgresql package).

PostgreSQL refuses to run as root, so as root the cluster is created and started as the
`postgres` system user (the package creates it) in a temporary folder that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> str | None:
    """None when a cluster can be started here, else why not (a skip reason)."""
    if not (_bin("initdb") and _bin("pg_ctl")):
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


@contextmanager
def cluster(databases: tuple[str, ...] = ("optuna", "mlflow")) -> Iterator[dict[str, str]]:
    """Start a cluster with `databases`; yields {db: SQLAlchemy URL}; stops and removes it after."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    owner = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="pg-test-"))
    data, port = root / "data", free_port()
    if owner:
        entry = pwd.getpwnam(owner)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    run = lambda cmd: subprocess.run(_as_owner(cmd, owner), check=True, capture_output=True, text=True, timeout=120)
    try:
        run([_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"])
        opts = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off"
        run([_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "server.log"), "-w", "start"])
        for db in databases:
            run([_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db])
        yield {db: f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{db}" for db in databases}
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                _as_owner([_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], owner),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)
