"""MLflow: the one URI resolver, runs and their status, the sweep's parent run, the schema."""

from pipeline.tracking.uri import resolve_tracking_uri

__all__ = ["resolve_tracking_uri"]
