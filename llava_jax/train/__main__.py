"""`python -m llava_jax.train [--config=configs/NAME.py[:ARG]] [--workdir=DIR] [--config.key=value ...]`

With no --config: the embedded default (a tiny LLaVA on generated data; see train/defaults.py).
Starting again on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from llava_jax.train import defaults

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]); default: the tiny default.")
_DEFAULT = config_flags.DEFINE_config_dict("default", defaults.tiny_config(), "The embedded default (used without --config).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics and outputs go.")


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from llava_jax.eval.suite import table_from_metrics
    from llava_jax.parallel.distributed import maybe_initialize
    from llava_jax.train import loop

    maybe_initialize()
    config = _CONFIG.value if _CONFIG.value is not None else _DEFAULT.value
    if config.get("compile_only", False):  # no data, no weights, no workdir: see train/aot.py
        from llava_jax.train import aot

        aot.run(config)
        return 0
    workdir = os.path.abspath(_WORKDIR.value)
    try:
        result = loop.run(config, workdir)
    except (loop.NonFiniteError, loop.Preempted) as e:
        print(f"llava_jax.train: {e}", file=sys.stderr)
        return 1
    if result:
        keys = [k for k in ("eval/accuracy", "eval/blind_accuracy", "eval/loss") if k in result]
        print(" ".join(f"{k}={result[k]:.4f}" for k in keys))
        print(table_from_metrics(result), end="")  # the stages' eval_benchmarks, if any
    last = [n for n in sorted(os.listdir(workdir)) if n.startswith("stage")]
    if last:
        print(f"model: {os.path.join(workdir, last[-1])}")
    return 0


if __name__ == "__main__":
    app.run(main)
