"""Test-session hooks: one persistent compilation cache for the session; the slow tests first, spread over
the pytest-xdist workers; a failing test's report names the fresh seeds it drew (tests/_seeds.py)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests import _seeds, _spm, _torchvision

# transformers imports torchvision as soon as it is installed: its CUDA-built ops need placeholders first.
_torchvision.prepare()

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

# The suite's CPU goes mostly to compiling tiny programs that then run for milliseconds, and most of a
# compile is LLVM optimizing the generated code: without that pass (the same HLO, XLA's own optimizations
# and the same library kernels for dots), a tiny training run of tests/_train_config.py takes 25 CPU-s
# instead of 40 with a cold cache, and about as long with a warm one (BENCHMARKS.md, the test suite). Set
# for this process before jax starts, and so for every xdist worker and subprocess. The runs that execute
# for minutes (_OPTIMIZED_CODE below) keep the user's flags.
# The user's flags, kept in the environment: an xdist worker imports this file again, under the flags set here.
_USER_XLA_FLAGS = os.environ.setdefault("LLAVA_JAX_TESTS_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_USER_XLA_FLAGS} --xla_backend_optimization_level=0".strip()
# Test modules whose subprocesses train for minutes: optimized code repays its compile there.
_OPTIMIZED_CODE = ("tests/test_train_default.py",)


@pytest.fixture(autouse=True)
def _optimized_code_for_long_runs(request, monkeypatch):
    """The user's XLA flags (optimized code) for the subprocesses of the modules in `_OPTIMIZED_CODE`."""
    if request.node.nodeid.split("::")[0] in _OPTIMIZED_CODE:
        if _USER_XLA_FLAGS:
            monkeypatch.setenv("XLA_FLAGS", _USER_XLA_FLAGS)
        else:
            monkeypatch.delenv("XLA_FLAGS")


def pytest_sessionfinish(session, exitstatus):
    # The process that made the directory removes it: with xdist, the controller, after its workers.
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_spm_dir(tmp_path_factory) -> str:
    """A directory with tests/_spm.py's tiny LLaMA-like `tokenizer.model` (400 pieces), trained once a session."""
    return os.path.dirname(_spm.train_tiny_spm(str(tmp_path_factory.mktemp("spm"))))


@pytest.fixture(scope="session")
def tiny_chatml_spm_dir(tmp_path_factory) -> str:
    """The same tokenizer with ChatML's tags as atomic pieces, as in a ChatML model's vocabulary."""
    d = str(tmp_path_factory.mktemp("spm_chatml"))
    return os.path.dirname(_spm.train_tiny_spm(d, user_defined_symbols=("<|im_start|>", "<|im_end|>")))


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> tuple[str, list[str]]:
    """tests/test_serve.py's tiny model directory and its four images."""
    from tests.test_serve import make_served_model

    return make_served_model(tmp_path_factory)


@pytest.fixture(scope="session")
def served(served_model, tmp_path_factory):
    """`python -m llava_jax.serve` on `served_model` with tests/test_serve.py's flags, one per worker for
    tests/test_serve.py and tests/test_serve_browser.py: a start (imports, load, compilation) costs seconds of
    CPU. Both modules carry `same_worker("server")`, so that the scheduling below sends them to one worker."""
    from tests.test_serve import SERVER_FLAGS, Server

    s = Server(served_model[0], str(tmp_path_factory.mktemp("serve") / "server.log"), *SERVER_FLAGS)
    yield s
    s.stop()


def _seconds(item) -> float:
    """The idle-CPU estimate a test's `slow` marker carries (`@pytest.mark.slow(seconds=240)`); 0 when unmarked."""
    mark = item.get_closest_marker("slow")
    if mark is None:
        return 0.0
    return float(mark.kwargs.get("seconds", mark.args[0] if mark.args else 60))


def _unit(item) -> str:
    """What the scheduling below keeps on one worker: the test's module, or the modules that name one
    `same_worker` group (they share a session fixture, built once per worker)."""
    mark = item.get_closest_marker("same_worker")
    return f"same_worker:{mark.args[0]}" if mark else item.nodeid.split("::")[0]


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection, so that the chunks below are the ones xdist sends
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, start every worker on its share of the slow tests.

    The suite's wall time on 2 cores ends with its longest tests: in file order the training runs
    (tests/test_train_*.py, the embedded default's for minutes) start last and finish alone.
    `--dist worksteal` first hands each of the N workers a contiguous chunk of the collection, then
    steals from the tails of the longest queues; so the slow tests go to the heads of those chunks, a
    module's slow tests together (its module-scoped fixtures are built once; modules of one `same_worker`
    group together too, for their session fixtures), the longest module first to the least loaded worker.
    Only the order changes (every worker collects the same list, as xdist requires); with another
    scheduler the run is as correct, only slower.
    """
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers < 2 or not any(_seconds(item) for item in items):
        return
    modules: dict[str, list] = {}
    for item in items:
        if _seconds(item):
            modules.setdefault(_unit(item), []).append(item)
    units = sorted(modules.values(), key=lambda unit: sum(map(_seconds, unit)), reverse=True)
    fast = [item for item in items if not _seconds(item)]
    lanes, loads = [[] for _ in range(workers)], [0.0] * workers
    for unit in units:
        k = loads.index(min(loads))
        lanes[k] += unit
        loads[k] += sum(map(_seconds, unit))
    # The chunk sizes of xdist's first distribution: each worker in turn gets remaining // workers left.
    ordered, remaining = [], len(items)
    for k, lane in enumerate(lanes):
        size = remaining // (workers - k)
        remaining -= size
        take = max(0, size - len(lane))
        ordered += lane + fast[:take]
        fast = fast[take:]
    items[:] = ordered + fast


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
