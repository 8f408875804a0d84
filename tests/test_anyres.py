"""anyres.py against transformers' LLaVA-NeXT (float32): best resolution, tile grid, patch and token
counts, and the gather index against `LlavaNextModel.pack_image_features`, on fresh random image sizes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from llava_jax import anyres
from llava_jax.anyres import V16_PINPOINTS, AnyresConfig, gather_index, layout, parse_pinpoints
from tests._seeds import fresh_seed

tf_next = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")

V16 = AnyresConfig()
# LLaVA-OneVision's geometry (SigLIP 384 / 14 = 27 a side, pinpoints (1x1)..(6x6) tiles), without anyres_max_9.
OV = AnyresConfig(tile_size=384, grid=27, pinpoints=parse_pinpoints("(1x1),...,(6x6)", 384))


def random_sizes(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """Image sizes (height, width) from 1 px to ~3000 px a side, aspect ratios up to ~1:20, squares included."""
    sizes = []
    for _ in range(n):
        h = int(np.exp(rng.uniform(0, np.log(3000))))
        w = h if rng.random() < 0.15 else int(np.clip(h * np.exp(rng.uniform(-3, 3)), 1, 4000))
        sizes.append((max(h, 1), max(w, 1)))
    return sizes


def hf_pinpoints(cfg: AnyresConfig) -> list[list[int]]:
    """The pinpoints as transformers reads them: (height, width) lists."""
    return [list(p) for p in cfg.resolutions()]


def hf_token_count(cfg: AnyresConfig, size: tuple[int, int]) -> int:
    """`LlavaNextProcessor._get_number_of_features` without a hub download: the processor needs only these
    attributes (num_additional_image_tokens 0: the CLS is already dropped, as with strategy "default")."""
    from transformers import LlavaNextProcessor

    proc = object.__new__(LlavaNextProcessor)
    proc.image_processor = type("ImageProcessor", (), {"image_grid_pinpoints": hf_pinpoints(cfg)})()
    proc.patch_size = cfg.tile_size // cfg.grid
    proc.num_additional_image_tokens = 0
    return proc._get_number_of_features(size[0], size[1], cfg.tile_size, cfg.tile_size)


@pytest.mark.parametrize("cfg", [V16, OV], ids=["v16", "onevision"])
def test_counts_match_transformers(cfg):
    """Best resolution, grid shape, patch count, token count and the resize and paste of the image on its canvas
    equal transformers' for random sizes."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pins = hf_pinpoints(cfg)
    processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pins)
    for size in random_sizes(np.random.default_rng(fresh_seed()), 300):
        lay = layout(cfg, size)
        assert lay.resolution == tuple(select_best_resolution(size, pins)), size
        assert anyres.select_best_resolution(size, pins) == lay.resolution, size
        assert (lay.rows, lay.cols) == tf_next.get_anyres_image_grid_shape(size, pins, cfg.tile_size), size
        assert lay.num_patches == tf_next.image_size_to_num_patches(size, pins, cfg.tile_size), size
        assert lay.num_tokens == hf_token_count(cfg, size), size
        image = np.broadcast_to(np.zeros((3, 1, 1), np.uint8), (3, *size))  # [C, H, W]: only its shape is read
        resized = get_patch_output_size(image, lay.resolution, ChannelDimension.FIRST)
        assert lay.resized == resized, size
        assert lay.offset == tuple(p[0] for p in processor._get_padding_size(resized, lay.resolution)), size
        assert lay.num_patches <= cfg.max_patches and lay.num_tokens <= cfg.max_tokens, size


def test_reference_token_counts():
    """LLAVA_REFERENCE.md's counts for the v1.6 checkpoints (CLIP-336, their five pinpoints)."""
    expected = {(336, 336): 1176, (480, 640): 2340, (899, 1024): 2634, (720, 1280): 1948,
                (672, 672): 2928, (1000, 1000): 2928, (2048, 2048): 2928}
    assert {s: layout(V16, s).num_tokens for s in expected} == expected
    assert V16.max_tokens == 2928 and V16.max_patches == 5
    assert layout(V16, (480, 640)).num_patches == 5 and layout(V16, (300, 1000)).num_patches == 4


def test_flat_is_llava15():
    """merge "flat": one tile, 576 tokens (577 with the CLS kept) in order, whatever the image size."""
    for extra in (0, 1):
        cfg = AnyresConfig.flat(extra_tokens=extra)
        for size in [(336, 336), (10, 2000), (1500, 20)]:
            lay = layout(cfg, size)
            assert (lay.num_patches, lay.num_tokens) == (1, 576 + extra)
            np.testing.assert_array_equal(gather_index(cfg, size), np.arange(576 + extra))
        assert (cfg.max_patches, cfg.max_tokens) == (1, 576 + extra)


@pytest.fixture(scope="module")
def hf_models():
    """Tiny LlavaNextModels (random weights; only their configs matter to pack_image_features) per geometry."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    def build(cfg: AnyresConfig, pins: list[list[int]]):
        vision = CLIPVisionConfig(image_size=cfg.tile_size, patch_size=cfg.tile_size // cfg.grid, hidden_size=8,
                                  intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
        text = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=64)
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pins,
                                 image_token_index=63)
        return tf_next.LlavaNextModel(config).eval()

    return {"v16": (V16, build(V16, hf_pinpoints(V16))), "onevision": (OV, build(OV, hf_pinpoints(OV)))}


def pack_and_gather(model, cfg: AnyresConfig, sizes, rng: np.random.Generator, padded: bool):
    """(transformers' packed features, ours from the gather) for each size, on random float32 features."""
    dim = 5
    newline = rng.standard_normal(dim).astype(np.float32)
    feats = [rng.standard_normal((layout(cfg, s).num_patches, cfg.tile_tokens, dim)).astype(np.float32)
             for s in sizes]
    with torch.no_grad():
        packed, lens = model.pack_image_features([torch.from_numpy(f) for f in feats], torch.tensor(sizes),
                                                 "default", torch.from_numpy(newline))
    ours = []
    for f, s in zip(feats, sizes):
        if padded:  # static shapes: every image's patches padded to max_patches (junk in the padding)
            junk = rng.standard_normal((cfg.max_patches - len(f), *f.shape[1:])).astype(np.float32)
            f = np.concatenate([f, junk])
        table = np.concatenate([f.reshape(-1, dim), newline[None]])
        ours.append(table[gather_index(cfg, s, table_patches=len(f) if padded else None)])
    assert [len(o) for o in ours] == lens.tolist()
    return [p.numpy() for p in packed], ours


@pytest.mark.parametrize("geometry", ["v16", "onevision"])
@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_gather_equals_pack_image_features(hf_models, geometry, padded):
    """table[gather_index] == transformers' pack (base, unpadded tile rows each + newline) for square, wide,
    tall, smaller-than-a-tile, exactly-a-pinpoint and random sizes."""
    cfg, model = hf_models[geometry]
    t = cfg.tile_size
    sizes = [(t, t), (2 * t, 2 * t), (t, 2 * t), (2 * t, t), (100, 100), (50, 300), (300, 50), (17, 23),
             (480, 640), (899, 1024), (720, 1280), (3000, 200)]
    sizes += random_sizes(np.random.default_rng(fresh_seed()), 12)
    packed, ours = pack_and_gather(model, cfg, sizes, np.random.default_rng(fresh_seed()), padded)
    for size, p, o in zip(sizes, packed, ours):
        np.testing.assert_array_equal(o, p, err_msg=f"image size {size}")


def original_unpad_image(tensor, original_size):
    """LLaVA-NeXT's llava_arch.unpad_image (reference, image size taken as (H, W) like transformers' call):
    it truncates the scaled side where transformers rounds to 7 digits first."""
    original_height, original_width = [int(v) for v in original_size]
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding: current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding: current_width - padding]


def test_original_convention(monkeypatch):
    """convention="original" reads pinpoints as (width, height) and truncates in unpad, as LLaVA-NeXT does:
    equal to transformers' pack given the (height, width)-transposed list and the original's unpad_image."""
    original = AnyresConfig(convention="original")
    # A square up to one tile ties between 336x672 and 672x336: the first in the list wins, read either way.
    assert (layout(V16, (300, 300)).rows, layout(V16, (300, 300)).cols) == (1, 2)
    assert (layout(original, (300, 300)).rows, layout(original, (300, 300)).cols) == (2, 1)
    assert layout(original, (300, 300)).num_tokens == layout(V16, (300, 300)).num_tokens == 1176
    assert not np.array_equal(gather_index(original, (336, 336)), gather_index(V16, (336, 336)))
    # Truncation vs rounding: 55 * (48 / 176) = 14.999999999999998 -> 14 (original) or 15 (transformers), so
    # 5 padding rows are dropped top and bottom instead of 4 (36 of the sizes up to 1199 x 1199 differ so).
    wide = layout(AnyresConfig(pinpoints=((336, 672),)), (55, 176))
    wide_original = layout(AnyresConfig(pinpoints=((672, 336),), convention="original"), (55, 176))
    assert wide.resolution == wide_original.resolution == (336, 672)
    assert (wide.feature_rows, wide.num_tokens, wide_original.feature_rows, wide_original.num_tokens) == (
        16, 1360, 14, 1262)

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    pins = [list(p) for p in original.resolutions()]  # [[672, 336], [336, 672], ...]: (w, h) read as (h, w)
    assert pins[0] == [672, 336]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=64),
        image_grid_pinpoints=pins, image_token_index=63)
    model = tf_next.LlavaNextModel(config).eval()
    monkeypatch.setattr(tf_next, "unpad_image", original_unpad_image)
    sizes = [(300, 300), (336, 336), (55, 176), (176, 55), (110, 352), (480, 640)]
    sizes += random_sizes(np.random.default_rng(fresh_seed()), 12)
    packed, ours = pack_and_gather(model, original, sizes, np.random.default_rng(fresh_seed()), padded=False)
    for size, p, o in zip(sizes, packed, ours):
        np.testing.assert_array_equal(o, p, err_msg=f"image size {size}")


def test_parse_pinpoints():
    """The config forms: lists, their string form, explicit tile counts and the "(1x1),...,(6x6)" range."""
    ov = parse_pinpoints("(1x1),...,(6x6)", 384)
    assert len(ov) == 36 and ov[:3] == ((384, 384), (384, 768), (384, 1152)) and ov[-1] == (2304, 2304)
    assert parse_pinpoints("(1x2), (2x1)", 336) == ((336, 672), (672, 336))
    assert parse_pinpoints("(2x1),...,(3x2)", 336) == ((672, 336), (672, 672), (1008, 336), (1008, 672))
    assert parse_pinpoints("[[336, 672], [672, 336]]", 336) == ((336, 672), (672, 336))
    assert parse_pinpoints([[336, 672], [672, 672]], 336) == ((336, 672), (672, 672))
    assert parse_pinpoints(str([list(p) for p in V16_PINPOINTS]), 336) == V16_PINPOINTS
    for bad in ["(1x1),(2y2)", "anyres_max_9", "[[336, 672], [672]]", "1x2"]:
        with pytest.raises(ValueError, match="image_grid_pinpoints"):
            parse_pinpoints(bad, 336)


@pytest.mark.parametrize("kwargs, message", [
    (dict(merge="anyres_max_9"), "merge 'anyres_max_9' is not supported"),
    (dict(convention="hw"), "convention 'hw'"),
    (dict(pinpoints=((336, 500),)), r"\[\(336, 500\)\] are not positive multiples of tile_size 336"),
    (dict(pinpoints=()), "at least one grid pinpoint"),
    (dict(extra_tokens=1), "CLS token must be dropped"),
    (dict(grid=0), "must be positive"),
])
def test_bad_config(kwargs, message):
    """A bad geometry fails at construction with one line naming the field."""
    with pytest.raises(ValueError, match=message):
        AnyresConfig(**kwargs)


def test_bad_sizes():
    """Non-positive image sizes and a padded table smaller than the image's patches are refused."""
    with pytest.raises(ValueError, match=r"must be positive, got \(0, 10\)"):
        layout(V16, (0, 10))
    with pytest.raises(ValueError, match="table of 3 patches cannot hold image"):
        gather_index(V16, (480, 640), table_patches=3)


def test_imports_no_jax():
    """The data layer (Grain workers) imports this module: it must not pull in jax, flax or torch."""
    code = "import sys, llava_jax.anyres; print(sorted({'jax', 'flax', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)})
    assert out.stdout.strip() == "[]"


def test_from_hf_config():
    """transformers' configs: llava is flat, llava_next tiles by its pinpoints, llava_onevision adds anyres_max_9;
    the rest fail naming the file."""
    from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig

    assert anyres.from_hf_config(LlavaNextConfig().to_dict(), 336, 24) == V16
    wide = dict(LlavaNextConfig().to_dict(), image_grid_pinpoints=[[336, 1344], [1344, 336]])
    assert anyres.from_hf_config(wide, 336, 24).pinpoints == ((336, 1344), (1344, 336))
    assert anyres.from_hf_config(LlavaConfig().to_dict(), 336, 24, 1) == AnyresConfig.flat(extra_tokens=1)
    with pytest.raises(ValueError, match="^x/config.json: anyres merge 'spatial_unpad' needs a tile of exactly"):
        anyres.from_hf_config(LlavaNextConfig().to_dict(), 336, 24, 1, source="x/config.json")
    with pytest.raises(ValueError, match="^config.json: image_grid_pinpoints '1x2'"):
        anyres.from_hf_config(dict(LlavaNextConfig().to_dict(), image_grid_pinpoints="1x2"), 336, 24)
    ov = anyres.from_hf_config(LlavaOnevisionConfig().to_dict(), 384, 27)
    assert (ov.pinpoints, ov.max_tiles, ov.untiled_multi, ov.video) == (OV.pinpoints, 9, True, "bilinear")
    with pytest.raises(ValueError, match="^config.json: vision_aspect_ratio 'pad' is not supported"):
        anyres.from_hf_config(dict(LlavaOnevisionConfig().to_dict(), vision_aspect_ratio="pad"), 384, 27)
    with pytest.raises(ValueError, match="^config.json: model_type 'clip' has no image geometry"):
        anyres.from_hf_config({"model_type": "clip"}, 336, 24)
