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


@pytest.mark.slow(seconds=10)
def test_original_next_video_checkpoint_matches_transformers(tmp_path):
    """Converted, a video's frames are average-pooled with the config's stride before the projector (no newline),
    images tile as the original LLaVA-NeXT does, and the video placeholder is the id after <image>'s."""
    seed = fresh_seed()
    hf = make_llama_next_video(seed)
    src = write_original_dir(hf, tmp_path, shards=2, **original_config())
    with pytest.raises(CheckpointError, match=f"convert it first: python -m llava_jax.convert --src {src} --dst DIR "):
        load_pretrained(str(src))  # the tower is inside: no --vision-tower to ask for
    dst = str(tmp_path / "ours")
    assert convert_main(["--src", str(src), "--dst", dst, "--image-token-index", str(IMAGE_TOKEN)]) == 0
    ours = load_pretrained(dst)
    g = ours.config.geometry
    assert (g.convention, g.video, g.video_stride, g.video_grid, g.max_tiles) == ("original", "average", STRIDE, 2, 0)
    assert (ours.config.video_token_index, ours.config.text.model_type) == (IMAGE_TOKEN + 1, "llama")
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
