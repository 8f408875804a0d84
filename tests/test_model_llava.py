"""Full LLaVA logits against transformers' LlavaForConditionalGeneration (float32, tiny, perturbed)."""

import numpy as np
import pytest

from llava_jax import load_pretrained
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, make_llava, random_ids, torch_logits

ATOL = 1e-4


def _sequence(rng, n_img, images: int, text_len: int) -> list[int]:
    """BOS, then each image as a placeholder run preceded by some text, then text."""
    ids = [1]
    for _ in range(images):
        ids += list(random_ids(rng, 3)) + [IMAGE_TOKEN] * n_img
    return ids + list(random_ids(rng, text_len))


def _batch(rng, n_img, images_per_row, pad_side="right"):
    rows = [_sequence(rng, n_img, k, 5 + 2 * i) for i, k in enumerate(images_per_row)]
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for b, r in enumerate(rows):
        if pad_side == "right":
            ids[b, : len(r)], mask[b, : len(r)] = r, 1
        else:
            ids[b, t - len(r) :], mask[b, t - len(r) :] = r, 1
    return ids, mask


def _compare(hf_model, ours, ids, mask, pixels):
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = torch_logits(hf_model, ids, pixels, mask, pos)
    got = np.asarray(ours(ids, pixels, mask).logits)
    valid = mask.astype(bool)
    err = np.abs(got - ref)[valid].max()
    assert err < ATOL, f"max abs logit error {err:.2e} over valid positions"
    return err


CASES = [
    # (vision_feature_layer, strategy, kv_heads, rope theta)
    (-2, "default", 4, 1e4),
    (-1, "full", 2, 5e5),
    (-3, "default", 1, 1e4),
    (1, "full", 4, 5e5),
]


@pytest.mark.parametrize("layer,strategy,kv_heads,theta", CASES)
def test_llava_logits_match_transformers(tmp_path, layer, strategy, kv_heads, theta):
    seed = fresh_seed()
    hf, n_img = make_llava(seed, vision_feature_layer=layer, strategy=strategy, kv_heads=kv_heads, theta=theta)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    rng = np.random.default_rng(seed)
    # One row with two images, one with none, one with one: features fill placeholders in order.
    ids, mask = _batch(rng, n_img, [2, 0, 1])
    pixels = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
    _compare(hf, ours, ids, mask, pixels)


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_padding_sides_match_transformers(tmp_path, pad_side):
    seed = fresh_seed()
    hf, n_img = make_llava(seed)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    rng = np.random.default_rng(seed)
    ids, mask = _batch(rng, n_img, [1, 1], pad_side)
    pixels = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
    _compare(hf, ours, ids, mask, pixels)


def test_left_padding_equals_unpadded(tmp_path):
    """Positions skip padding: a left-padded row gives the logits of the same row alone."""
    seed = fresh_seed()
    hf, n_img = make_llava(seed)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    rng = np.random.default_rng(seed)
    ids, mask = _batch(rng, n_img, [1, 1], "left")
    pixels = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
    batched = np.asarray(ours(ids, pixels, mask).logits)
    short = int(mask[0].sum())
    alone = np.asarray(ours(ids[:1, -short:], pixels[:1]).logits)
    np.testing.assert_allclose(batched[0, -short:], alone[0], atol=ATOL)


def test_text_only_matches_transformers(tmp_path):
    seed = fresh_seed()
    hf, _ = make_llava(seed, tie=True)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    ids = np.concatenate([[1], random_ids(np.random.default_rng(seed), 11)])[None]
    ref = torch_logits(hf, ids)
    np.testing.assert_allclose(np.asarray(ours(ids).logits), ref, atol=ATOL)


@pytest.mark.parametrize("layout", ["hf_new", "hf_published"])
def test_other_key_layouts_load_identically(tmp_path, layout):
    """transformers 5 saves `language_model.model.*` with `vision_tower.*`; published llava-hf checkpoints
    keep CLIP's `vision_model.` level, and transformers 4.52-4.57 saved `model.language_model.*`. All load alike,
    sharded with an index or not."""
    import json

    from llava_jax.weights.safetensors_io import TensorStore, save_file

    seed = fresh_seed()
    hf, n_img = make_llava(seed)
    saved, other = tmp_path / "saved", tmp_path / "other"
    hf.save_pretrained(saved)
    other.mkdir()
    store = TensorStore.from_dir(str(saved))
    renames = {
        "hf_new": (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                   ("vision_tower.", "model.vision_tower.vision_model."),
                   ("multi_modal_projector.", "model.multi_modal_projector.")),
        "hf_published": (("vision_tower.", "vision_tower.vision_model."),),
    }[layout]

    def rename(k):
        for a, b in renames:
            if k.startswith(a):
                return b + k[len(a):]
        return k

    keys = store.keys()
    assert any(k.startswith("language_model.model.") for k in keys), "transformers saved an unexpected layout"
    assert not any(k.startswith("vision_tower.vision_model.") for k in keys), "transformers saved an unexpected layout"
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file([(rename(k), np.asarray(store.get(k))) for k in part], str(other / fname))
        weight_map.update({rename(k): fname for k in part})
    (other / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (other / "config.json").write_text((saved / "config.json").read_text())
    a, b = load_pretrained(str(saved)), load_pretrained(str(other))
    rng = np.random.default_rng(seed)
    ids, mask = _batch(rng, n_img, [1])
    px = rng.standard_normal((1, 28, 28, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(a(ids, px, mask).logits), np.asarray(b(ids, px, mask).logits))
    _compare(hf, b, ids, mask, px)


def test_image_count_mismatch_is_a_clear_error(tmp_path):
    hf, n_img = make_llava(0)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    ids = np.array([[1, 5] + [IMAGE_TOKEN] * n_img + [7]])
    with pytest.raises(ValueError, match="1 image placeholder runs .* but 2 images"):
        ours(ids, np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(ValueError, match="not a multiple"):
        ours(ids[:, :-2], np.zeros((1, 28, 28, 3), np.float32))


def test_bfloat16_error_is_bounded(tmp_path):
    """bf16 parameters and compute stay close to float32: the error is measured and bounded."""
    seed = fresh_seed()
    hf, n_img = make_llava(seed)
    hf.save_pretrained(tmp_path)
    f32 = load_pretrained(str(tmp_path))
    bf16 = load_pretrained(str(tmp_path), dtype="bfloat16")
    rng = np.random.default_rng(seed)
    ids, mask = _batch(rng, n_img, [1, 1])
    px = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
    a = np.asarray(f32(ids, px, mask).logits)
    b = np.asarray(bf16(ids, px, mask).logits)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    print(f"bf16 vs f32 relative logit error: {rel:.3e}")
    assert b.dtype == np.float32 and rel < 3e-2, rel
