"""Shared fixtures, and how `make test` shares the suite out. Helpers that are not fixtures live in
tests/helpers/ (a package).

`make test` runs the suite on pytest-xdist workers with `--dist loadgroup` (README: Tests): each
test goes to whichever worker is free, except that the tests of a module in
SHARED_FIXTURE_MODULES go to one worker together, so that the module fixture they share (a
training run, a logged study, the GPU check script's report) is built once rather than once per
worker. xdist's own way to say this, an `xdist_group` mark, does nothing with pytest 9.2: xdist
tags the test's node id with the group and pytest 9.2 no longer lets it
(https://github.com/pytest-dev/pytest-xdist/issues/1386); the scheduler below groups by module
path instead, which needs no node id changed.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import cli as cli_helpers
from tests.helpers.cli import TINY

# Modules with tests that share a module-scoped fixture worth seconds or more. Collection warns
# about a module missing here (pytest_collection_modifyitems below).
SHARED_FIXTURE_MODULES = frozenset(
    {
        "tests/test_cpu_budget.py",  # six runs at the CPU budget (slow)
        "tests/test_data.py",  # the embedded corpus, tokenized
        "tests/test_ddp.py",  # a run in 1 and in 2 processes (slow)
        "tests/test_extrapolation.py",  # four models trained on real text (slow)
        "tests/test_gpu_check.py",  # the GPU check script in CPU mode: 45 s of CPU
        "tests/test_report.py",  # a logged study and its report
        "tests/test_swap.py",  # a gpt1 run through the CLI
        "tests/test_tracking_uri.py",  # a run through the CLI
        "tests/test_train.py",  # two runs through the CLI
        "tests/test_ui.py",  # a logged study and its report
        "tests/test_ui_browser.py",  # a sweep, its report and the UI server (slow)
    }
)


def pytest_configure(config: pytest.Config) -> None:
    """On a test worker beside others, one torch thread, for this process and the commands it
    starts: the suite's models are tiny, and intra-op threads on cores the other workers use
    only spin (on 2 cores, 2 workers x 2 threads). Serial runs keep torch's default."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(key, "1")


@pytest.fixture
def tiny() -> list[str]:
    """Overrides for a run that takes seconds: tiny model, few steps, small evaluation."""
    return list(TINY)


@pytest.fixture(scope="session", autouse=True)
def _token_seed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The folder where tests.helpers.cli.seed_tokens builds the token cache, once per process."""
    cli_helpers.TOKEN_SEED = tmp_path_factory.mktemp("token_seed")


def _module_fixture(item: pytest.Item) -> str | None:
    """The name of a fixture built once per module, class or package that the test asks for (by
    name or through another fixture), if any. Autouse ones are left out: in this suite they only
    pin torch's thread count, which costs nothing to repeat on every worker."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a Python test function
        return None
    autouse = set(info.initialnames) - set(info.argnames)
    for name in info.names_closure:
        if name not in autouse and any(
            d.scope in ("module", "class", "package") for d in info.name2fixturedefs.get(name, ())
        ):
            return name
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Warn when a module's tests share a module fixture but the module is not grouped."""
    missing: dict[str, str] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path not in SHARED_FIXTURE_MODULES and path not in missing and (name := _module_fixture(item)):
            missing[path] = name
    for path, name in missing.items():
        config.issue_config_time_warning(
            pytest.PytestWarning(
                f"{path} shares the module fixture {name!r}: add it to SHARED_FIXTURE_MODULES in "
                "tests/conftest.py, or each test worker builds it again"
            ),
            stacklevel=2,
        )


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadgroup`: the tests of a SHARED_FIXTURE_MODULES module are one unit of work, every
    other test a unit of its own. Units with more tests are handed out first (xdist's loadscope
    order), so the long grouped modules start early rather than last."""
    if config.getvalue("dist") != "loadgroup":
        return None  # any other --dist: xdist's own scheduler
    from xdist.scheduler import LoadGroupScheduling

    class ModuleFixtureScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)  # an xdist_group mark, where xdist can still apply it
            if scope != nodeid:
                return scope
            path = nodeid.split("::", 1)[0]
            return path if path in SHARED_FIXTURE_MODULES else nodeid

    return ModuleFixtureScheduling(config, log)
