"""`python -m llava_jax.train [--config=configs/NAME.py[:ARG]] [--workdir=DIR] [--config.KEY=VALUE ...]`

With no --config: the embedded default (a tiny LLaVA on generated data; llava_jax/train/defaults.py).
`--config.KEY=VALUE` overrides one field of whichever config runs, e.g. `--config.max_steps=5`.
Starting again on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from llava_jax import paths
from llava_jax.train import defaults

_CONFIG = config_flags.DEFINE_config_file(
    "config", defaults.__file__, "Config file (configs/NAME.py[:ARG]); default: the embedded default, listed above.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics and outputs go.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of a data, config or checkpoint error.")

# --help shows the embedded default one field a line, as --config.KEY=VALUE names them.
__doc__ += "\nThe embedded default (--config.KEY=VALUE overrides any line):\n\n" + "".join(
    f"  {line}\n" for line in defaults.describe(defaults.tiny_config()))
_XLA_FLAGS = flags.DEFINE_bool("xla_perf_flags", True, "Add the GPU/TPU XLA flag presets of "
                               "llava_jax/parallel/xla_flags.py (printed when added; --noxla_perf_flags: none).")


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "grain", "gcsfs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from llava_jax.eval.suite import table_from_metrics
    from llava_jax.parallel import xla_flags
    from llava_jax.parallel.distributed import maybe_initialize
    from llava_jax.train import loop

    xla_flags.apply(_XLA_FLAGS.value)
    maybe_initialize()
    config = _CONFIG.value
    if config.get("compile_only", False):  # no data, no weights, no workdir: see train/aot.py
        from llava_jax.train import aot

        aot.run(config)
        return 0
    workdir = paths.absolute(_WORKDIR.value)  # a local directory or gs://bucket/dir
    try:
        paths.check_writable_workdir(workdir)  # a bad bucket fails now, not at the first checkpoint
        result = loop.run(config, workdir)
    except (loop.NonFiniteError, loop.Preempted) as e:
        print(f"llava_jax.train: {e}", file=sys.stderr)
        return 1
    except _user_errors() as e:  # the message names the file, record or field: no traceback unless asked
        if _DEBUG.value:
            raise
        print(f"llava_jax.train: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2
    keys = [k for k in ("eval/accuracy", "eval/blind_accuracy", "eval/loss") if k in result]
    if keys:  # a run without a held-out set has none: print no empty line
        print(" ".join(f"{k}={result[k]:.4f}" for k in keys))
    if result:
        print(table_from_metrics(result), end="")  # the stages' eval_benchmarks, if any
    last = [n for n in paths.listdir(workdir) if n.startswith("stage")]
    if last:
        print(f"model: {os.path.join(workdir, last[-1])}")
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to fix: printed as one line, exit status 2."""
    from llava_jax.data.pipeline import DataError
    from llava_jax.data.records import ImagePathError, RecordError
    from llava_jax.train.loop import ConfigError
    from llava_jax.weights.safetensors_io import CheckpointError

    return (RecordError, ImagePathError, DataError, ConfigError, CheckpointError, FileNotFoundError,
            paths.PathError)


if __name__ == "__main__":
    app.run(main)
