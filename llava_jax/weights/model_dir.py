"""What a `--model-path` is: every kind of model directory the project reads or writes, told apart by its files.

    ours                 llava_jax_config.json + params/ (convert's output, a stage's output
                         WORKDIR/stageN_NAME, WORKDIR/init)
    training checkpoint  WORKDIR/checkpoints/STEP: an Orbax step (meta/, state/, data/) whose
                         meta records the model (see `checkpoint_model_meta`)
    hf                   config.json of a llava-hf LlavaForConditionalGeneration + *.safetensors
    original             config.json of liuhaotian/llava-*, lmms-lab/* (mm_vision_tower): convert it first

Everything here reads small JSON files only (no jax), so that CLIs can check a path before any
heavy import and say what a directory holds when it is not a model (`--model-path workdir`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from llava_jax import paths
from llava_jax.config import CONFIG_FILE, ImageProcessorConfig, LlavaConfig, LoraSpec
from llava_jax.weights.safetensors_io import CheckpointError
from llava_jax.weights.stores import read_json

OURS, CHECKPOINT, HF, ORIGINAL = "ours", "training checkpoint", "hf", "original"
ALL = (OURS, CHECKPOINT, HF, ORIGINAL)
CHECKPOINT_META = os.path.join("meta", "metadata")  # the JSON item train/checkpoint.py saves beside the state


def kind(path: str) -> str | None:
    """The kind of model directory at `path` (see the module docstring), or None if it is none of them."""
    if paths.isfile(os.path.join(path, CONFIG_FILE)):
        return OURS
    if paths.isfile(os.path.join(path, CHECKPOINT_META)) and paths.isdir(os.path.join(path, "state")):
        return CHECKPOINT
    hf_config = os.path.join(path, "config.json")
    if paths.isfile(hf_config):
        try:
            cfg = json.loads(paths.read_text(hf_config))
        except ValueError:
            return None
        if cfg.get("mm_vision_tower"):
            return ORIGINAL
        if "vision_config" in cfg and "text_config" in cfg:
            return HF
    return None


def find_models(path: str, depth: int = 2) -> list[tuple[str, str]]:
    """(path relative to `path`, kind) of the model directories inside `path`, `depth` levels deep."""
    found = []
    if depth <= 0 or not paths.isdir(path):
        return found
    for name in paths.listdir(path):
        sub = os.path.join(path, name)
        k = kind(sub)
        if k is not None:
            found.append((name, k))
        elif paths.isdir(sub):
            found += [(os.path.join(name, rel), k) for rel, k in find_models(sub, depth - 1)]
    return found


def require(path: str, accept: tuple[str, ...] = (OURS, CHECKPOINT, HF)) -> str:
    """The kind of `path`; a CheckpointError saying what to pass instead when it is not an accepted model directory.

    A run's workdir is the usual mistake: the error lists the model directories it holds.
    """
    if not paths.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    k = kind(path)
    if k in accept:
        return k
    if k == ORIGINAL:
        raise CheckpointError(f"{path}: an original LLaVA checkpoint; convert it first: python -m llava_jax.convert "
                              f"--src {path} --dst DIR (with --vision-tower CLIP_DIR where the tower is not inside "
                              "it, as in liuhaotian/llava-v1.5-*)")
    inside = find_models(path)
    if inside:
        listed = ", ".join(f"{os.path.join(path, rel)} ({kd})" for rel, kd in inside)
        raise CheckpointError(f"{path} is not a model directory but holds these: {listed}")
    raise CheckpointError(f"{path}: not a model directory (no {CONFIG_FILE}, HF config.json or training "
                          "checkpoint), and none inside it")


# ---------------------------------------------------------------------------------------------
# Training checkpoints: what their meta records about the model.


def checkpoint_model_meta(cfg: LlavaConfig, workdir: str, frozen_from: str | None, tokenizer: str,
                          image_processor: dict[str, Any], lora: LoraSpec | None = None) -> dict[str, Any]:
    """What a training checkpoint records so that it loads as a model on its own.

    Args:
      cfg: the architecture (stored as float32, no remat).
      workdir: the run's workdir; paths inside it are stored relative to it, so that a copied
        workdir (`gsutil cp -r`) still resolves.
      frozen_from: the model directory holding the parameters the stage does not train (its
        starting point), or None when the stage trains every parameter.
      tokenizer: the run's tokenizer.model.
      image_processor: `ImageProcessorConfig.to_dict()` of the stage.
      lora: the LoRA stage's adapter spec (its `lora_a`/`lora_b` are among the checkpoint's parameters,
        and their alpha is nowhere else), or None.
    """
    def rel(p: str | None) -> str | None:
        if p is None:
            return None
        p = paths.absolute(p)
        return os.path.relpath(p, workdir) if p.startswith(workdir.rstrip("/") + "/") else p

    return {"config": cfg.replace(dtype="float32", param_dtype="float32", remat="none").to_dict(),
            "frozen_from": rel(frozen_from), "tokenizer": rel(tokenizer), "image_processor": image_processor,
            "lora": None if lora is None else dataclasses.asdict(lora)}


def checkpoint_model(path: str) -> dict[str, Any]:
    """A training checkpoint's model record, its paths made absolute: config (a LlavaConfig, with its LoRA
    spec when the stage trains adapters), frozen_from, tokenizer, image_processor."""
    meta = read_json(os.path.join(path, CHECKPOINT_META))
    model = meta.get("model")
    if not model:
        raise CheckpointError(f"{path}: this training checkpoint does not record its model (written before "
                              "checkpoints did); use the stage's model directory WORKDIR/stageN_NAME instead")
    workdir = os.path.dirname(os.path.dirname(paths.absolute(path)))  # WORKDIR/checkpoints/STEP

    def resolve(p: str | None) -> str | None:
        return p if p is None or paths.is_remote(p) or os.path.isabs(p) else os.path.join(workdir, p)

    lora = LoraSpec.from_dict(model["lora"]) if model.get("lora") else None
    return {**model, "config": LlavaConfig.from_dict(model["config"]).replace(lora=lora),
            "frozen_from": resolve(model["frozen_from"]), "tokenizer": resolve(model["tokenizer"])}


def config_of(path: str) -> LlavaConfig:
    """Our config of an `ours` directory or a training checkpoint."""
    if kind(path) == CHECKPOINT:
        return checkpoint_model(path)["config"]
    return LlavaConfig.load(path)


def tokenizer_dir(path: str) -> str:
    """The directory holding the tokenizer files of a model directory of any kind (a training checkpoint
    has none of its own: the run's tokenizer.model, which its record names)."""
    if kind(path) == CHECKPOINT:
        return os.path.dirname(checkpoint_model(path)["tokenizer"])
    return path


def image_processor(path: str, image_aspect_ratio: str | None = None) -> ImageProcessorConfig:
    """The image settings of a model directory of any kind: a training checkpoint's record, else the
    directory's preprocessor_config.json (or original config.json); `image_aspect_ratio` overrides the padding."""
    if kind(path) == CHECKPOINT:
        recorded = ImageProcessorConfig.from_dict(checkpoint_model(path)["image_processor"])
        return recorded.with_aspect_ratio(image_aspect_ratio)
    return ImageProcessorConfig.from_pretrained(path, image_aspect_ratio=image_aspect_ratio)
