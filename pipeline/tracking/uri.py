"""The one tracking-URI resolver (explicit > MLFLOW_TRACKING_URI > ./mlflow.db), store checks,
and URLs with their password hidden."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ENV = "MLFLOW_TRACKING_URI"
_SQLITE_MAGIC = b"SQLite format 3\x00"


class StoreError(RuntimeError):
    """A tracking or study store that cannot be opened or written; the message names the file."""


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store to use: an explicit URI (a flag, `tracking.uri`, what a run recorded) wins, then
    the MLFLOW_TRACKING_URI environment variable, then ./mlflow.db in the working folder."""
    return explicit or os.environ.get(ENV) or default_tracking_uri()


def redact(url: str) -> str:
    """`url` with its password replaced by ***, for params, tags, logs and reports."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (sqlite:///rel, sqlite:////abs), else None."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    return None if not db or db == ":memory:" or db.startswith("file:") else Path(db)


def check_store(url: str, what: str) -> None:
    """Refuse, in one line naming the file, a SQLite store that cannot be used: its folder is a
    file or read-only, or the file exists but is not an intact SQLite database (empty, garbled,
    truncated). A store that does not exist yet is fine: it is created. Other databases (a
    server) are checked by their own client when opened."""
    path = sqlite_path(url)
    if path is None:
        return
    path = path.expanduser().absolute()
    shown = f"{what} {path}"
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not folder.is_dir():
        raise StoreError(f"{shown} cannot be created: '{folder}' is a file, not a folder; choose another path")
    if not path.exists():
        if not os.access(folder, os.W_OK):
            raise StoreError(f"{shown} cannot be created: folder '{folder}' is not writable; choose another path")
        return
    if not path.is_file():
        raise StoreError(f"{shown} is not a file; choose another path")
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"{shown} cannot be read and written; fix its permissions")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
    if size == 0 or head != _SQLITE_MAGIC:
        kind = "is empty (0 bytes)" if size == 0 else "is not a SQLite database (corrupt or another file)"
        raise StoreError(f"{shown} {kind}; restore it from a backup, or move it away to start a new store")
    try:  # quick_check reads every page: garbled or truncated pages are found now, not mid-sweep
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            result = con.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        result = str(e)
    if result != "ok":
        raise StoreError(
            f"{shown} is corrupt ({result.splitlines()[0]}); "
            "restore it from a backup, or move it away to start a new store"
        )
