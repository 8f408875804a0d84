# python -m llava_jax.train --config=configs/tiny.py --workdir=/tmp/tiny
# The embedded default (what `python -m llava_jax.train` runs with no --config): a tiny LLaVA
# trained from scratch on generated coloured-shapes data, stage 1 then stage 2, on a CPU in minutes.
# `:smoke` caps each stage at a few steps (a run that only checks the plumbing).
# `:lora` trains stage 2 as LoRA (adapters on every Linear of the LLM's layers, the projector fully,
# the rest frozen), as LLaVA-1.5's finetune_lora.sh does at 7B/13B.
# `:media` is a tiny LLaVA-OneVision on generated videos and image sets ("which frame shows the red square?",
# "how many images show a red shape?"), held-out accuracy per question type against blind at the end:
#   python -m llava_jax.train --config=configs/tiny.py:media --workdir=/tmp/tiny_media
from llava_jax.train.defaults import lora, media_config, tiny_config


def get_config(arg: str = ""):
    if arg == "media":
        return media_config()
    c = tiny_config()
    if arg == "smoke":
        c.max_steps = 5
        c.log_every = 1
    elif arg == "lora":
        finetune = c.stages[1]
        finetune.name = "finetune_lora"
        finetune.trainable = ["projector/.*"]
        finetune.lora = lora(rank=16, alpha=32, dropout=0.05, non_lora_learning_rate=finetune.learning_rate)
        finetune.learning_rate = 4e-3
    elif arg:
        raise ValueError(f"configs/tiny.py: arg {arg!r}; expected smoke, lora or media")
    return c
