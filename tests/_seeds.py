"""Fresh seeds for parity tests: a new draw each run (os.urandom), named in the report when a test fails.

    seed = fresh_seed()

conftest.py adds a "fresh seeds" section to a failing test's report with every seed it drew and
the command that replays them: LLAVA_JAX_SEEDS=s1,s2,... forces the draws, in order.
"""

from __future__ import annotations

import os

SEEDS_ENV = "LLAVA_JAX_SEEDS"
drawn: list[int] = []  # the current test's draws (reset by conftest.py before each test)


def fresh_seed() -> int:
    """A 16-bit seed from os.urandom, or the next of LLAVA_JAX_SEEDS when set; recorded for the report."""
    forced = [int(s) for s in os.environ.get(SEEDS_ENV, "").split(",") if s.strip()]
    seed = forced[len(drawn) % len(forced)] if forced else int.from_bytes(os.urandom(2), "little")
    drawn.append(seed)
    return seed
