"""A minutes-free variant of the embedded default for loop tests: tiny data, both stages, few steps."""

from llava_jax.train.defaults import lora, tiny_config


def get_config(arg: str = ""):
    c = tiny_config()
    c.progress = False
    c.log_every = 1
    c.checkpoint_every = 2
    c.max_steps = 6
    c.data.synthetic_args.num_train = 64
    c.data.synthetic_args.num_val = 8
    for s in c.stages:
        s.global_batch = 8
        s.micro_batch = 4
        s.eval_benchmarks = ()  # the end-of-stage benchmark is test_train_default's; here it would only add compiles
    if arg == "frozen_vision":
        c.stages[0].trainable = ["projector/.*"]
        c.stages[1].trainable = ["projector/.*", "language_model/.*"]
    if arg.startswith("compile"):  # one stage is enough to compile
        c.stages = c.stages[:1]
    if arg == "compile_projector":
        c.stages[0].trainable = ["projector/.*"]
    if arg == "lora":  # stage 2 as LoRA (dropout on): adapters + the projector train, the rest is frozen
        c.stages[1].trainable = ["projector/.*"]
        c.stages[1].lora = lora(rank=4, alpha=8, dropout=0.1, non_lora_learning_rate=1e-3)
    if arg == "explode":
        c.stages[0].learning_rate = 1e30
        c.stages[0].warmup_ratio = 0.0
        c.max_nonfinite_steps = 2
    return c
