"""What every command-line entry point shares: how it exits.

Each CLI's `__main__` block is `cli.exit_with(main)`. Output piped into a reader that stops early
(`python -m llava_jax.data.inspect ... | head -3`) then ends the program quietly, as `cat` or `grep`
end, instead of with a BrokenPipeError traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

# What a shell reports for a program killed by SIGPIPE (128 + 13): the status `cat` gets under `head`,
# distinct from our 1 (problems found) and 2 (bad input).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """Runs `main` and exits with its status; a closed stdout pipe exits with EXIT_BROKEN_PIPE, silently.

    A CLI whose `main` catches OSError as a user error must let BrokenPipeError (an OSError) through.
    """
    try:
        status = main()
        # Inside the try: buffered output flushed at interpreter exit would raise where nothing catches it.
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's "Note on SIGPIPE" (signal module docs): stdout now points at devnull, so the
        # interpreter's own flush at exit has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    sys.exit(status)
