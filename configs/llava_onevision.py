# python -m llava_jax.train --config=configs/llava_onevision.py:qwen2_7b_si --workdir=gs://BUCKET/onevision-7b-si \
#   --config.model.init=/ckpt/llava-onevision-qwen2-7b-mid-stage --config.data.image_folder=/data/onevision \
#   --config.stages[0].data=/data/onevision/single_image_3.2m.json
# python -m llava_jax.train --config=configs/llava_onevision.py:qwen2_7b_ov --workdir=gs://BUCKET/onevision-7b-ov \
#   --config.model.init=gs://BUCKET/onevision-7b-si/stage1_si --config.data.image_folder=/data/onevision \
#   --config.stages[0].data=/data/onevision/onevision_1.6m.json
#
# LLaVA-OneVision (SigLIP-SO400M/14-384 + Qwen2, `anyres_max_9`, many images, video), following the original's
# scripts (LLaVA-VL/LLaVA-NeXT scripts/train/pretrain_siglip.sh, finetune_si.sh, finetune_ov.sh):
#   stage 1 (`pretrain`) trains the projector alone (mm_tunable_parts="mm_mlp_adapter") on LCS-558K
#     (blip_558k_plain.json), template `plain`, each image one 384 px tile (the script's default
#     image_aspect_ratio "square": `base_resolution`), lr 1e-3, 8192 tokens. Its global batch is the script's 16
#     a device times a GPU count it leaves open; 256 here, LLaVA-1.5's and LLaVA-NeXT's.
#   stage `si` (finetune_si.sh) and stage `ov` (finetune_ov.sh) train everything (mm_tunable_parts=
#     "mm_vision_tower,mm_mlp_adapter,mm_language_model": the LLM, the projector and image_newline at lr 1e-5,
#     the vision tower at 2e-6, its mm_vision_tower_lr: `vision_learning_rate`), template `qwen_1_5`,
#     image_aspect_ratio anyres_max_9 over the (1x1)..(6x6) pinpoints (the geometry of model.init, see below),
#     32768 tokens, global batch 256 (the scripts' recommendation for 7B: 1 row a GPU, 2 accumulation steps, 128
#     GPUs: micro_batch 128 here). `si` reads the 3.2M single-image mix (single_image.yaml), `ov` the 1.6M
#     single-image, multi-image and video mix (onevision.yaml) with videos under data.image_folder.
# All: AdamW, no weight decay, warmup 3%, cosine, 1 epoch, length-grouped batches (group_by_modality_length),
# bf16 compute, float32 master weights, full remat (the scripts' gradient checkpointing).
#
# Between stage 1 and `si` the original trains a mid stage (stage 1.5: 4M re-captioned, OCR and knowledge records,
# the whole model) for which it released no script; its output (lmms-lab/llava-onevision-qwen2-7b-mid-stage-a4)
# is where `si` starts, and `si`'s output (lmms-lab/llava-onevision-qwen2-7b-si) where `ov` starts. model.init is
# a OneVision directory: llava-hf's or the original's converted (`python -m llava_jax.convert`). The run keeps its
# image geometry (there is no field to override it as the scripts' --image_aspect_ratio / --image_grid_pinpoints
# do): start `si` and `ov` from one whose config says anyres_max_9 over (1x1)..(6x6). `convert` builds a stage-1
# start from CLIP + LLaMA parts only, not from SigLIP + Qwen2 ones yet, so stage 1 runs from a OneVision
# directory (its projector trained further, not fresh).
#
# Videos: frames per video are `data.num_frames` (32 = the scripts' --frames_upbound 32). The original samples a video at
# 1 fps (video_fps 1) and only when that gives more than 32 frames samples 32 uniformly; here every video gives
# num_frames frames sampled uniformly, as transformers' OneVision processor does. A LLaVA-Video-178K record marks
# its video `<image>`; it reads as `<video>`, rendered where the original renders that `<image>` (templates.py).
#
# Variants: `qwen2_7b` (the default) and `qwen2_05b` (llava-onevision-qwen2-0.5b), each with every stage, or one:
# `_stage1`, `_si`, `_ov`. compile-only needs no checkpoint (model.preset names the architecture):
#   python -m llava_jax.train --config=configs/llava_onevision.py:qwen2_7b_ov --config.compile_only=True \
#     --config.compile_topology=v5p:4x4x4 --config.mesh.fsdp=-1
from llava_jax.train.defaults import base_config, stage

PRESETS = {"qwen2_7b": "llava-onevision-qwen2-7b", "qwen2_05b": "llava-onevision-qwen2-0.5b"}
STAGES = ("stage1", "si", "ov")
# mm_tunable_parts "mm_vision_tower,mm_mlp_adapter,mm_language_model": all but nothing (image_newline belongs to
# the language-model part there: everything that is neither the tower nor the projector).
EVERYTHING = ["projector/.*", "language_model/.*", "image_newline", "vision_tower/.*"]
# The data files: LCS-558K as LLaVA-1.5 ships it, and the scripts' two mixes (their yaml lists, joined into one
# LLaVA JSON file each: data files are one file here). Relative names resolve under data.data_dir / image_folder.
DATA = {"stage1": "blip_laion_cc_sbu_558k.json", "si": "single_image_3.2m.json", "ov": "onevision_1.6m.json"}


def _stages() -> dict:
    """OneVision's stages by name, as its scripts run them (see the top of this file)."""
    full = dict(template="qwen_1_5", trainable=EVERYTHING, learning_rate=1e-5, vision_learning_rate=2e-6,
                global_batch=256, micro_batch=128, max_length=32768)
    return {
        "stage1": stage("pretrain", data=DATA["stage1"], template="plain", trainable=["projector/.*"],
                        learning_rate=1e-3, global_batch=256, micro_batch=256, max_length=8192, base_resolution=True),
        "si": stage("si", data=DATA["si"], **full),
        "ov": stage("ov", data=DATA["ov"], **full),
    }


def get_config(arg: str = "qwen2_7b"):
    """`qwen2_7b` / `qwen2_05b`, optionally `_stage1`, `_si` or `_ov` for that stage alone."""
    llm, only = arg, ""
    for name in STAGES:
        if arg.endswith("_" + name):
            llm, only = arg[: -len(name) - 1], name
    if llm not in PRESETS:
        raise ValueError(f"configs/llava_onevision.py: arg {arg!r}; expected one of {sorted(PRESETS)}, optionally "
                         f"with one of {['_' + s for s in STAGES]}")
    c = base_config()
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.preset = PRESETS[llm]  # the architecture compile-only uses when model.init is not on this host
    c.checkpoint_every = 1000  # the scripts' save_steps
    c.log_every = 10
    stages = _stages()
    c.stages = [stages[only]] if only else [stages[s] for s in STAGES]
    c.data.eval_template = "qwen_1_5"
    c.data.group_by_modality_length = True
    c.data.num_frames = 32
    # OneVision's multi-image records (up to 37 images a record kept; more: skipped and counted): untiled, one tile
    # slot each, so a row's slots stay max(37, images) = the 37 of a lone anyres_max_9 image (anyres.image_slots).
    # `_si` / `_ov` alone; the all-stages variants keep 1 (multi-image records skipped and counted), since stage 1's
    # base-resolution rows would carry 37 slots for their one image.
    c.data.max_images_per_sample = 37 if only in ("si", "ov") else 1
    # A lone image takes up to 729 x 10 tokens and newlines (anyres_max_9), a 32-frame video 32 x 196 + 1.
    c.data.length_buckets = (1024, 2048, 4096, 8192, 16384)
    c.data.worker_count = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
