"""Held-out evaluation: answer accuracy (exactly what greedy decoding would answer), loss, blind baseline.

For a record with one question and a short answer, greedy decoding reproduces the answer and its
EOS exactly when, teacher-forced, the argmax at every supervised position is the label: one
forward pass per batch scores what generation would score, with no decode loop. The blind run
replaces every image with a blank (mean-colour, i.e. all-zero after normalisation) image.

LLaVA-NeXT (anyres) models: each image is rendered with its own token count and preprocessed to its
base and tiles, a row's slots padded to the geometry's max_patches, and `image_index` built as the
training pipeline builds it (`llava_jax.anyres.table_sources`; with `image_weight` for a weighted geometry,
OneVision's anyres_max_N).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import anyres
from llava_jax.config import LlavaConfig
from llava_jax.data import image as image_lib
from llava_jax.data import records as records_lib
from llava_jax.data import templates
from llava_jax.models.llava import Llava
from llava_jax.train.loss import IGNORE_INDEX, cross_entropy_sum


def eval_forward(cfg: LlavaConfig) -> Callable:
    """jit-able (params, batch) -> per-row (all supervised argmax correct, NLL sum, token count)."""
    module = Llava(cfg)

    def fn(params, batch):
        index = batch.get("image_index")
        if "image_weight" in batch:
            index = (index, batch["image_weight"])
        logits, _ = module.apply({"params": params}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                 image_index=index)
        targets = batch["labels"][:, 1:]
        valid = targets != IGNORE_INDEX
        hit = (jnp.argmax(logits[:, :-1], axis=-1) == targets) | ~valid
        nll = jax.vmap(lambda lg, lb: cross_entropy_sum(lg[None], lb[None]))(logits, batch["labels"])
        return jnp.all(hit, axis=-1), nll, jnp.sum(valid, axis=-1)

    return fn


def build_eval_set(
    val_path: str, image_folder: str, tokenizer, template: str, image_cfg: image_lib.ImageProcessorConfig,
    cfg: LlavaConfig, max_length: int,
) -> list[dict[str, Any]]:
    """Rendered held-out samples (ids, labels, one image or none, its size, qtype) with the training renderer.

    pixel_values: [H, W, 3] (LLaVA-1.5) or the image's [P, H, W, 3] base and tiles (anyres).
    """
    samples = []
    for rec in records_lib.load_records(val_path):
        imgs = records_lib.record_images(rec)
        px = size = None
        if imgs:
            image = image_lib.load_image(records_lib.resolve_image_path(image_folder, imgs[0]))
            px, size = image_lib.preprocess(image, image_cfg), (image.height, image.width)
        counts = cfg.image_layout(size).num_tokens if cfg.is_anyres and size else cfg.geometry.tile_tokens
        r = templates.render(rec["conversations"], template, tokenizer, image_token_index=cfg.image_token_index,
                             num_image_tokens=counts, max_length=max_length)
        if not r.num_images:  # truncation dropped the image whole (or there was none)
            px = size = None
        samples.append({"id": rec["id"], "input_ids": r.input_ids, "labels": r.labels, "pixel_values": px,
                        "size": size, "qtype": rec.get("qtype", "all")})
    return samples


def _batches(samples: Sequence[dict], batch_size: int, length: int, crop: int, blind: bool,
             geometry: anyres.AnyresConfig | None = None, image_token_index: int = 0):
    slots = geometry.max_patches if geometry is not None else 1
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        b = {
            "input_ids": np.zeros((batch_size, length), np.int32),
            "labels": np.full((batch_size, length), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((batch_size, length), np.int32),
            "pixel_values": np.zeros((batch_size, slots, crop, crop, 3), np.float32),
        }
        if geometry is not None and geometry.weighted:
            b["image_index"] = np.zeros((batch_size, length, anyres.CORNERS), np.int32)
            b["image_weight"] = np.zeros((batch_size, length, anyres.CORNERS), np.float32)
        elif geometry is not None:
            b["image_index"] = np.zeros((batch_size, length), np.int32)
        for i, s in enumerate(chunk):
            n = len(s["input_ids"])
            b["input_ids"][i, :n], b["labels"][i, :n], b["attention_mask"][i, :n] = s["input_ids"], s["labels"], 1
            if s["pixel_values"] is None:
                continue
            if not blind:
                px = s["pixel_values"]
                b["pixel_values"][i, : len(px) if geometry is not None else 1] = px
            if geometry is not None:  # blind too: the blank tiles' features go where the image's would
                tokens = b["input_ids"][i] == image_token_index
                rows, weights = anyres.table_sources(geometry, [s["size"]], slots)
                if geometry.weighted:  # OneVision: an image past anyres_max_N mixes table rows
                    b["image_index"][i, tokens], b["image_weight"][i, tokens] = rows, weights
                else:
                    b["image_index"][i, tokens] = rows[:, 0]
        yield len(chunk), b


def evaluate(
    forward: Callable, params: Any, samples: Sequence[dict], *, batch_size: int, crop: int, place: Callable = lambda b: b,
    geometry: anyres.AnyresConfig | None = None, image_token_index: int = 0,
) -> dict[str, float]:
    """Accuracy overall and per qtype, loss, and the blind (image blanked) accuracy.

    `geometry` (an anyres model's, with its `image_token_index`): batches of tile slots and image_index.
    """
    length = max(len(s["input_ids"]) for s in samples)
    length = -(-length // 16) * 16  # one compiled shape for the whole set
    out: dict[str, float] = {}
    for blind in (False, True):
        hits: dict[str, list[bool]] = collections.defaultdict(list)
        nll = tokens = 0.0
        for n, batch in _batches(samples, batch_size, length, crop, blind, geometry, image_token_index):
            ok, row_nll, row_tok = jax.device_get(forward(params, place(batch)))
            done = len(hits["__all__"])
            for i, s in enumerate(samples[done : done + n]):
                hits[s["qtype"]].append(bool(ok[i]))
                hits["__all__"].append(bool(ok[i]))
            nll += float(row_nll[:n].sum())
            tokens += float(row_tok[:n].sum())
        prefix = "eval/blind_" if blind else "eval/"
        out[prefix + "accuracy"] = float(np.mean(hits["__all__"]))
        if not blind:
            out["eval/loss"] = nll / max(tokens, 1.0)
            for q, v in sorted(hits.items()):
                if q != "__all__" and len(hits) > 2:
                    out[f"eval/accuracy_{q}"] = float(np.mean(v))
    return out
