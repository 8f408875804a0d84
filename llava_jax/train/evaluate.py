"""Held-out evaluation: answer accuracy (exactly what greedy decoding would answer), loss, blind baseline.

For a record with one question and a short answer, greedy decoding reproduces the answer and its
EOS exactly when, teacher-forced, the argmax at every supervised position is the label: one
forward pass per batch scores what generation would score, with no decode loop. The blind run
replaces every image with a blank (mean-colour, i.e. all-zero after normalisation) image.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
        logits, _ = module.apply({"params": params}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
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
    """Rendered held-out samples (ids, labels, one image or none, qtype) with the training renderer."""
    samples = []
    for rec in records_lib.load_records(val_path):
        r = templates.render(rec["conversations"], template, tokenizer, image_token_index=cfg.image_token_index,
                             num_image_tokens=cfg.num_image_tokens, max_length=max_length)
        imgs = records_lib.record_images(rec)
        px = None
        if imgs:
            path = records_lib.resolve_image_path(image_folder, imgs[0])
            px = image_lib.preprocess(image_lib.load_image(path), image_cfg)
        samples.append({"id": rec["id"], "input_ids": r.input_ids, "labels": r.labels, "pixel_values": px,
                        "qtype": rec.get("qtype", "all")})
    return samples


def _batches(samples: Sequence[dict], batch_size: int, length: int, crop: int, blind: bool):
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        b = {
            "input_ids": np.zeros((batch_size, length), np.int32),
            "labels": np.full((batch_size, length), IGNORE_INDEX, np.int32),
            "attention_mask": np.zeros((batch_size, length), np.int32),
            "pixel_values": np.zeros((batch_size, 1, crop, crop, 3), np.float32),
        }
        for i, s in enumerate(chunk):
            n = len(s["input_ids"])
            b["input_ids"][i, :n], b["labels"][i, :n], b["attention_mask"][i, :n] = s["input_ids"], s["labels"], 1
            if s["pixel_values"] is not None and not blind:
                b["pixel_values"][i, 0] = s["pixel_values"]
        yield len(chunk), b


def evaluate(
    forward: Callable, params: Any, samples: Sequence[dict], *, batch_size: int, crop: int, place: Callable = lambda b: b
) -> dict[str, float]:
    """Accuracy overall and per qtype, loss, and the blind (image blanked) accuracy."""
    length = max(len(s["input_ids"]) for s in samples)
    length = -(-length // 16) * 16  # one compiled shape for the whole set
    out: dict[str, float] = {}
    for blind in (False, True):
        hits: dict[str, list[bool]] = collections.defaultdict(list)
        nll = tokens = 0.0
        for n, batch in _batches(samples, batch_size, length, crop, blind):
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
