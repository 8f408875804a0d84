"""LLaVA-OneVision and LLaVA-NeXT-Video against transformers' `LlavaOnevisionForConditionalGeneration` and
`LlavaNextVideoForConditionalGeneration`: float32 logits of lone images of every shape class (anyres_max
downscaling included), several images in one prompt (untiled), videos, and rows mixing them; loading from a
saved llava-hf directory. Tiny random models on a Qwen2 decoder, fresh seeds; pixel values are random tiles,
so this checks the model's tiling, downscaling, pooling, newlines and placement, not preprocessing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_jax import anyres, load_pretrained
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, perturb_, text_config_dict, vision_config_dict

VIDEO_TOKEN = IMAGE_TOKEN - 1
TILE, GRID = 42, 3  # CLIP 42 px tiles of 3 x 3 features: bilinear video pooling 3 -> 2 a side
OV_PINPOINTS = [[a * TILE, b * TILE] for a in range(1, 4) for b in range(1, 4)]
MAX_PATCHES = 10  # base + 3 x 3 tiles


def random_ids(rng: np.random.Generator, length: int) -> np.ndarray:
    """Text token ids that avoid the image and video tokens and the pad id."""
    return rng.integers(3, VIDEO_TOKEN, size=length)


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(**text_config_dict(vocab=IMAGE_TOKEN + 1))


def make_onevision(seed: int, siglip: bool = False, siglip_hidden: int = 32, siglip_heads: int = 4):
    """A perturbed tiny `LlavaOnevisionForConditionalGeneration`: CLIP (strategy "default") or, as the real ones,
    SigLIP (layer -1, strategy "full"), Qwen2, anyres_max_2 so that images over two tiles' worth are downscaled."""
    from transformers import (CLIPVisionConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              SiglipVisionConfig)

    torch.manual_seed(seed)
    if siglip:
        vision = SiglipVisionConfig(hidden_size=siglip_hidden, intermediate_size=68, num_hidden_layers=3,
                                    num_attention_heads=siglip_heads,
                                    image_size=TILE, patch_size=14, vision_use_head=False)
        layer, strategy = -1, "full"
    else:
        vision, layer, strategy = CLIPVisionConfig(**vision_config_dict(image_size=TILE)), -2, "default"
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=qwen2_config(),
        image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN, image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_2", vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    return perturb_(LlavaOnevisionForConditionalGeneration(cfg), seed)


def make_next_video(seed: int):
    """A perturbed tiny `LlavaNextVideoForConditionalGeneration`: CLIP 56 px tiles of 4 x 4 features (2 x 2 pooled
    a frame), Qwen2."""
    from transformers import CLIPVisionConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**vision_config_dict(image_size=56)), text_config=qwen2_config(),
        image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]], vision_feature_layer=-2,
        vision_feature_select_strategy="default", spatial_pool_mode="average", spatial_pool_stride=2)
    return perturb_(LlavaNextVideoForConditionalGeneration(cfg), seed)


def hf_logits(model, ids, mask, pixels=None, sizes=None, videos=None, batch_num_images=None) -> np.ndarray:
    kw = dict(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long))
    if pixels is not None:
        kw.update(pixel_values=torch.as_tensor(pixels.transpose(0, 1, 4, 2, 3).copy()),
                  image_sizes=torch.as_tensor(sizes, dtype=torch.long))
    if videos is not None:
        kw["pixel_values_videos"] = torch.as_tensor(videos.transpose(0, 1, 4, 2, 3).copy())
    if batch_num_images is not None:
        kw["batch_num_images"] = torch.as_tensor(batch_num_images, dtype=torch.long)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def batch(rng, cfg, rows, tile, max_patches):
    """Rows of (text, media, text ...): each medium an image size (h, w) or a video's frame count (an int).
    Returns ids, mask, the images' random tiles (zero beyond each image's patches), sizes, videos, images per row."""
    ids_rows, sizes, frames, per_row = [], [], [], []
    g = cfg.geometry
    for i, media in enumerate(rows):
        n_images = sum(not isinstance(m, int) for m in media)
        per_row.append(n_images)
        ids = [1] + list(random_ids(rng, 2 + i))
        for m in media:
            if isinstance(m, int):
                ids += [VIDEO_TOKEN] * g.video_tokens(m)
                frames.append(m)
            else:
                lay = anyres.layout(g, m, anyres.tiled_images(g, n_images))
                ids += [IMAGE_TOKEN] * lay.num_tokens
                sizes.append((m, lay.num_patches))
            ids += list(random_ids(rng, 2))
        ids_rows.append(ids)
    width = max(map(len, ids_rows))
    input_ids = np.zeros((len(ids_rows), width), np.int64)
    mask = np.zeros_like(input_ids)
    for b, r in enumerate(ids_rows):
        input_ids[b, :len(r)], mask[b, :len(r)] = r, 1
    pixels = None
    if sizes:
        pixels = rng.standard_normal((len(sizes), max_patches, tile, tile, 3)).astype(np.float32)
        for j, (_, patches) in enumerate(sizes):
            pixels[j, patches:] = 0
    videos = None
    if frames:
        assert len(set(frames)) == 1, "transformers stacks videos: one frame count a batch"
        videos = rng.standard_normal((len(frames), frames[0], tile, tile, 3)).astype(np.float32)
    image_sizes = np.array([s for s, _ in sizes], np.int64).reshape(-1, 2)
    return input_ids, mask, pixels, image_sizes, videos, np.array(per_row, np.int64)


def compare(hf, ours, rows, tile, max_patches, seed, atol=1e-4):
    rng = np.random.default_rng(seed)
    ids, mask, px, sizes, videos, per_row = batch(rng, ours.config, rows, tile, max_patches)
    want = hf_logits(hf, ids, mask, px, sizes if px is not None else None, videos, per_row)
    got = np.asarray(ours(ids, px, mask, image_sizes=sizes if px is not None else None, pixel_values_videos=videos,
                          batch_num_images=per_row).logits)
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=atol, rtol=1e-4, err_msg=f"seed {seed}, rows {rows}")


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    seed = fresh_seed()
    hf = make_onevision(seed)
    path = tmp_path_factory.mktemp("onevision")
    hf.save_pretrained(path)
    return hf, load_pretrained(str(path))


# (height, width): square, wide, tall, smaller than a tile, and large ones that anyres_max_2 downscales.
SIZES = [(42, 42), (40, 130), (130, 40), (20, 17), (126, 126), (100, 120), (61, 45)]


def test_onevision_images_match_transformers(onevision):
    """One row per lone image of each shape class (downscaled or not), one forward."""
    hf, ours = onevision
    g = ours.config.geometry
    assert (g.max_tiles, g.untiled_multi, g.video) == (2, True, "bilinear")
    assert any(ours.config.image_layout(s).token_rows != ours.config.image_layout(s).feature_rows for s in SIZES)
    compare(hf, ours, [[s] for s in SIZES], TILE, MAX_PATCHES, fresh_seed())


def test_onevision_many_images_videos_and_mixed_rows(onevision):
    """Three images in one prompt (untiled), a 4-frame video, a row with an image and a video, a text-only row."""
    hf, ours = onevision
    rows = [[(50, 60), (120, 40), (42, 42)], [4], [(90, 30), 4], []]
    compare(hf, ours, rows, TILE, MAX_PATCHES, fresh_seed())


def test_next_video_matches_transformers(tmp_path):
    """NeXT-Video: a video (frames average-pooled before the projector) and an anyres image, loaded from disk."""
    seed = fresh_seed()
    hf = make_next_video(seed)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    assert (ours.config.geometry.video, ours.config.geometry.video_grid) == ("average", 2)
    compare(hf, ours, [[3], [(70, 100)], [(50, 50), 3]], 56, 5, seed)


def test_placeholders_must_match_media(onevision):
    """A prompt whose video placeholders do not match the videos given fails naming what was given."""
    _, ours = onevision
    ids = np.array([[1, 5] + [VIDEO_TOKEN] * 5 + [6]])
    with pytest.raises(ValueError, match="row 0 of input_ids holds 5 video tokens"):
        ours(ids, pixel_values_videos=np.zeros((1, 2, TILE, TILE, 3), np.float32))
    with pytest.raises(ValueError, match="video tokens but 0 videos were given"):
        ours(ids)


@pytest.mark.parametrize("family", ["onevision", "next_video"])
def test_convert_and_export_round_trip(tmp_path, tiny_spm_dir, family):
    """llava-hf OneVision / NeXT-Video -> ours -> HF: every tensor bit for bit, the family's config (anyres_max,
    pooling, video token), loads in transformers with nothing missing, and gives the source's logits."""
    import json
    import os
    import shutil

    from llava_jax.convert import main as convert_main
    from llava_jax.weights.safetensors_io import TensorStore
    from tests.test_convert_formats import hf_tensors

    seed = fresh_seed()
    hf = make_onevision(seed) if family == "onevision" else make_next_video(seed)
    src = tmp_path / "src"
    tensors = hf_tensors(hf, src)
    shutil.copy(os.path.join(tiny_spm_dir, "tokenizer.model"), src / "tokenizer.model")
    ours, out = str(tmp_path / "ours"), str(tmp_path / "hf")
    assert convert_main(["--src", str(src), "--dst", ours]) == 0
    assert convert_main(["--src", ours, "--dst", out, "--to", "hf"]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    source = json.load(open(src / "config.json"))
    for key in ("model_type", "image_grid_pinpoints", "video_token_index", "image_token_index",
                "vision_aspect_ratio", "spatial_pool_mode", "spatial_pool_stride"):
        assert config.get(key) == source.get(key), key
    exported = TensorStore.from_dir(out)
    published = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
                 for k, v in tensors.items()}
    assert sorted(exported.keys()) == sorted(published)
    for k, v in published.items():
        np.testing.assert_array_equal(exported.get(k), v, err_msg=k)
    back, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    rows = [[(100, 120)], [3, (50, 50)]] if family == "onevision" else [[(70, 100)], [3]]
    tile, patches = (TILE, MAX_PATCHES) if family == "onevision" else (56, 5)
    rng = np.random.default_rng(seed)
    ids, mask, px, sizes, videos, per_row = batch(rng, load_pretrained(ours).config, rows, tile, patches)
    np.testing.assert_array_equal(hf_logits(back, ids, mask, px, sizes, videos, per_row),
                                  hf_logits(hf, ids, mask, px, sizes, videos, per_row))


def test_engine_greedy_ids_equal_transformers_generate(onevision):
    """The engine's greedy answers to a lone (downscaled) image and to two images with a video, batched, equal
    transformers' `generate` on each prompt alone."""
    from llava_jax.inference.engine import Engine, Prompt
    from llava_jax.inference.sampling import SamplingParams

    hf, ours = onevision
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    engine = Engine(ours, None)
    prompts, want = [], []
    for rows in ([[(126, 126)]], [[(50, 60), 3, (120, 40)]]):
        ids, mask, px, sizes, videos, per_row = batch(rng, ours.config, rows, TILE, MAX_PATCHES)
        kw = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                  pixel_values=torch.as_tensor(px.transpose(0, 1, 4, 2, 3).copy()),
                  image_sizes=torch.as_tensor(sizes), batch_num_images=torch.as_tensor(per_row))
        if videos is not None:
            kw["pixel_values_videos"] = torch.as_tensor(videos.transpose(0, 1, 4, 2, 3).copy())
        with torch.no_grad():
            out = hf.generate(**kw, max_new_tokens=5, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
        want.append(out[0, ids.shape[1]:].tolist())
        prompts.append(Prompt(ids[0].astype(np.int32), px, None, sizes,
                              videos=None if videos is None else list(videos)))
    got = engine.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert [c.token_ids for c in got] == want, f"seed {seed}"


@pytest.fixture(scope="module")
def siglip_onevision(tmp_path_factory):
    seed = fresh_seed()
    hf = make_onevision(seed, siglip=True)
    path = tmp_path_factory.mktemp("onevision-siglip")
    hf.save_pretrained(path)
    return hf, load_pretrained(str(path)), path


def test_siglip_onevision_matches_transformers(siglip_onevision):
    """The real OneVision layout (a SigLIP tower, every patch token): lone images of each shape class, three images
    in one prompt, a 4-frame video."""
    hf, ours, _ = siglip_onevision
    assert (ours.config.vision.model_type, ours.config.geometry.extra_tokens) == ("siglip_vision_model", 0)
    compare(hf, ours, [[s] for s in SIZES[:5]], TILE, MAX_PATCHES, fresh_seed())
    compare(hf, ours, [[(50, 60), (120, 40), (42, 42)], [4]], TILE, MAX_PATCHES, fresh_seed())


def test_original_onevision_checkpoint_matches_transformers(tmp_path):
    """An original LLaVA-OneVision directory (llava_qwen, mm_* config, anyres_max_N, SigLIP inside) converts to the
    transformers model's logits: lone non-square images, several images, a video (its placeholder the id after
    <image>'s)."""
    from llava_jax.convert import main as convert_main
    from tests.test_model_next import write_original_dir

    hf = make_onevision(fresh_seed(), siglip=True, siglip_hidden=72, siglip_heads=1)  # SO400M's 72-wide heads
    src = write_original_dir(hf, tmp_path, model_type="llava_qwen",
                             mm_vision_tower="google/siglip-so400m-patch14-384", mm_projector_type="mlp2x_gelu",
                             mm_hidden_size=72, mm_vision_select_layer=-2,
                             mm_vision_select_feature="patch", image_aspect_ratio="anyres_max_2",
                             mm_patch_merge_type="spatial_unpad", mm_spatial_pool_mode="bilinear",
                             mm_newline_position="one_token", image_grid_pinpoints=OV_PINPOINTS)
    dst = str(tmp_path / "ours")
    assert convert_main(["--src", str(src), "--dst", dst, "--image-token-index", str(IMAGE_TOKEN)]) == 0
    ours = load_pretrained(dst)
    g = ours.config.geometry
    assert (g.convention, g.max_tiles, g.untiled_multi, g.video) == ("original", 2, True, "bilinear")
    assert (ours.config.video_token_index, ours.config.vision_feature_select_strategy) == (VIDEO_TOKEN + 2, "full")
    from llava_jax.models.llava import LlavaModel

    ours = LlavaModel(ours.config.replace(video_token_index=VIDEO_TOKEN), ours.params)  # transformers' video id
    compare(hf, ours, [[(40, 130)], [(130, 40)], [(100, 120)], [(50, 60), (120, 40)], [3]], TILE, MAX_PATCHES,
            fresh_seed())
