"""anyres.py's LLaVA-OneVision rules against transformers (float32): `anyres_max_9` token counts and the weighted
table index against `LlavaOnevisionModel.pack_image_features`, untiled multi-image counts, and video frames pooled
as `apply_pooling` pools them; NeXT-Video's counts. Fresh random image sizes; a failure prints its seed."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from llava_jax import anyres
from llava_jax.anyres import AnyresConfig, layout, parse_pinpoints, table_sources
from tests._seeds import fresh_seed
from tests.test_anyres import random_sizes

tf_ov = pytest.importorskip("transformers.models.llava_onevision.modeling_llava_onevision")

# LLaVA-OneVision's geometry: SigLIP 384 / 14 = 27 a side, (1x1)..(6x6) tiles, anyres_max_9, bilinear video.
OV9 = AnyresConfig(tile_size=384, grid=27, pinpoints=parse_pinpoints("(1x1),...,(6x6)", 384), max_tiles=9,
                   untiled_multi=True, video="bilinear")
# A small geometry with the same rules, where downscaling and unpadding both happen often.
SMALL = AnyresConfig(tile_size=28, grid=4, pinpoints=parse_pinpoints("(1x1),...,(4x4)", 28), max_tiles=2,
                     untiled_multi=True, video="bilinear")


def hf_processor(cfg: AnyresConfig):
    """`LlavaOnevisionProcessor` without a hub download: the counting needs only these attributes."""
    from transformers import LlavaOnevisionProcessor

    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor = types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in cfg.resolutions()])
    proc.num_image_tokens = cfg.grid ** 2
    proc.vision_aspect_ratio = f"anyres_max_{cfg.max_tiles}"
    proc.vision_feature_select_strategy = "full"
    proc.video_token = "<v>"
    return proc


def hf_model(cfg: AnyresConfig):
    """`LlavaOnevisionModel` with only the config its packing and pooling read."""
    model = object.__new__(tf_ov.LlavaOnevisionModel)
    vision = types.SimpleNamespace(image_size=cfg.tile_size, patch_size=cfg.tile_size // cfg.grid)
    model.__dict__["config"] = types.SimpleNamespace(vision_config=vision,
                                                     image_grid_pinpoints=[list(p) for p in cfg.resolutions()])
    return model


def weighted(table: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """What the model computes from a table index: sum_k weights[:, k] * table[rows[:, k]]."""
    return np.einsum("nkd,nk->nd", table[rows], weights)


@pytest.mark.parametrize("cfg", [OV9, SMALL], ids=["onevision", "small"])
def test_counts_match_processor(cfg):
    """Token counts of lone (tiled, downscaled when over max_tiles) images equal the processor's; an image sharing
    its prompt is its base and a newline; a video is frames x ceil(grid/2)^2 and one newline."""
    seed = fresh_seed()
    proc = hf_processor(cfg)
    sizes = random_sizes(np.random.default_rng(seed), 300) + [(cfg.tile_size * 6, cfg.tile_size * 6), (1, 1)]
    for size in sizes:
        want = proc._get_number_of_features(size[0], size[1], cfg.tile_size, cfg.tile_size)
        assert layout(cfg, size).num_tokens == want, f"seed {seed}, size {size}"
        assert layout(cfg, size).num_tokens <= cfg.max_tokens, f"seed {seed}, size {size}"
    assert layout(cfg, (50, 70), tiled=False).num_tokens == cfg.grid ** 2 + 1
    assert anyres.tiled_images(cfg, 1) and not anyres.tiled_images(cfg, 2)
    video_tokens = proc.replace_video_token({"pixel_values_videos": [np.zeros((4, 1))]}, 0).count("<v>")
    assert cfg.video_tokens(4) == video_tokens == 4 * math.ceil(cfg.grid / 2) ** 2 + 1


def test_max_tokens_is_the_most_any_size_takes():
    """`max_tokens` bounds every image (downscaling is not monotone: a grid just under the threshold keeps all)."""
    seed = fresh_seed()
    sizes = random_sizes(np.random.default_rng(seed), 2000)
    most = max(layout(SMALL, s).num_tokens for s in sizes)
    assert most <= SMALL.max_tokens, f"seed {seed}"
    grids = [(h, w) for h in range(1, 17) for w in range(1, 17)]
    assert SMALL.max_tokens == SMALL.tile_tokens + max(r * (c + 1) for r, c in (anyres._downscaled(SMALL, *g)
                                                                                for g in grids if 16 in g))


@pytest.mark.parametrize("cfg", [OV9, SMALL], ids=["onevision", "small"])
def test_table_sources_match_pack_image_features(cfg):
    """The weighted table index over random projected features equals transformers' packing, image by image
    (anyres_max downscaling included), and images sharing a prompt are their base tile plus the newline."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model, dim = hf_model(cfg), 3
    newline = rng.standard_normal(dim).astype(np.float32)
    # Random sizes, and one large enough to be downscaled whatever the draw (some seeds' 25 draw none).
    sizes = random_sizes(rng, 25 if cfg is OV9 else 120) + [(6 * cfg.tile_size, 6 * cfg.tile_size)]
    downscaled = 0
    for size in sizes:
        lay = layout(cfg, size)
        downscaled += (lay.token_rows, lay.token_cols) != (lay.feature_rows, lay.feature_cols)
        feats = rng.standard_normal((lay.num_patches, cfg.tile_tokens, dim)).astype(np.float32)
        (want,), _ = model.pack_image_features([torch.from_numpy(feats)], torch.tensor([size]),
                                               torch.from_numpy(newline), f"anyres_max_{cfg.max_tiles}")
        rows, weights = table_sources(cfg, [size], lay.num_patches)
        table = np.concatenate([feats.reshape(-1, dim), newline[None]])
        np.testing.assert_allclose(weighted(table, rows, weights), want.numpy(), atol=1e-5,
                                   err_msg=f"seed {seed}, size {size}")
    assert downscaled, f"seed {seed}: no image was downscaled"
    # Two images in one prompt: each its base and a newline, in slot order.
    feats = rng.standard_normal((2, cfg.tile_tokens, dim)).astype(np.float32)
    rows, weights = table_sources(cfg, [(40, 90), (500, 20)], 3)
    table = np.concatenate([feats.reshape(-1, dim), np.zeros((cfg.tile_tokens, dim)), newline[None]])
    want = np.concatenate([feats[0], newline[None], feats[1], newline[None]])
    np.testing.assert_allclose(weighted(table, rows, weights), want, atol=0)


def test_video_rows_match_apply_pooling():
    """A video's tokens: each frame's grid bilinearly pooled as `apply_pooling`, then one newline; frames sit after
    the row's images in the table."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    dim, frames = 3, 3
    model = hf_model(OV9)
    video = rng.standard_normal((frames, OV9.tile_tokens, dim)).astype(np.float32)
    pooled = model.apply_pooling(torch.from_numpy(video)).reshape(-1, dim).numpy()
    newline = rng.standard_normal(dim).astype(np.float32)
    image = rng.standard_normal((1, OV9.tile_tokens, dim)).astype(np.float32)
    slots = 1 + frames + 2  # one image, the video, two unused slots
    rows, weights = table_sources(OV9, [(300, 300)], slots, tiled=False, videos=[frames])
    table = np.concatenate([image.reshape(-1, dim), video.reshape(-1, dim),
                            np.zeros((2 * OV9.tile_tokens, dim)), newline[None]])
    got = weighted(table, rows, weights)
    n_image = OV9.tile_tokens + 1
    assert len(got) == n_image + OV9.video_tokens(frames)
    np.testing.assert_allclose(got[n_image:-1], pooled, atol=1e-5, err_msg=f"seed {seed}")
    np.testing.assert_allclose(got[-1], newline, atol=0)


def test_next_video_geometry():
    """NeXT-Video: frames average-pooled before the projector to grid // stride a side, no newline; each frame's
    pooled features sit in their own region of the table, after the tiles."""
    from transformers import LlavaNextVideoConfig

    cfg = anyres.from_hf_config(LlavaNextVideoConfig().to_dict(), 336, 24)
    assert (cfg.video, cfg.video_grid, cfg.video_tokens(32)) == ("average", 12, 32 * 144)
    assert cfg.table_rows(5) == 5 * 576 + 5 * 144 + 1
    rows, weights = table_sources(cfg, [], 5, videos=[2])
    assert rows[:, 0].tolist() == list(range(5 * 576, 5 * 576 + 2 * 144)) and np.all(weights[:, 0] == 1)
    with pytest.raises(ValueError, match="spatial_pool_mode 'max' is not supported"):
        anyres.from_hf_config(dict(LlavaNextVideoConfig().to_dict(), spatial_pool_mode="max"), 336, 24)
    with pytest.raises(ValueError, match="takes no video"):
        table_sources(AnyresConfig(), [], 4, videos=[2])
