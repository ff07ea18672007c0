"""Shared fixtures. Helpers that are not fixtures live in tests/helpers/ (a package).

`make test` runs the suite on two pytest-xdist workers with `--dist loadgroup` (README: Tests):
every test goes to whichever worker is free, except that the tests of one module that share a
module-scoped fixture (a training run, a logged study, the GPU check script's report) form one
group, so that the fixture is built once, on one worker, instead of once per worker.
"""

from __future__ import annotations

import pytest

from tests.helpers import cli as cli_helpers
from tests.helpers.cli import TINY


@pytest.fixture
def tiny() -> list[str]:
    """Overrides for a run that takes seconds: tiny model, few steps, small evaluation."""
    return list(TINY)


@pytest.fixture(scope="session", autouse=True)
def _token_seed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The folder where tests.helpers.cli.seed_tokens builds the token cache, once per process."""
    cli_helpers.TOKEN_SEED = tmp_path_factory.mktemp("token_seed")


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    """Whether the test asks for a fixture built once per module, class or package, by name or
    through another fixture. Autouse ones are left out: in this suite they only pin torch's
    thread count, which costs nothing to do on every worker."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a Python test function
        return False
    autouse = set(info.initialnames) - set(info.argnames)
    return any(
        d.scope in ("module", "class", "package")
        for name in info.names_closure
        if name not in autouse
        for d in info.name2fixturedefs.get(name, ())
    )


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
