"""The MLflow store under concurrent writers: created and migrated once, SQLite in WAL mode.

Several processes write to one SQLite store in a sweep with workers (the coordinator's parent
run, every worker's child runs and metrics). Two things keep those writes from failing:
- `prepared(uri)`: the store is created and migrated under a file lock (`mlflow.db.lock`);
  MLflow's migration is not safe to run twice at once ("table _alembic_tmp_... already exists");
  the journal is switched to WAL, in which readers never block the writer;
- `busy_timeout()`: every SQLite connection of this process waits up to a minute for the write
  lock instead of failing with "database is locked" (pysqlite's default is 5 s), and does not
  wait for the disk at every commit (synchronous=NORMAL, safe with WAL).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from hydra_plugins.pipeline_optuna_sweeper.storage import BUSY_TIMEOUT_S, sqlite_path, store_lock

_READY: set[str] = set()


def _on_connect(dbapi_connection: Any, record: Any) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        # In WAL mode NORMAL syncs at checkpoints, not at every commit (a metric batch is one
        # commit): still consistent after a crash; a power cut may lose the last commits.
        dbapi_connection.execute("PRAGMA synchronous = NORMAL")


def busy_timeout() -> None:
    """Give every SQLite connection SQLAlchemy opens in this process the busy timeout (MLflow
    creates its engines itself, so the hook is on the Engine class). Idempotent."""
    if not event.contains(Engine, "connect", _on_connect):
        event.listen(Engine, "connect", _on_connect)


@contextmanager
def prepared(uri: str) -> Iterator[None]:
    """Hold the store's lock with the store created, migrated and in WAL mode; a no-op lock for
    stores that are not SQLite files. Do first writes that must not race (an experiment, a
    sweep's parent run) inside the block."""
    busy_timeout()
    path = sqlite_path(uri)
    with store_lock(uri):
        if path is not None and uri not in _READY:
            from mlflow import MlflowClient

            quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..."
            level, quiet.level = quiet.level, logging.WARNING
            try:
                MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the tables
            finally:
                quiet.setLevel(level)
            with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)) as con:
                con.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            _READY.add(uri)
        yield
