"""`python -m llava_jax.train [--config=configs/NAME.py[:ARG]] [--workdir=DIR] [--config.KEY=VALUE ...]`

With no --config: the embedded default (a tiny LLaVA on generated data; llava_jax/train/defaults.py).
`--config.KEY=VALUE` overrides one field of whichever config runs, e.g. `--config.max_steps=5`.
Starting again on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Iterator

from absl import app, flags
from ml_collections import config_flags

from llava_jax import paths
from llava_jax.train import defaults

# What parsing --config and its --config.KEY=VALUE overrides raises for an override that does not fit
# the config: an unknown field (ml_collections' "did you mean"), a stage index past the end, a value
# of the wrong type, a config file that is not there or rejects its argument.
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, IndexError, TypeError, ValueError, OSError)


def _flag_error_line(error: Exception, argv: list[str]) -> str:
    """`error` as one line that names the flag: ml_collections' messages span lines and quote their key."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    if "Traceback (most recent call last)" in text:  # a config file's own error, wrapped with its traceback
        text = text.strip().splitlines()[-1]
    elif isinstance(error, OSError) and "No such file" in text:  # ml_collections lists every path it tried
        text = f"--config: {text.strip().splitlines()[-1].strip()}"
    text = " ".join(text.split())
    overrides = [a.split("=", 1)[0] for a in argv[1:] if re.match(r"--?(no)?config\.", a)]
    if isinstance(error, IndexError):
        indexed = [o for o in overrides if "[" in o]
        return f"{', '.join(indexed) or '--config'}: a list index past the end of the config's list"
    if isinstance(error, (AttributeError, KeyError)):
        match = re.search(r"[A-Za-z_]\w*", text)  # the first name in the message is the unknown key
        key = match[0] if match else text
        named = [o for o in overrides if re.search(rf"[.\]]{re.escape(key)}(\W|$)", o)]
        hint = text[text.index("Did you mean"):].rstrip("'") if "Did you mean" in text else ""
        where = named[0] if named else "--config"
        return f"{where}: no such field {key!r} in the config" + (f"; {hint}" if hint else "")
    return text


@contextlib.contextmanager
def _flag_errors(argv: list[str]) -> Iterator[None]:
    """A flag that does not fit the config is one line and exit status 2 (--debug: the traceback)."""
    try:
        yield
    except _FLAG_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"llava_jax.train: error: {_flag_error_line(e, argv)}", file=sys.stderr)
        sys.exit(2)


# Without --config the embedded default and its overrides are parsed here, as the flag is defined.
with _flag_errors(sys.argv):
    _CONFIG = config_flags.DEFINE_config_file(
        "config", defaults.__file__,
        "Config file (configs/NAME.py[:ARG]); default: the embedded default, listed above.", lock_config=True)
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
    from llava_jax.eval.benchmark import BENCHMARKS
    from llava_jax.eval.suite import SuiteBenchmarks, table_from_metrics
    from llava_jax.parallel import xla_flags
    from llava_jax.parallel.distributed import maybe_initialize
    from llava_jax.train import loop, validate

    xla_flags.apply(_XLA_FLAGS.value)
    maybe_initialize()
    with _flag_errors(sys.argv):
        config = _CONFIG.value
        config.stages  # pylint: disable=pointless-statement  # a file that failed to load raises on first use
    workdir = paths.absolute(_WORKDIR.value)  # a local directory or gs://bucket/dir
    try:
        validate.validate(config, BENCHMARKS)  # the whole config, before any data, weights or workdir
        if config.compile_only:  # no data, no weights, no workdir: see train/aot.py
            from llava_jax.train import aot

            aot.run(config)
            return 0
        paths.check_writable_workdir(workdir)  # a bad bucket fails now, not at the first checkpoint
        result = loop.run(config, workdir, benchmarks=SuiteBenchmarks())
    except (loop.NonFiniteError, loop.Preempted) as e:
        print(f"llava_jax.train: {e}", file=sys.stderr)
        return 1
    except _user_errors() as e:  # the message names the file, record or field: no traceback unless asked
        if _DEBUG.value:
            raise
        print(f"llava_jax.train: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2
    keys = [k for k in ("eval/accuracy", "eval/blind_accuracy", "eval/loss") if k in result]
    # Then per question type, seeing and blind: a type stuck at its blind figure hides under a good overall one.
    keys += sorted(k for k in result if k.startswith(("eval/accuracy_", "eval/blind_accuracy_")))
    if keys:  # a run without a held-out set has none: print no empty line
        print(" ".join(f"{k}={result[k]:.4f}" for k in keys))
    if result:
        print(table_from_metrics(result), end="")  # the stages' eval_benchmarks, if any
    last = [n for n in paths.listdir(workdir) if n.startswith("stage")]
    if last:
        print(f"model: {os.path.join(workdir, last[-1])}")
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a flag that does not fit the config as one line and exit status 2."""
    with _flag_errors(argv):
        return flags.FLAGS(argv)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to fix: printed as one line, exit status 2."""
    from llava_jax.data.pipeline import DataError
    from llava_jax.data.records import DataFileError, ImagePathError, RecordError
    from llava_jax.data.sources import DataSourceError
    from llava_jax.train.validate import ConfigError
    from llava_jax.weights.safetensors_io import CheckpointError

    return (RecordError, DataFileError, DataSourceError, ImagePathError, DataError, ConfigError, CheckpointError,
            FileNotFoundError, paths.PathError)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
