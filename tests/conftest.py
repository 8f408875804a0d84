"""Test-session hooks: one persistent compilation cache for the session; a failing test's report
names the fresh seeds it drew (tests/_seeds.py)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests import _seeds

# Many tests start training, generation or conversion in subprocesses of the same tiny configs; each
# would compile the same programs again (a tiny training run: 61 s cold, 16 s with a warm cache).
# JAX's persistent compilation cache, in one directory per test session that every pytest-xdist
# worker and every subprocess inherits through the environment, compiles each program once. A
# cached program is the same executable (keyed by its HLO, options and versions): results do not
# change. Set JAX_COMPILATION_CACHE_DIR yourself to keep (or to move) it.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llava_jax_test_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_sessionfinish(session, exitstatus):
    # The process that made the directory removes it: with xdist, the controller, after its workers.
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
