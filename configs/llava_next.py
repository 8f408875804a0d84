# python -m llava_jax.train --config=configs/llava_next.py:vicuna_7b --workdir=gs://BUCKET/llava-next-7b \
#   --config.model.init=/ckpt/llava-next-7b-init --config.data.image_folder=/data/llava \
#   --config.stages[0].data=/data/llava/blip_laion_cc_sbu_558k.json \
#   --config.stages[1].data=/data/llava-next/llava_next_779k.json
#
# python -m llava_jax.train --config=configs/llava_next.py:tiny --workdir=/tmp/tiny_next   # a CPU, minutes
#
# LLaVA-NeXT (v1.6): anyres tiling (the image's base view plus a grid of tiles chosen among the
# pinpoints, unpadded, an `image_newline` after every row; llava_jax/anyres.py), following the
# original's scripts (LLaVA-VL/LLaVA-NeXT scripts/train/pretrain_clip.sh, finetune_clip.sh):
#   stage 1 trains the projector on the 558K captions at the base resolution, one 336 px tile an
#     image (`base_resolution`), template `plain`, global batch 256, lr 1e-3;
#   stage 2 trains the LLM, the projector and image_newline at lr 1e-5 and the vision tower at 2e-6
#     (`vision_learning_rate`, the original's mm_vision_tower_lr) on the NeXT instruction mix (LLaVA-NeXT-
#     Data, 779K records, converted to LLaVA JSON), anyres, global batch 128, 4096 tokens.
# Both: AdamW, no weight decay, warmup 3%, cosine, 1 epoch, bf16 compute, float32 master weights.
#
# model.init is a LLaVA-NeXT directory: a llava-hf NeXT checkpoint or the original's converted
# (`python -m llava_jax.convert`), or one built from parts with the NeXT pinpoints. The template follows
# the LLM: `vicuna_7b` / `vicuna_13b` (vicuna_v1), `mistral_7b` (mistral_instruct), `llama3_8b`
# (llava_llama_3), `yi_34b` (chatml_direct); stage 1 is `plain` for all. `_stage2` runs stage 2 alone.
# An anyres image takes up to 2928 tokens (5 tiles of 576 plus newlines), so rows are long and
# micro-batches small; check a slice first with --config.compile_only=True --config.compile_topology=...
#
# Where 7B stage 2 fits (TPU compiler, full remat, FSDP over every chip, 4096 tokens, the tower trained;
# BENCHMARKS.md, `python -m bench.compile --table --sizes next-7b --stages 2`). Rows are per chip:
#   v5p-8 (4 chips):  8 rows, the recipe as it is (77.8 of 95 GiB)
#   v6e-8:            2 rows, --config.stages[1].micro_batch=16 (30.9 of 31.25 GiB)
#   v5e-16:           does not fit (1 row a chip needs 16.7 GiB); v5e-32 at 2 rows,
#                     --config.stages[1].micro_batch=64 (13.9 GiB)
#
# `:tiny`: a random tiny NeXT model (28 px tiles of 2 x 2 features, pinpoints of up to 2 x 2 tiles)
# trained from scratch on the synthetic shapes drawn at varied sizes and aspect ratios; as the tiny
# LLaVA-1.5 default, stage 1 trains every parameter (there is no pretrained tower) and stage 2 the LLM,
# projector and image_newline with the tower at its own lower rate. Measured: held-out accuracy 0.76
# (colour 1.0, count 0.99, position 0.43, shape 0.38; blind 0.25) after about 7 minutes on a shared
# 2-core CPU (1000 + 414 steps). `:tiny_smoke` stops each stage after 3 steps.
from llava_jax.train.defaults import base_config, stage, tiny_config

TEMPLATES = {"vicuna_7b": "vicuna_v1", "vicuna_13b": "vicuna_v1", "mistral_7b": "mistral_instruct",
             "llama3_8b": "llava_llama_3", "yi_34b": "chatml_direct"}
STAGE2_TRAINABLE = ["projector/.*", "language_model/.*", "image_newline", "vision_tower/.*"]

# The tiny variant's geometry: tiles of the tower's 28 px, grids of 1 x 2, 2 x 1 and 2 x 2 tiles.
TINY_PINPOINTS = ((28, 56), (56, 28), (56, 56))
# Wide, tall, square and in between: each tiles differently (anyres.layout).
TINY_SIZES = ((28, 56), (56, 28), (56, 56), (42, 84), (84, 42))


def tiny() -> "ml_collections.ConfigDict":  # noqa: F821
    """The tiny NeXT run (see the top; tests/test_train_next.py runs it on less data for fewer epochs)."""
    c = tiny_config()
    c.log_every = 10
    c.model.vision.update(dict(image_size=28, patch_size=14))
    c.model.image_grid_pinpoints = TINY_PINPOINTS
    c.data.synthetic_args.update(dict(num_train=2000, num_val=100, image_size=56, sizes=TINY_SIZES))
    # Captions: <= 24 image tokens + ~20 text; Q/A up to ~100 tokens.
    c.data.length_buckets = (48, 64, 96)
    c.data.eval_max_length = 128
    c.data.eval_batch_size = 16
    c.stages = [
        stage("pretrain", data="stage1", template="plain", trainable=[".*"], learning_rate=2e-3,
              global_batch=16, micro_batch=16, epochs=8, max_length=48, warmup_ratio=0.05),
        stage("finetune", data="stage2", template="vicuna_v1", trainable=STAGE2_TRAINABLE, learning_rate=2e-3,
              vision_learning_rate=2e-4, global_batch=16, micro_batch=16, epochs=3, max_length=128,
              warmup_ratio=0.05),
    ]
    return c


def get_config(arg: str = "vicuna_7b"):
    if arg in ("tiny", "tiny_smoke"):
        c = tiny()
        if arg == "tiny_smoke":
            c.max_steps, c.log_every = 3, 1
        return c
    llm, _, only = arg.rpartition("_stage") if arg.endswith(("_stage1", "_stage2")) else (arg, "", "")
    if llm not in TEMPLATES:
        raise ValueError(f"configs/llava_next.py: arg {arg!r}; expected tiny, tiny_smoke or one of {sorted(TEMPLATES)} "
                         "optionally with _stage1 / _stage2")
    c = base_config()
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.checkpoint_every = 500
    c.log_every = 10
    stages = [
        stage("pretrain", data="blip_laion_cc_sbu_558k.json", template="plain", trainable=["projector/.*"],
              learning_rate=1e-3, global_batch=256, micro_batch=256, base_resolution=True),
        stage("finetune", data="llava_next_779k.json", template=TEMPLATES[llm], trainable=STAGE2_TRAINABLE,
              learning_rate=1e-5, vision_learning_rate=2e-6, global_batch=128, micro_batch=32, max_length=4096),
    ]
    c.data.group_by_modality_length = True
    c.data.length_buckets = (1024, 2048, 3072)
    c.data.worker_count = 8
    c.stages = {"": stages, "1": stages[:1], "2": stages[1:]}[only]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
