"""The run's metrics: workdir/metrics.jsonl (one JSON object per record), and TensorBoard if installed."""

from __future__ import annotations

import json
import os
import time

import jax

from llava_jax import paths


class MetricsWriter:
    """One JSON object per logged step in workdir/metrics.jsonl (process 0), TensorBoard if installed.

    A local file is appended to line by line. Object storage (gs://) cannot append: the file is
    rewritten whole, at most every `flush_seconds` and at every `flush()` (the loop flushes when
    it saves a checkpoint), so that after a kill it covers at least every step up to the latest
    checkpoint, from which the run resumes and logs the rest again.
    """

    def __init__(self, workdir: str, flush_seconds: float = 30.0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.remote = paths.is_remote(workdir)
        self.flush_seconds, self.flushed_at = flush_seconds, time.time()
        self.lines: list[str] = []  # remote: the whole file
        self.tb = None
        if not self.enabled:
            return
        if self.remote and paths.exists(self.path):
            self.lines = paths.read_text(self.path).splitlines(keepends=True)
        try:
            from tensorboardX import SummaryWriter  # type: ignore  # optional: pip install tensorboardX
        except ImportError:
            SummaryWriter = None
        if SummaryWriter is not None and not self.remote:
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict) -> None:
        """Appends `record` (a JSON object with a `step`); its numbers also go to TensorBoard."""
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
            if time.time() - self.flushed_at >= self.flush_seconds:
                self.flush()
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def flush(self) -> None:
        """Remote: rewrite the file with every record so far (local files are always up to date)."""
        if self.enabled and self.remote:
            paths.write_text(self.path, "".join(self.lines))
            self.flushed_at = time.time()
