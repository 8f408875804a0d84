# python -m llava_jax.train --config=configs/llava_v1.py:7b --workdir=/ckpt/llava-v1-7b \
#   --config.model.init=/ckpt/llava-v1-7b-init --config.data.image_folder=/data/llava \
#   --config.stages[0].data=/data/llava/blip_laion_cc_sbu_558k.json \
#   --config.stages[1].data=/data/llava/llava_instruct_158k.json
#
# LLaVA v1: the linear projector on CLIP ViT-L/14 (224 px), same two stages as LLaVA-1.5
# (the init converted with --projector-type linear). Stage 1 lr 2e-3 at global batch 128 as in
# the original pretrain script; stage 2 lr 2e-5 at 128, 3 epochs on llava_instruct_158k.
from llava_jax.train.defaults import base_config, stage


def get_config(arg: str = "7b"):
    if arg not in ("7b", "13b"):
        raise ValueError(f"configs/llava_v1.py: arg {arg!r}; expected 7b or 13b")
    c = base_config()
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.pad_to_square = False  # v1 centre-crops instead of padding
    c.stages = [
        stage("pretrain", data="blip_laion_cc_sbu_558k.json", template="plain", trainable=["projector/.*"],
              learning_rate=2e-3, global_batch=128, micro_batch=128),
        stage("finetune", data="llava_instruct_158k.json", template="llava_v1",
              trainable=["projector/.*", "language_model/.*"], learning_rate=2e-5, global_batch=128,
              micro_batch=128, epochs=3),
    ]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
