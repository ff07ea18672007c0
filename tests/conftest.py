"""Shared fixtures. Helpers that are not fixtures live in tests/helpers/ (a package)."""

from __future__ import annotations

import pytest

from tests.helpers.cli import TINY


@pytest.fixture
def tiny() -> list[str]:
    """Overrides for a run that takes seconds: tiny model, few steps, small evaluation."""
    return list(TINY)
