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
_XLA_FLAGS = flags.DEFINE_bool("xla_perf_flags", True, "Add the GPU/TPU XLA flag presets of "
                               "llava_jax/parallel/xla_flags.py (printed when added; --noxla_perf_flags: none).")


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from llava_jax.parallel import xla_flags
    from llava_jax.parallel.distributed import maybe_initialize
    from llava_jax.train import loop

    xla_flags.apply(_XLA_FLAGS.value)
    maybe_initialize()
    config = _CONFIG.value if _CONFIG.value is not None else _DEFAULT.value
    workdir = os.path.abspath(_WORKDIR.value)
    try:
        result = loop.run(config, workdir)
    except (loop.NonFiniteError, loop.Preempted) as e:
        print(f"llava_jax.train: {e}", file=sys.stderr)
        return 1
    if result:
        keys = [k for k in ("eval/accuracy", "eval/blind_accuracy", "eval/loss") if k in result]
        print(" ".join(f"{k}={result[k]:.4f}" for k in keys))
    last = [n for n in sorted(os.listdir(workdir)) if n.startswith("stage")]
    if last:
        print(f"model: {os.path.join(workdir, last[-1])}")
    return 0


if __name__ == "__main__":
    app.run(main)
