"""Test-session hooks: a failing test's report names the fresh seeds it drew (tests/_seeds.py)."""

from __future__ import annotations

import pytest

from tests import _seeds


def pytest_runtest_setup(item):
    _seeds.drawn.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _seeds.drawn:
        seeds = ",".join(map(str, _seeds.drawn))
        report.sections.append(("fresh seeds", f"this test drew seeds {seeds}; replay them with "
                                f"{_seeds.SEEDS_ENV}={seeds} python -m pytest '{item.nodeid}'"))
