"""The Optuna storage that several worker processes share.

SQLite, the default, needs three things for that (https://www.sqlite.org/wal.html,
https://www.sqlite.org/lang_transaction.html):
- the WAL journal, so readers never block the writer;
- a busy timeout, so a writer waits for the lock instead of failing with "database is locked";
- BEGIN IMMEDIATE, so a transaction takes the write lock before it reads. Optuna claims a
  WAITING trial by reading its state and updating it in one transaction, relying on
  SELECT ... FOR UPDATE, which SQLite ignores: with deferred transactions two workers can
  both read WAITING and both take the trial.
Tables are created (and Optuna's schema checked) under a file lock next to the database, so
workers that start together on a fresh file do not race.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.storages import BaseStorage, RDBStorage
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///optuna.db"
BUSY_TIMEOUT_S = 60.0  # a writer waits this long for the lock (pysqlite's `timeout`)
LOCK_TIMEOUT_S = 300.0  # creating or migrating a store holds the file lock this long at most
T = TypeVar("T")


def resolve_storage(storage: str | None) -> str:
    """The storage URL; a relative SQLite path is made absolute against the working directory
    at launch, so jobs that chdir (hydra.job.chdir=true) and worker processes reach the same file."""
    url = storage or DEFAULT_URL
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/") and url[len(prefix) :] != ":memory:":
        url = prefix + os.path.abspath(url[len(prefix) :])
    return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite:/// URL; None for other databases and in-memory SQLite."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(url[len(prefix) :].split("?", 1)[0])


@contextmanager
def store_lock(url: str) -> Iterator[None]:
    """Hold an inter-process lock on a store: a file lock next to a SQLite file (`<file>.lock`),
    an advisory lock in a PostgreSQL database (any machine), a no-op for other URLs. Held while
    a first start creates a study and enqueues its grid, so two starts at once enqueue it once."""
    path = sqlite_path(url)
    if path is None:
        if _backend(url) == "postgresql":
            with _pg_lock(url):
                yield
        else:
            yield
        return
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
        yield


def _backend(url: str) -> str | None:
    try:
        return make_url(url).get_backend_name()
    except Exception:  # not a SQLAlchemy URL: check_store / RDBStorage report it
        return None


_PG_LOCK_KEY = zlib.crc32(b"pipeline_optuna_sweeper.store_lock")  # one lock per database
_PG_ENGINES: dict[str, Engine] = {}


@contextmanager
def _pg_lock(url: str) -> Iterator[None]:
    """A session-level PostgreSQL advisory lock (https://www.postgresql.org/docs/current/
    explicit-locking.html#ADVISORY-LOCKS) on a connection of its own, taken with retries up to
    LOCK_TIMEOUT_S; the server releases it if this process dies while holding it."""
    if url not in _PG_ENGINES:
        _PG_ENGINES[url] = create_engine(url, poolclass=NullPool)
    with _PG_ENGINES[url].connect() as con:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while not con.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_LOCK_KEY}).scalar():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the store lock (advisory lock {_PG_LOCK_KEY}) was held for over {LOCK_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.2)
        try:
            yield
        finally:
            con.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
            con.commit()


_OPEN: dict[tuple[str, tuple[tuple[str, Any], ...]], BaseStorage] = {}


def open_storage(storage: str | None, heartbeat: dict[str, Any] | None = None) -> BaseStorage:
    """The storage for a URL, opened once per process; SQLite tuned for concurrent workers.
    `heartbeat`: RDBStorage's heartbeat_interval and grace_period (heartbeat.py), or none.
    A SQLite file that is corrupt, empty or cannot be created is refused in one line naming it
    (never silently replaced by a new study)."""
    from pipeline.errors import one_line
    from pipeline.tracking.uri import StoreError, check_store, redact

    from .heartbeat import quiet

    url = resolve_storage(storage)
    beat = dict(heartbeat or {})
    key = (url, tuple(sorted(beat.items())))
    if key in _OPEN:
        return _OPEN[key]
    check_store(url, "Optuna storage")
    try:
        if sqlite_path(url) is None:
            with quiet():
                opened: BaseStorage = RDBStorage(url, **beat)
        else:
            with store_lock(url), quiet():
                rdb = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": BUSY_TIMEOUT_S}}, **beat)
                with rdb.engine.connect() as con:  # persistent: set once per file
                    con.exec_driver_sql("PRAGMA journal_mode=WAL")
            serialize_transactions(rdb.engine)
            opened = rdb
    except Exception as e:  # a server that refuses, a schema from another Optuna version
        raise StoreError(f"Optuna storage {redact(url)} cannot be opened: {one_line(e).splitlines()[0]}") from e
    _OPEN[key] = opened
    return opened


def serialize_transactions(engine: Engine) -> None:
    """Every transaction on this SQLite engine starts with BEGIN IMMEDIATE (SQLAlchemy's recipe
    for pysqlite: the driver's own implicit BEGIN is turned off)."""

    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks are not reused


def retrying(fn: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Call `fn`, retrying a few times with backoff when the database was locked past the busy
    timeout (a long write elsewhere); other errors go through."""
    for attempt in range(attempts):
        try:
            return fn()
        except optuna.exceptions.StorageInternalError as e:
            if "locked" not in str(e.__cause__ or e) or attempt == attempts - 1:
                raise
            delay = 0.5 * 2**attempt
            log.warning("%s: the database is locked; retrying in %.1f s", what, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
