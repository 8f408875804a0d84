"""LLaVA-NeXT (anyres) against transformers' `LlavaNextForConditionalGeneration`: logits, layouts, batches.

Tiny random models (CLIP 28 px tiles of 2 x 2 features, so the v1.6 pinpoints scaled to 28 px), float32,
fresh seeds; pixel values are random tiles, so this checks the model's tiling, unpadding, newlines and
placement, not preprocessing (tests/test_data_image_anyres.py checks that against the image processor).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from llava_jax import load_pretrained
from llava_jax.config import ImageProcessorConfig
from llava_jax.convert import main as convert_main
from llava_jax.weights.safetensors_io import TensorStore, save_file
from tests._seeds import fresh_seed
from tests.test_convert_formats import hf_tensors, rename
from tests.hf_reference import IMAGE_TOKEN, NEXT_PINPOINTS, NEXT_TILE, make_next, random_ids, text_config_dict

TILE, PINPOINTS = NEXT_TILE, NEXT_PINPOINTS  # the v1.6 list in 28 px tiles
MAX_PATCHES = 5


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


def test_each_image_shape_matches_transformers(llama_next):
    """One row per shape class (square, wide, tall, smaller than a tile, odd sizes): one forward, one compile."""
    hf, ours, _ = llama_next
    rng = np.random.default_rng(fresh_seed())
    ids, mask, px, sizes = batch(rng, ours, [[size] for size in SIZES])
    want = hf_logits(hf, ids, px, sizes, mask)
    got = np.asarray(ours(ids, px, mask, image_sizes=sizes).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


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


def _next_source(tmp_path, tokenizer_dir, seed):
    """A llava-hf NeXT directory as transformers saves it, with a tokenizer and its image processor."""
    from transformers import LlavaNextImageProcessor

    hf = make_next(seed)
    src = tmp_path / "src"
    tensors = hf_tensors(hf, src)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.model"), src / "tokenizer.model")
    LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                            image_grid_pinpoints=PINPOINTS).save_pretrained(src)
    return hf, src, tensors


def test_convert_and_export_next_round_trip(tmp_path, tiny_spm_dir):
    """llava-hf NeXT -> ours -> HF: every tensor bit for bit, `llava_next` config, loads in transformers."""
    from transformers import LlavaNextForConditionalGeneration

    seed = fresh_seed()
    hf, src, tensors = _next_source(tmp_path, tiny_spm_dir, seed)
    ours, out = str(tmp_path / "ours"), str(tmp_path / "hf")
    assert convert_main(["--src", str(src), "--dst", ours]) == 0
    assert convert_main(["--src", ours, "--dst", out, "--to", "hf"]) == 0
    assert ImageProcessorConfig.from_pretrained(out).anyres_config(grid=2) == load_pretrained(ours).config.geometry
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "llava_next" and config["image_grid_pinpoints"] == PINPOINTS
    exported = TensorStore.from_dir(out)
    published = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
                 for k, v in tensors.items()}
    assert sorted(exported.keys()) == sorted(published)
    for k, v in published.items():
        np.testing.assert_array_equal(exported.get(k), v, err_msg=k)
    back, info = LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    rng = np.random.default_rng(seed)
    model = load_pretrained(ours)
    ids, mask, px, sizes = batch(rng, model, [[(30, 90)], [(100, 100)]])
    np.testing.assert_array_equal(hf_logits(back, ids, px, sizes, mask), hf_logits(hf, ids, px, sizes, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(ids, px, mask, image_sizes=sizes).logits)[real],
                               hf_logits(hf, ids, px, sizes, mask)[real], atol=1e-4, rtol=1e-4)


# LLaVA-NeXT's own checkpoint names (llava/model/llava_arch.py): the LLM's, plus these.
ORIGINAL_NAMES = [("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                  ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                  ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                  ("image_newline", "model.image_newline"),
                  ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("language_model.", "model."), ("lm_head.", "lm_head.")]


def write_original_dir(hf, tmp_path, shards=1, **mm_config):
    """`hf`'s tensors under LLaVA-NeXT's own names and a config.json of its text config plus `mm_config` (the
    original's mm_* fields): an original LLaVA-NeXT / OneVision / NeXT-Video directory; returns its path.
    `shards` > 1 writes model-0000i-of-0000n.safetensors files and their index, as lmms-lab publishes them."""
    tensors = rename(hf_tensors(hf, tmp_path / "hf"), ORIGINAL_NAMES)
    src = tmp_path / "orig"
    os.makedirs(src)
    if shards == 1:
        save_file(tensors.items(), str(src / "model.safetensors"))
    else:
        names, weight_map = sorted(tensors), {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file([(k, tensors[k]) for k in names[i::shards]], str(src / fname))
            weight_map.update(dict.fromkeys(names[i::shards], fname))
        json.dump({"metadata": {}, "weight_map": weight_map}, open(src / "model.safetensors.index.json", "w"))
    text = json.load(open(tmp_path / "hf" / "config.json"))["text_config"]
    json.dump({**text, **mm_config}, open(src / "config.json", "w"))
    return src


def test_original_next_checkpoint_matches_transformers(tmp_path):
    """An original LLaVA-NeXT directory (mm_* config, pinpoints as (width, height), embedded tower) converts to
    the transformers model's logits on non-square images; a square one tiles 2x1 as the original does."""
    seed = fresh_seed()
    hf = make_next(seed, vision_hidden=64, vision_heads=1)  # an embedded tower is read with CLIP's 64-wide heads
    src = write_original_dir(hf, tmp_path, model_type="llava_llama",
                             mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type="mlp2x_gelu",
                             mm_hidden_size=64, mm_vision_select_layer=-2,
                             mm_vision_select_feature="patch", image_aspect_ratio="anyres",
                             mm_patch_merge_type="spatial_unpad",
                             image_grid_pinpoints=PINPOINTS)  # the same JSON list as llava-hf, read as (width, height)
    dst = str(tmp_path / "ours")
    assert convert_main(["--src", str(src), "--dst", dst, "--image-token-index", str(IMAGE_TOKEN)]) == 0
    ours = load_pretrained(dst)
    assert ours.config.anyres.convention == "original"
    rng = np.random.default_rng(seed)
    ids, mask, px, sizes = batch(rng, ours, [[(30, 90), (61, 45)], [(90, 30)]])
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(ids, px, mask, image_sizes=sizes).logits)[real],
                               hf_logits(hf, ids, px, sizes, mask)[real], atol=1e-4, rtol=1e-4)
    square = ours.config.image_layout((28, 28))
    assert (square.rows, square.cols) == (2, 1)
    # The converted directory's processor tiles as the model does: the original's (width, height) pinpoints are
    # written as the (height, width) list transformers reads, in the same order (the same tie-breaks).
    pre = ImageProcessorConfig.from_pretrained(dst)
    assert pre.anyres_config(grid=2).resolutions() == ours.config.geometry.resolutions() and not pre.pad_to_square


def _family_text_config(family: str):
    """The issue's four LLaVA-NeXT backbones in tiny: Mistral (sliding window shorter than the rows),
    Qwen2 (q/k/v bias, tied embeddings), Llama-3 (llama3 rope) and Vicuna (plain Llama, MHA)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from tests.test_text_families import LLAMA3_ROPE

    if family == "mistral":
        return MistralConfig(**text_config_dict(kv_heads=2, theta=1e6), sliding_window=7)
    if family == "qwen2":
        return Qwen2Config(**text_config_dict(kv_heads=2, theta=1e6, tie=True), use_sliding_window=False)
    if family == "llama3":
        return LlamaConfig(**text_config_dict(kv_heads=2, theta=5e5, rope_scaling=LLAMA3_ROPE))
    return LlamaConfig(**text_config_dict())


@pytest.mark.parametrize("family", ["mistral", "qwen2", "llama3", "vicuna"])
def test_each_family_with_anyres_images_matches_transformers(tmp_path, family):
    """A wide and a square image in one row, a text-only row, a smaller-than-a-tile and a tall image in a third."""
    seed = fresh_seed()
    hf = make_next(seed, text_config=_family_text_config(family))
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    assert ours.config.text.model_type == ("llama" if family in ("llama3", "vicuna") else family)
    rng = np.random.default_rng(seed)
    ids, mask, px, sizes = batch(rng, ours, [[(30, 90), (100, 100)], [], [(20, 17), (90, 30)]], "left")
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(ids, px, mask, image_sizes=sizes).logits)[real],
                               hf_logits(hf, ids, px, sizes, mask)[real], atol=1e-4, rtol=1e-4)


def test_every_next_parameter_has_a_sharding_rule(llama_next):
    """`image_newline` (the one parameter NeXT adds) is covered by the rules table, replicated like a norm."""
    import jax
    from jax.sharding import Mesh

    from llava_jax.models.llava import abstract_params
    from llava_jax.parallel.rules import param_shardings

    cfg = llama_next[1].config
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = param_shardings(abstract_params(cfg, boxed=True), mesh)
    assert shardings["image_newline"].spec == jax.sharding.PartitionSpec(None)
