"""Held-out evaluation: answer accuracy (exactly what greedy decoding would answer), loss, blind baseline.

For a record with one question and a short answer, greedy decoding reproduces the answer and its
EOS exactly when, teacher-forced, the argmax at every supervised position is the label: one
forward pass per batch scores what generation would score, with no decode loop. The blind run
replaces every image with a blank (mean-colour, i.e. all-zero after normalisation) image.

LLaVA-NeXT (anyres) models: each image is rendered with its own token count and preprocessed to its
base and tiles (OneVision: a record's several images untiled, a video's frames one slot each), and
`image_index` (with `image_weight` for a weighted geometry: OneVision's anyres_max_N, video pooling) built by
`models.llava.place_images`, which the training pipeline's batches are tested equal to.
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
from llava_jax.data import pipeline
from llava_jax.data import records as records_lib
from llava_jax.data import templates
from llava_jax.data import video as video_lib
from llava_jax.models.llava import Llava, place_images
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
    cfg: LlavaConfig, max_length: int, num_frames: int = 0,
) -> list[dict[str, Any]]:
    """Rendered held-out samples with the training renderer: ids, labels, images, their sizes, videos, qtype.

    images: per image [H, W, 3] (LLaVA-1.5) or its [P, H, W, 3] base and tiles (anyres; OneVision: untiled when
    the record has several). videos: a video record's `num_frames` frames [F, H, W, 3], sampled and
    preprocessed as the training pipeline does (a model with video pooling only; `num_frames` 0: no video).
    """
    g = cfg.geometry
    video_cfg = pipeline.video_settings(image_cfg, g, num_frames) if num_frames and g.video else None
    samples = []
    for rec in records_lib.load_records(val_path):
        rels = records_lib.record_images(rec)
        if not cfg.is_anyres:
            rels = rels[:1]  # LLaVA-1.5's held-out questions: one image a record
        opened = [image_lib.load_image(records_lib.resolve_image_path(image_folder, r)) for r in rels]
        tiled = image_lib.is_tiled(image_cfg, len(opened))
        sizes = [(im.height, im.width) for im in opened]
        counts = [anyres.layout(g, s, tiled).num_tokens for s in sizes] if cfg.is_anyres else g.tile_tokens
        videos = []
        if video_cfg is not None and rec.get("video"):
            videos = [video_lib.load_video(records_lib.resolve_image_path(image_folder, rec["video"]), video_cfg,
                                           num_frames)]
        r = templates.render(records_lib.render_conversations(rec), template, tokenizer,
                             image_token_index=cfg.image_token_index, num_image_tokens=counts,
                             max_length=max_length, video_token_index=cfg.video_token_index,
                             num_video_tokens=[g.video_tokens(len(v)) for v in videos])
        # Truncation drops whole images (and videos) from the end.
        kept = opened[: r.num_images]
        samples.append({"id": rec["id"], "input_ids": r.input_ids, "labels": r.labels,
                        "images": [image_lib.preprocess(im, image_cfg, tiled) for im in kept],
                        "sizes": sizes[: r.num_images], "videos": videos[: r.num_videos],
                        "qtype": rec.get("qtype", "all")})
    return samples


def _slots(sample: dict, cfg: LlavaConfig | None) -> int:
    """Tile slots a sample's images and frames fill (LLaVA-1.5: its one image's)."""
    if cfg is None or not cfg.is_anyres:
        return 1
    return sum(len(im) for im in sample["images"]) + sum(len(v) for v in sample["videos"])


def _batches(samples: Sequence[dict], batch_size: int, length: int, crop: int,
             cfg: LlavaConfig | None = None, slots: int = 1):
    """(rows filled, batch): padded batches of `batch_size` rows; an anyres model's images and videos placed by
    `place_images`, the function the model is checked against transformers with."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        b = {
            "input_ids": np.zeros((batch_size, length), np.int32),
            "labels": np.full((batch_size, length), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((batch_size, length), np.int32),
            "pixel_values": np.zeros((batch_size, slots, crop, crop, 3), np.float32),
        }
        for i, s in enumerate(chunk):
            n = len(s["input_ids"])
            b["input_ids"][i, :n], b["labels"][i, :n], b["attention_mask"][i, :n] = s["input_ids"], s["labels"], 1
            if cfg is None or not cfg.is_anyres:
                if s["images"]:
                    b["pixel_values"][i, 0] = s["images"][0]
        if cfg is not None and cfg.is_anyres:
            per_row = [len(s["images"]) for s in chunk] + [0] * (batch_size - len(chunk))
            pixels, index = place_images(b["input_ids"], [im for s in chunk for im in s["images"]], cfg,
                                         [sz for s in chunk for sz in s["sizes"]], slots,
                                         videos=[v for s in chunk for v in s["videos"]], images_per_row=per_row)
            b["pixel_values"] = np.asarray(pixels, np.float32)
            if cfg.geometry.weighted:  # OneVision: a downscaled image's or a video's tokens mix table rows
                b["image_index"], b["image_weight"] = index
            else:
                b["image_index"] = index
        yield len(chunk), b


def _blind(batch: dict) -> dict:
    """The batch with its images blanked: the same tokens and index, the blank tiles' features where the images'
    would go."""
    return {**batch, "pixel_values": np.zeros_like(batch["pixel_values"])}


def evaluate(
    forward: Callable, params: Any, samples: Sequence[dict], *, batch_size: int, crop: int,
    place: Callable = lambda b: b, cfg: LlavaConfig | None = None,
) -> dict[str, float]:
    """Accuracy overall and per qtype, loss, and the blind (image blanked) accuracy, overall and per qtype.

    `cfg` (an anyres model's): batches of tile slots, image_index (and image_weight), videos' frames; None or a
    LLaVA-1.5 config: one image slot a row.
    """
    length = max(len(s["input_ids"]) for s in samples)
    length = -(-length // 16) * 16  # one compiled shape for the whole set
    slots = max(max(_slots(s, cfg) for s in samples), 1)
    batches = list(_batches(samples, batch_size, length, crop, cfg, slots))  # built once, seen then blind
    out: dict[str, float] = {}
    for blind in (False, True):
        hits: dict[str, list[bool]] = collections.defaultdict(list)
        nll = tokens = 0.0
        for n, batch in batches:
            ok, row_nll, row_tok = jax.device_get(forward(params, place(_blind(batch) if blind else batch)))
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
                out[f"{prefix}accuracy_{q}"] = float(np.mean(v))
    return out
