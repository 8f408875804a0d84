"""LLaVA-NeXT (anyres) against transformers' `LlavaNextForConditionalGeneration`: logits, layouts, batches.

Tiny random models (CLIP 28 px tiles of 2 x 2 features, so the v1.6 pinpoints scaled to 28 px), float32,
fresh seeds; pixel values are random tiles, so this checks the model's tiling, unpadding, newlines and
placement, not preprocessing (tests/test_data_image_anyres.py checks that against the image processor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_jax import load_pretrained
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, perturb_, random_ids, text_config_dict, vision_config_dict

TILE = 28
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # the v1.6 list in 28 px tiles
MAX_PATCHES = 5


def make_next(seed: int, *, text_config=None, pinpoints=PINPOINTS):
    """A perturbed tiny `LlavaNextForConditionalGeneration` (CLIP + the given text config, Llama by default)."""
    from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    tc = text_config if text_config is not None else LlamaConfig(**text_config_dict())
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_config_dict(image_size=TILE)),
        text_config=tc,
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=getattr(tc, "tie_word_embeddings", False),
    )
    del AutoConfig
    return perturb_(LlavaNextForConditionalGeneration(cfg), seed)


def hf_logits(model, ids, pixel_values, image_sizes, mask) -> np.ndarray:
    kw = dict(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long))
    if pixel_values is not None:
        kw.update(pixel_values=torch.as_tensor(pixel_values.transpose(0, 1, 4, 2, 3).copy()),
                  image_sizes=torch.as_tensor(image_sizes, dtype=torch.long))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def batch(rng, ours, rows_images, pad_side="right"):
    """input_ids / mask for rows of (text, <image>, text ...) with each image's own token count; all images'
    random tiles [n, MAX_PATCHES, 28, 28, 3] zero beyond each image's patches, and their sizes."""
    rows, sizes = [], []
    for i, row_sizes in enumerate(rows_images):
        ids = [1] + list(random_ids(rng, 3 + i))
        for size in row_sizes:
            ids += [IMAGE_TOKEN] * ours.config.image_layout(size).num_tokens + list(random_ids(rng, 2))
            sizes.append(size)
        rows.append(ids)
    width = max(map(len, rows))
    input_ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(input_ids)
    for b, r in enumerate(rows):
        sl = slice(0, len(r)) if pad_side == "right" else slice(width - len(r), width)
        input_ids[b, sl], mask[b, sl] = r, 1
    pixels = rng.standard_normal((len(sizes), MAX_PATCHES, TILE, TILE, 3)).astype(np.float32)
    for j, size in enumerate(sizes):
        pixels[j, ours.config.image_layout(size).num_patches:] = 0
    return input_ids, mask, (pixels if sizes else None), np.array(sizes, np.int64).reshape(-1, 2)


# (height, width): square (1x2 tiles in transformers), wide, tall, smaller than a tile, odd sizes.
SIZES = [(28, 28), (30, 90), (90, 30), (20, 17), (61, 45), (100, 100), (33, 70)]


@pytest.fixture(scope="module")
def llama_next(tmp_path_factory):
    seed = fresh_seed()
    hf = make_next(seed)
    path = tmp_path_factory.mktemp("next")
    hf.save_pretrained(path)
    return hf, load_pretrained(str(path)), seed


@pytest.mark.parametrize("size", SIZES)
def test_one_image_logits_match_transformers(llama_next, size):
    hf, ours, _ = llama_next
    rng = np.random.default_rng(fresh_seed())
    ids, mask, px, sizes = batch(rng, ours, [[size]])
    want = hf_logits(hf, ids, px, sizes, mask)
    got = np.asarray(ours(ids, px, mask, image_sizes=sizes).logits)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_mixed_batch_matches_transformers(llama_next, pad_side):
    """Two images of different shapes in one row, one image in another, and a text-only row."""
    hf, ours, _ = llama_next
    rng = np.random.default_rng(fresh_seed())
    ids, mask, px, sizes = batch(rng, ours, [[(30, 90), (90, 30)], [], [(61, 45)]], pad_side)
    want = hf_logits(hf, ids, px, sizes, mask)
    got = np.asarray(ours(ids, px, mask, image_sizes=sizes).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_token_count_mismatch_is_a_clear_error(llama_next):
    _, ours, _ = llama_next
    rng = np.random.default_rng(0)
    ids, mask, px, sizes = batch(rng, ours, [[(30, 90)]])
    with pytest.raises(ValueError, match=r"row 0 of input_ids holds \d+ image tokens .* not the \d+ its images"):
        ours(ids, px, mask, image_sizes=np.array([[90, 30]]) * 3)
    with pytest.raises(ValueError, match="image_sizes"):
        ours(ids, px, mask)
