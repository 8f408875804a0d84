"""An original LLaVA-NeXT-Video directory (lmms-lab/LLaVA-NeXT-Video-7B / -7B-DPO / -34B as LLaVA-VL/LLaVA-NeXT
released them: `llava_llama`, `mm_resampler_type: spatial_pool` averaging each frame's vision features, anyres
images, the CLIP tower inside, sharded safetensors) converts to transformers' `LlavaNextVideoForConditionalGeneration`
logits on the same weights; unsupported resampler settings fail as one line naming config.json and the key.

A tiny random model on a Llama decoder (Vicuna's and Yi's architecture), float32, fresh seeds; pixel values are
random tiles, so this checks the mapping, the geometry read off the config and the placement, not preprocessing.
"""

from __future__ import annotations

import pytest
import torch

from llava_jax import load_pretrained
from llava_jax.config import CLIP_MEAN, SIGLIP_MEAN, ImageProcessorConfig, VideoProcessorConfig
from llava_jax.convert import main as convert_main
from llava_jax.models.llava import LlavaModel
from llava_jax.weights.safetensors_io import CheckpointError
from tests._seeds import fresh_seed
from tests.hf_reference import IMAGE_TOKEN, perturb_, text_config_dict, vision_config_dict
from tests.test_convert_errors import fails
from tests.test_model_next import write_original_dir
from tests.test_model_onevision import VIDEO_TOKEN, compare

# CLIP 84 px tiles of 6 x 6 features; stride 3 (not the default 2, so that the config's stride is what is read)
# pools a frame to 2 x 2. 64-wide heads: an embedded tower is read with CLIP's head width.
TILE, STRIDE, MAX_PATCHES = 84, 3, 5
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]


def make_llama_next_video(seed: int):
    """A perturbed tiny `LlavaNextVideoForConditionalGeneration` on a Llama, average pooling with stride 3."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration)

    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**vision_config_dict(image_size=TILE, hidden=64, heads=1)),
        text_config=LlamaConfig(**text_config_dict()), image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        spatial_pool_mode="average", spatial_pool_stride=STRIDE)
    return perturb_(LlavaNextVideoForConditionalGeneration(cfg), seed)


def original_config(**changes) -> dict:
    """The mm_* fields of lmms-lab/LLaVA-NeXT-Video-7B's config.json, sized to the tiny model."""
    return dict(dict(
        model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type="mlp2x_gelu", mm_hidden_size=64,
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=PINPOINTS,  # read as (width, height)
        mm_resampler_type="spatial_pool", mm_spatial_pool_mode="average", mm_spatial_pool_stride=STRIDE,
        mm_spatial_pool_out_channels=64, mm_use_im_start_end=False), **changes)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers model, its original directory (two shards), ours converted from that, the seed)."""
    seed = fresh_seed()
    hf = make_llama_next_video(seed)
    root = tmp_path_factory.mktemp("original-next-video")
    src = write_original_dir(hf, root, shards=2, **original_config())
    dst = str(root / "ours")
    assert convert_main(["--src", str(src), "--dst", dst, "--image-token-index", str(IMAGE_TOKEN)]) == 0
    return hf, src, dst, seed


@pytest.mark.slow(seconds=12)  # the module's conversion included
def test_original_next_video_checkpoint_matches_transformers(converted):
    """Converted, a video's frames are average-pooled with the config's stride before the projector (no newline),
    images tile as the original LLaVA-NeXT does, and the video placeholder is the id after <image>'s."""
    hf, src, dst, seed = converted
    with pytest.raises(CheckpointError, match=f"convert it first: python -m llava_jax.convert --src {src} --dst DIR "):
        load_pretrained(str(src))  # the tower is inside: no --vision-tower to ask for
    ours = load_pretrained(dst)
    g = ours.config.geometry
    assert (g.convention, g.video, g.video_stride, g.video_grid, g.max_tiles) == ("original", "average", STRIDE, 2, 0)
    assert (ours.config.video_token_index, ours.config.text.model_type) == (IMAGE_TOKEN + 1, "llama")
    # Frames as the original's demo preprocesses them (its CLIP image processor on each), images tiled as it does.
    assert VideoProcessorConfig.from_pretrained(dst) == VideoProcessorConfig(size=TILE, crop_size=TILE)
    pre = ImageProcessorConfig.from_pretrained(dst)
    assert (pre.processor_type, pre.mean, pre.anyres_config(grid=g.grid).resolutions()) == (
        "LlavaNextImageProcessor", CLIP_MEAN, g.resolutions())
    ours = LlavaModel(ours.config.replace(video_token_index=VIDEO_TOKEN), ours.params)  # transformers' video id
    # A video alone, a wide and a tall anyres image, a row with an image and then a video.
    compare(hf, ours, [[3], [(100, 140)], [(180, 70), 3]], TILE, MAX_PATCHES, seed)


@pytest.mark.parametrize("change, pattern", [
    (dict(mm_resampler_type="perceiver"), "mm_resampler_type 'perceiver' is not supported"),
    (dict(mm_spatial_pool_mode="max"), "mm_spatial_pool_mode 'max' is not supported"),
    (dict(mm_spatial_pool_stride=0), "mm_spatial_pool_stride 0 is not"),
    (dict(mm_spatial_pool_out_channels=128), "mm_spatial_pool_out_channels is 128"),
    (dict(mm_newline_position="grid"), "mm_newline_position 'grid' is not supported"),
    (dict(image_aspect_ratio="pad"), "'spatial_pool' .* needs image_aspect_ratio 'anyres'"),
])
def test_unsupported_resampler_settings_fail_naming_the_key(tmp_path, capsys, change, pattern):
    """Each setting the release did not use is refused before any tensor is read: exit 2, one line naming
    config.json and the key."""
    src = write_original_dir(make_llama_next_video(0), tmp_path, **original_config(**change))
    capsys.readouterr()  # transformers' save_pretrained progress bar
    err = fails(tmp_path, capsys, ["--src", str(src)], pattern)
    assert len(err.splitlines()) == 1 and f"{src}/config.json: " in err, err


@pytest.mark.slow(seconds=6)
def test_converted_original_exports_to_a_llava_next_video_directory(converted, tmp_path):
    """Ours -> HF: `llava_next_video` with the config's stride and the (height, width) pinpoints, the embedding
    padded to hold <video> (the id after <image>'s, past the vocabulary here), and transformers' logits of the
    source on a video and an image."""
    import json
    import os
    import shutil

    import numpy as np
    from transformers import LlavaNextVideoForConditionalGeneration

    from tests.test_model_onevision import batch, hf_logits

    hf, _, converted_dir, seed = converted
    ours, out = str(tmp_path / "ours"), str(tmp_path / "exported")
    shutil.copytree(converted_dir, ours)
    VideoProcessorConfig(size=TILE, crop_size=TILE, num_frames=8).save(ours)  # to tell it from one derived anew
    assert convert_main(["--src", ours, "--dst", out, "--to", "hf"]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["model_type"], config["spatial_pool_mode"], config["spatial_pool_stride"]) == (
        "llava_next_video", "average", STRIDE)
    assert (config["image_token_index"], config["video_token_index"]) == (IMAGE_TOKEN, IMAGE_TOKEN + 1)
    assert sorted(map(tuple, config["image_grid_pinpoints"])) == sorted((h, w) for w, h in PINPOINTS)
    assert VideoProcessorConfig.from_pretrained(out).num_frames == 8
    back, info = LlavaNextVideoForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    vocab = hf.config.text_config.vocab_size
    assert back.config.text_config.vocab_size > IMAGE_TOKEN + 1 >= vocab
    rng = np.random.default_rng(seed)
    ids, mask, px, sizes, videos, per_row = batch(rng, load_pretrained(ours).config, [[3], [(100, 140)]], TILE,
                                                  MAX_PATCHES)
    exported_ids = np.where(ids == VIDEO_TOKEN, IMAGE_TOKEN + 1, ids)  # batch() writes transformers' video id
    keep = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(back, exported_ids, mask, px, sizes, videos, per_row)[keep][:, :vocab],
                               hf_logits(hf, ids, mask, px, sizes, videos, per_row)[keep], atol=1e-5, rtol=1e-5)


def test_exported_tokenizer_names_video_after_image(tmp_path, tiny_spm_dir):
    """A bare tokenizer.model whose pieces end where <image> starts: <image>, <video>, then <pad> (llava-hf's
    added tokens), never <pad> on the video id."""
    import json
    import os
    import shutil

    from transformers import AutoTokenizer

    from llava_jax.anyres import AnyresConfig
    from llava_jax.config import LlavaConfig, TextConfig
    from llava_jax.weights.export import padded_vocab, tokenizer_config

    # The tiny tokenizer has 400 pieces; the converted original's <image> is the first id past them.
    cfg = LlavaConfig(text=TextConfig(vocab_size=400), image_token_index=400, video_token_index=401,
                      anyres=AnyresConfig(video="average"))
    assert padded_vocab(cfg) == 448
    shutil.copy(os.path.join(tiny_spm_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(cfg, str(tmp_path / "tokenizer.model"), 448)))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.convert_tokens_to_ids(["<image>", "<video>", "<pad>"]) == [400, 401, 402] and tok.pad_token_id == 402
    assert tok("<video>\nWhat happens?").input_ids[:2] == [1, 401]


def test_original_onevision_gets_siglip_and_onevision_processor_settings(tmp_path):
    """An original OneVision directory (no processor file, SigLIP inside) converts with SigLIP's normalisation,
    OneVision's image rules and frames resized to a tile (its settings had been CLIP's, tiled as NeXT's)."""
    from llava_jax.weights import parts
    from tests.test_model_onevision import OV_PINPOINTS, TILE as OV_TILE, make_onevision

    src = write_original_dir(make_onevision(0, siglip=True, siglip_hidden=72, siglip_heads=1), tmp_path,
                             model_type="llava_qwen", mm_vision_tower="google/siglip-so400m-patch14-384",
                             mm_projector_type="mlp2x_gelu", mm_hidden_size=72, image_aspect_ratio="anyres_max_2",
                             mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=OV_PINPOINTS)
    plan = parts.plan_original(str(src))
    pre = plan.preprocessor
    assert (pre.processor_type, pre.mean, pre.std, pre.size) == (
        "LlavaOnevisionImageProcessor", SIGLIP_MEAN, SIGLIP_MEAN, OV_TILE)
    assert plan.video == VideoProcessorConfig.onevision(size=OV_TILE, mean=SIGLIP_MEAN, std=SIGLIP_MEAN)


@pytest.mark.parametrize("model_type, family", [("llava_mistral", "mistral"), ("llava", "llama")])
def test_mistral_and_plain_llava_model_types_plan_as_next_video(tmp_path, model_type, family):
    """LLaVA-NeXT-Video-7B-32K is a `llava_mistral`; older configs say `llava`: both plan the same video geometry
    (header-only: the logits test covers the computation)."""
    from llava_jax.weights import parts

    src = write_original_dir(make_llama_next_video(0), tmp_path, **original_config(model_type=model_type))
    plan = parts.plan_original(str(src))
    plan.validate()
    g = plan.cfg.geometry
    assert (plan.cfg.text.model_type, g.video, g.video_stride) == (family, "average", STRIDE)
