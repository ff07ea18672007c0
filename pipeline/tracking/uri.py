"""The one tracking-URI resolver: explicit > MLFLOW_TRACKING_URI > ./mlflow.db."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MLFLOW_TRACKING_URI"


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store to use: an explicit URI (a flag, `tracking.uri`, what a run recorded) wins, then
    the MLFLOW_TRACKING_URI environment variable, then ./mlflow.db in the working folder."""
    return explicit or os.environ.get(ENV) or default_tracking_uri()
