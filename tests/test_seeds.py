"""A failing parity test names the fresh seeds it drew, and LLAVA_JAX_SEEDS replays them."""

from __future__ import annotations

import re

pytest_plugins = ["pytester"]

CONFTEST = "from tests.conftest import pytest_runtest_makereport, pytest_runtest_setup  # noqa: F401\n"
FAILING = """
from tests._seeds import fresh_seed

def test_passes():
    fresh_seed()

def test_fails():
    fresh_seed(), fresh_seed()
    assert False
"""


def test_a_failing_test_reports_its_seeds_and_they_replay(pytester, monkeypatch):
    monkeypatch.delenv("LLAVA_JAX_SEEDS", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_draws=FAILING)
    result = pytester.runpytest("-q")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    match = re.search(r"this test drew seeds (\d+),(\d+); replay them with LLAVA_JAX_SEEDS=\1,\2 ", out)
    assert match, out
    assert out.count("this test drew seeds") == 1, out  # the passing test's seed is not reported
    seeds = [int(s) for s in match.groups()]
    pytester.makepyfile(test_replay=f"""
from tests._seeds import fresh_seed

def test_replays():
    assert [fresh_seed(), fresh_seed()] == {seeds}
""")
    monkeypatch.setenv("LLAVA_JAX_SEEDS", ",".join(map(str, seeds)))
    pytester.runpytest("-q", "test_replay.py").assert_outcomes(passed=1)
