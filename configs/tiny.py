# python -m llava_jax.train --config=configs/tiny.py --workdir=/tmp/tiny
# The embedded default (what `python -m llava_jax.train` runs with no --config): a tiny LLaVA
# trained from scratch on generated coloured-shapes data, stage 1 then stage 2, on a CPU in minutes.
# `:smoke` caps each stage at a few steps (a run that only checks the plumbing).
from llava_jax.train.defaults import tiny_config


def get_config(arg: str = ""):
    c = tiny_config()
    if arg == "smoke":
        c.max_steps = 5
        c.log_every = 1
    return c
