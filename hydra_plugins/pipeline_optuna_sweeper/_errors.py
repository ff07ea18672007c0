"""The sweeper's exceptions, in a module Hydra's plugin scan skips (its name starts with "_"):
the scan executes every other plugin module a second time, and a class defined there twice
would not match an `except` written against the first one (e.g. in pipeline.train)."""

from __future__ import annotations

from hydra.errors import HydraException


class SearchSpaceError(ValueError):
    """An override or sweeper setting that this sweeper cannot use."""


class LauncherSettingError(ValueError):
    """A `hydra.launcher` setting (or launcher/sweeper pairing) that cannot submit workers."""


class InvalidSweepError(ValueError):
    """Every point of a sweep is invalid: nothing was launched and no run exists."""


class SweepFailedError(HydraException):
    """Raised at the end of a sweep in which trials failed, so the exit code is non-zero."""
