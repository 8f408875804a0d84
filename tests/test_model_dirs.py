"""Model directories as users meet them: what a path is, what a workdir holds, how outputs are created."""

from __future__ import annotations

import json
import os

import pytest

from llava_jax.config import CONFIG_FILE
from llava_jax.weights import model_dir
from llava_jax.paths import atomic_directory
from llava_jax.weights.safetensors_io import CheckpointError


def _touch(path, text="{}"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_kinds_and_a_workdir_that_lists_its_models(tmp_path):
    work = tmp_path / "work"
    _touch(work / "stage1_pretrain" / CONFIG_FILE)
    _touch(work / "checkpoints" / "12" / "meta" / "metadata")
    os.makedirs(work / "checkpoints" / "12" / "state")
    _touch(work / "hf" / "config.json", json.dumps({"vision_config": {}, "text_config": {}}))
    _touch(work / "orig" / "config.json", json.dumps({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    _touch(work / "data" / "val.json", "[]")
    kinds = {rel: k for rel, k in model_dir.find_models(str(work))}
    assert kinds == {"stage1_pretrain": "ours", os.path.join("checkpoints", "12"): "training checkpoint",
                     "hf": "hf", "orig": "original"}
    with pytest.raises(CheckpointError) as e:
        model_dir.require(str(work))
    assert f"{work} is not a model directory but holds these: {work}/checkpoints/12 (training checkpoint)" in str(e.value)
    assert f"{work}/stage1_pretrain (ours)" in str(e.value)
    with pytest.raises(CheckpointError, match="convert it first"):
        model_dir.require(str(work / "orig"))
    with pytest.raises(CheckpointError, match="none inside it"):
        model_dir.require(str(work / "data"))
    assert model_dir.require(str(work / "hf")) == "hf"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_users_umask_not_0700(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = atomic_directory(str(tmp_path / "out"), lambda tmp: _touch(os.path.join(tmp, "x")))
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask


def training_checkpoint(workdir, base: str, params: dict, *, step: int = 4, lora=None,
                        tokenizer: str | None = None) -> str:
    """A training checkpoint as train/loop.py writes one (its Checkpointer, its model record): `params`, the
    stage's trained part (the model's layout), over the frozen model directory `base`; `lora` the stage's spec."""
    from llava_jax.config import ImageProcessorConfig, LlavaConfig
    from llava_jax.train.checkpoint import Checkpointer

    cfg = LlavaConfig.load(str(base))
    image = ImageProcessorConfig.from_pretrained(str(base))
    record = model_dir.checkpoint_model_meta(cfg, str(workdir), str(base), tokenizer or os.path.join(workdir, "tok"),
                                             image.to_dict(), lora=lora)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(step, {"params": params}, {"stage": 1, "stage_step": step, "stage_steps": step, "global_step": step,
                                          "model": record}, {})
    ckpt.close()
    return os.path.join(workdir, "checkpoints", str(step))
