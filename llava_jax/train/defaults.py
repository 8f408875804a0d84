"""The embedded default run: a tiny LLaVA trained from scratch on the synthetic shapes data.

    python -m llava_jax.train                     # this config, in ./workdir
    python -m llava_jax.train --config=configs/tiny.py --workdir=/tmp/tiny --config.max_steps=20

No download: the data and its tokenizer are generated into WORKDIR/data. There are no
pretrained towers to start from, so unlike the real recipes both stages train every parameter.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Fields every run has; recipes fill in model, data and stages."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.max_steps = -1  # cap on each stage's steps (-1: the stage's epochs decide)
    c.log_every = 10
    c.eval_every = 0  # 0: evaluate at the end of each stage only
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.max_nonfinite_steps = 10
    c.progress = True
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.model = ml_collections.ConfigDict()
    c.model.init = ""  # a converted checkpoint directory; empty: random init from the fields below
    c.model.dtype = "bfloat16"
    c.model.remat = "none"
    c.data = ml_collections.ConfigDict()
    c.data.synthetic = False
    c.data.image_folder = ""
    c.data.data_dir = ""  # where relative stage data files are looked up (default: image_folder)
    c.data.tokenizer = ""
    c.data.val = ""
    c.data.pad_to_square = True
    c.data.group_by_modality_length = False
    c.data.length_buckets = ()
    c.data.worker_count = 0
    c.data.eval_template = "vicuna_v1"
    c.data.eval_batch_size = 32
    c.data.eval_max_length = 2048
    c.stages = []
    return c


def stage(name: str, *, data: str, template: str, trainable: list[str], learning_rate: float, global_batch: int,
          micro_batch: int, epochs: float = 1.0, max_length: int = 2048, warmup_ratio: float = 0.03,
          weight_decay: float = 0.0) -> ml_collections.ConfigDict:
    """One training stage: which data, which template, which parameters train, and how."""
    return ml_collections.ConfigDict(dict(
        name=name, data=data, template=template, trainable=list(trainable), learning_rate=float(learning_rate),
        global_batch=global_batch, micro_batch=micro_batch, epochs=float(epochs), max_length=max_length,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay,
    ))


def tiny_config() -> ml_collections.ConfigDict:
    """The embedded default (see the module docstring)."""
    c = base_config()
    c.log_every = 20
    c.checkpoint_every = 100
    c.async_checkpoints = False
    c.model.dtype = "float32"  # bf16 is slow on CPU; the real recipes use bf16
    c.model.projector_type = "mlp2x_gelu"
    c.model.vision_feature_layer = -1
    c.model.vision_feature_select_strategy = "default"
    c.model.vision = ml_collections.ConfigDict(dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
        patch_size=14, hidden_act="quick_gelu"))
    c.model.text = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0))
    c.data.synthetic = True
    c.data.synthetic_args = ml_collections.ConfigDict(dict(num_train=2000, num_val=200, image_size=56, seed=0,
                                                           vocab_size=1024))
    c.data.eval_max_length = 128
    everything = [".*"]
    c.stages = [
        stage("pretrain", data="stage1", template="plain", trainable=everything, learning_rate=2e-3,
              global_batch=32, micro_batch=32, epochs=1, max_length=96, warmup_ratio=0.05),
        stage("finetune", data="stage2", template="vicuna_v1", trainable=everything, learning_rate=2e-3,
              global_batch=32, micro_batch=32, epochs=3, max_length=128, warmup_ratio=0.05),
    ]
    return c
