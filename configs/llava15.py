# python -m llava_jax.train --config=configs/llava15.py:7b --workdir=gs://BUCKET/llava15-7b \
#   --config.model.init=/ckpt/llava15-7b-init --config.data.image_folder=/data/llava \
#   --config.stages[0].data=/data/llava/blip_laion_cc_sbu_558k.json \
#   --config.stages[1].data=/data/llava/llava_v1_5_mix665k.json
#
# LLaVA-1.5 (7b or 13b), both stages, with the reference hyperparameters (LLaVA-1.5 paper /
# scripts/v1_5/{pretrain,finetune}.sh): stage 1 trains the projector on 558K captions (`plain`,
# global batch 256, lr 1e-3); stage 2 trains projector + LLM on mix665k (`vicuna_v1`, global
# batch 128, lr 2e-5). Both: AdamW, no weight decay, warmup 3%, cosine, 1 epoch, 2048 tokens,
# bf16 compute with float32 master weights. The vision tower stays frozen.
#
# Remat and micro-batch (gradient accumulation changes no number: the loss is the mean over the
# global batch), chosen by per-chip memory from the TPU compiler (BENCHMARKS.md, 7B stage 2 on 8
# v5p chips): full remat at micro-batch 128 takes 39.9 GiB a chip; `minimal` (every projection
# saved, no matmul recomputed) at micro-batch 32 takes 41.6 GiB, the same, and drops the
# recomputed forward (a quarter of the LLM's step FLOPs), so 7B stage 2 uses it. Step times are
# unmeasured (no accelerator yet). On fewer than 8 devices each holds more than 4 rows (about
# 7 GiB a row with `minimal`); where that does not fit, the previous setting is
# --config.stages[1].remat=full --config.stages[1].micro_batch=128.
# Stage 1 and 13B keep full remat at the reference micro-batches (not measured per policy).
#
# Where it fits (TPU compiler; GPUs: the CPU compiler's upper bound; full remat, FSDP over every
# chip; BENCHMARKS.md, `python -m bench.compile --table`). Rows are per chip; micro_batch is global.
#   7B   v5p-8 (4 chips):  stage 1 at 32 rows, stage 2 at 16 (the recipe's micro-batches as they are)
#        8 x 80 GB GPUs:   stage 1 at 16 rows (--config.stages[0].micro_batch=128), stage 2 as it is
#        v6e-8:            stage 1 at 16 rows (--config.stages[0].micro_batch=128); stage 2 at 4:
#                          --config.stages[1].remat=full --config.stages[1].micro_batch=32
#        v5e-16:           stage 1 at 8 rows (micro_batch=128); stage 2 at 2 (remat=full, micro_batch=32)
#        v5e-8:            stage 1 at 8 rows (--config.stages[0].micro_batch=64); stage 2 does not fit
#                          (1 row a chip asks 28 GiB of 16): use `:7b_lora` or a larger slice
#   13B  v5p-8 (4 chips):  stage 1 at 32 rows; stage 2 at 4 (--config.stages[1].micro_batch=16)
#        8 x 80 GB GPUs:   stage 1 at 16 rows (micro_batch=128); stage 2 at 8 (micro_batch=64)
#        v6e-8:            stage 1 at 16 rows (micro_batch=128); stage 2 does not fit: `:13b_lora` at 8
#                          rows (--config.stages[1].micro_batch=64)
#        v5e-8, v5e-16:    stage 1 at 8 rows (micro_batch=64 / 128); stage 2 does not fit: `:13b_lora` at 4
#                          rows (micro_batch=32 / 64). Full fine-tuning holds 16 bytes a parameter
#                          before any activation; `:7b_lora` fits a v5e-8 as it is (4 rows a chip).
# Check any other slice before renting it: --config.compile_only=True --config.compile_topology=v5e:4x4
#
# model.init is the stage-1 starting point converted from parts:
#   python -m llava_jax.convert --vision-tower clip-vit-large-patch14-336 --llm vicuna-7b-v1.5 \
#     --projector-type mlp2x_gelu --dst /ckpt/llava15-7b-init
# `:7b_stage2` / `:13b_stage2` run stage 2 alone from a stage-1 output (model.init = that dir).
#
# `:7b_lora` / `:13b_lora`: stage 2 as LoRA, the original's scripts/v1_5/finetune_lora.sh (LoRA r 128,
# alpha 256, dropout 0.05 on every Linear of the LLM but lm_head, lr 2e-4; the projector trained
# fully at `--mm_projector_lr 2e-5`; global batch 128). The stage writes workdir/stage2_finetune_lora
# (the base + trained projector, and adapter/ in PEFT's layout). `:7b_lora_stage2` runs it alone,
# from a stage-1 output or, as finetune_task_lora.sh on a user's own data, from a full LLaVA-1.5.
from llava_jax.train.defaults import base_config, lora, stage

PROJECTOR = ["projector/.*"]
PROJECTOR_AND_LLM = ["projector/.*", "language_model/.*"]


def get_config(arg: str = "7b"):
    size, _, only = arg.partition("_")
    use_lora = only.startswith("lora")
    only = only.removeprefix("lora").removeprefix("_")
    if size not in ("7b", "13b") or only not in ("", "stage1", "stage2"):
        raise ValueError(f"configs/llava15.py: arg {arg!r}; expected 7b, 13b, 7b_stage1, 7b_stage2, 13b_stage2, "
                         f"7b_lora, 13b_lora, 7b_lora_stage2, ...")
    c = base_config()
    c.model.preset = f"llava-1.5-{size}"  # the architecture compile-only uses when model.init is not on this host
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.checkpoint_every = 500
    c.log_every = 10
    # Micro-batches are global (all devices): with full remat 8 x A100-80G fit 32 rows each in stage 1,
    # 16 in stage 2; the 7B's stage 2 takes 4 rows a device with `minimal` (see the top).
    micro1 = 256
    micro2, remat2 = (32, "minimal") if size == "7b" else (128, "")
    stages = [
        stage("pretrain", data="blip_laion_cc_sbu_558k.json", template="plain", trainable=PROJECTOR,
              learning_rate=1e-3, global_batch=256, micro_batch=micro1),
        stage("finetune", data="llava_v1_5_mix665k.json", template="vicuna_v1", trainable=PROJECTOR_AND_LLM,
              learning_rate=2e-5, global_batch=128, micro_batch=micro2, remat=remat2),
    ]
    if use_lora:
        stages[1] = stage("finetune_lora", data="llava_v1_5_mix665k.json", template="vicuna_v1", trainable=PROJECTOR,
                          learning_rate=2e-4, global_batch=128, micro_batch=micro2,
                          lora=lora(rank=128, alpha=256, dropout=0.05, non_lora_learning_rate=2e-5))
    c.data.group_by_modality_length = True
    c.data.length_buckets = (512, 1024, 1536)
    c.data.worker_count = 8
    c.stages = {"": stages, "stage1": stages[:1], "stage2": stages[1:]}[only]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every device: 7B/13B states do not fit one
    return c
