"""Progress bars on stderr that only a terminal sees, for every command that shows one.

A bar redraws itself with carriage returns: in a file (`2>log`) the frames pile up on one line
and glue any error message onto the last frame. So a bar is drawn only when stderr is a terminal;
elsewhere it is disabled (updates cost nothing), and log records and `bar.write` lines still
arrive as plain lines.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator


def bar(total: int, *, desc: str, initial: int = 0, unit: str = "it", enabled: bool = True):
    """A tqdm bar on stderr: drawn if `enabled` and stderr is a terminal, else disabled."""
    from tqdm import tqdm

    stream = sys.stderr
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                disable=not (enabled and stream.isatty()))


@contextlib.contextmanager
def logging_through(progress) -> Iterator[None]:
    """Log records are written through `progress` (`bar.write`: the bar is cleared, the line written, the
    bar redrawn), formatted by the handlers that would have written them; restored on exit.

    Nothing changes for a disabled bar: its records go to the handlers as they are.
    """
    if progress.disable:
        yield
        return
    root = logging.getLogger()
    handlers = root.handlers[:]

    class Through(logging.Handler):
        def __init__(self, inner: logging.Handler):
            super().__init__(inner.level)
            self.inner = inner

        def emit(self, record: logging.LogRecord) -> None:
            if self.inner.filter(record):
                progress.write(self.inner.format(record), file=progress.fp)

    root.handlers = [Through(h) for h in handlers]
    try:
        yield
    finally:
        root.handlers = handlers
