"""`python -m llava_jax.generate` with `--video-file` and repeated `--image-file` on a tiny llava-hf OneVision
directory (SigLIP tower, Qwen2 decoder, tokenizer.json only, OneVision image and video processor settings): the
prompt holds the tokens the video's frames and the untiled images take, and the greedy answer is transformers'
`generate` on the same preprocessed inputs (data/video.py and data/image.py are checked against the processors in
their own tests). Bad video input exits 2 with one line naming the file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llava_jax.config import ImageProcessorConfig, VideoProcessorConfig
from llava_jax.data.image import load_image, preprocess_images
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.data.video import load_video
from tests._inference import train_bpe_tokenizer, write_image
from tests._seeds import fresh_seed
from tests.hf_reference import perturb_, text_config_dict
from tests.test_data_video import _frames, _write
from tests.test_inference_cli import run
from tests.test_model_onevision import OV_PINPOINTS, TILE

NEW = 5


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    """A tiny llava-hf OneVision directory; returns (path, the transformers model)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    seed = fresh_seed()
    path = str(tmp_path_factory.mktemp("onevision-tiny"))
    _, image_token = train_bpe_tokenizer(path)
    tok = Tokenizer.from_pretrained(path)
    text = text_config_dict(vocab=image_token + 8, layers=2, hidden=64, heads=4, kv_heads=2)
    text.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=68, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE, patch_size=14, vision_use_head=False)
    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_index=image_token,
                               video_token_index=image_token + 1, image_grid_pinpoints=OV_PINPOINTS,
                               vision_aspect_ratio="anyres_max_2", vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    hf = perturb_(LlavaOnevisionForConditionalGeneration(cfg), seed)
    hf.save_pretrained(path)
    ImageProcessorConfig(size=TILE, crop_size=TILE, pad_to_square=False, grid_pinpoints=tuple(map(tuple, OV_PINPOINTS)),
                         onevision=True,
                         mean=(0.5,) * 3, std=(0.5,) * 3).save(path)
    VideoProcessorConfig.onevision(size=TILE, num_frames=4).save(path)
    return path, hf


def _greedy(hf, ids, **inputs) -> list[int]:
    kw = {k: torch.as_tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          **kw, max_new_tokens=NEW, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _answer(*flags) -> dict:
    r = run("llava_jax.generate", *flags, "--conv-mode", "raw", "--json", "--temperature", "0",
            "--max-new-tokens", str(NEW))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow(seconds=30)
def test_generate_video_file_answer_equals_transformers(onevision_dir, tmp_path):
    """A 12-frame video sampled to the settings' 4 frames: 4 x 2 x 2 pooled tokens and one newline, and the greedy
    answer of transformers on the same frames."""
    d, hf = onevision_dir
    video = _write(tmp_path / "clip.mp4", _frames(fresh_seed(), 12), "mpeg4", "mp4", "yuv420p")
    out = _answer("--model-path", d, "--video-file", video, "--prompt", "<video>\nWhat moves?")
    video_token = hf.config.video_token_index
    assert out["prompt_ids"].count(video_token) == 4 * 2 * 2 + 1
    frames = load_video(video, VideoProcessorConfig.from_pretrained(d))
    want = _greedy(hf, out["prompt_ids"], pixel_values_videos=frames.transpose(0, 3, 1, 2)[None].copy())
    n = len(out["token_ids"])
    assert out["token_ids"] == want[:n] and (n == NEW or out["finish_reason"] == "eos")
    # --num-frames overrides the settings' count.
    out = _answer("--model-path", d, "--video-file", video, "--num-frames", "2", "--prompt", "What moves?")
    assert out["prompt_ids"].count(video_token) == 2 * 2 * 2 + 1


@pytest.mark.slow(seconds=20)
def test_generate_two_images_untiled_answer_equals_transformers(onevision_dir, tmp_path):
    """Two images in one prompt: each its base tile and a newline (OneVision does not tile several), and the greedy
    answer of transformers given them with batch_num_images [2]."""
    d, hf = onevision_dir
    seed = fresh_seed()
    paths = [write_image(str(tmp_path / f"{i}.png"), seed=seed + i, size=s) for i, s in enumerate([(95, 41), (30, 60)])]
    out = _answer("--model-path", d, "--image-file", paths[0], "--image-file", paths[1], "--prompt",
                  "<image> and <image>: which is wider?")
    assert out["prompt_ids"].count(hf.config.image_token_index) == 2 * (3 * 3 + 1)
    batch = preprocess_images([load_image(p) for p in paths], ImageProcessorConfig.from_pretrained(d),
                              batch_num_images=[2])
    want = _greedy(hf, out["prompt_ids"], pixel_values=batch.pixel_values.transpose(0, 1, 4, 2, 3).copy(),
                   image_sizes=batch.image_sizes.astype(np.int64), batch_num_images=np.array([2]))
    n = len(out["token_ids"])
    assert out["token_ids"] == want[:n] and (n == NEW or out["finish_reason"] == "eos")


def test_bad_video_exits_2_naming_the_file(onevision_dir, tmp_path):
    d, _ = onevision_dir
    bad = tmp_path / "not-a-video.mp4"
    bad.write_bytes(b"no video here")
    r = run("llava_jax.generate", "--model-path", d, "--video-file", str(bad), "--prompt", "hi", "--json")
    assert r.returncode == 2 and str(bad) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_chat_video_and_two_images_answer_as_generate(onevision_dir, tmp_path):
    """`/video` and `/image` attach to the next message: the chat's answer is the one `generate` gives the same
    question, and a second image later in the conversation leaves both untiled (the prompt is rebuilt)."""
    from llava_jax.inference.chat import ChatSession
    from llava_jax.inference.pipeline import Pipeline
    from llava_jax.inference.sampling import SamplingParams

    d, _ = onevision_dir
    pipe = Pipeline.from_pretrained(d, conv_mode="raw")
    params = SamplingParams(temperature=0.0, max_new_tokens=3)
    video = _write(tmp_path / "clip.mp4", _frames(fresh_seed(), 8), "mpeg4", "mp4", "yuv420p")
    image = write_image(str(tmp_path / "a.png"), seed=fresh_seed(), size=(95, 41))
    session = ChatSession(pipe, params, num_frames=2)
    assert session.handle(f"/video {video}").kind == "say" and session.handle(f"/image {image}").kind == "say"
    answer = "".join(session.ask("What is shown?"))
    alone = pipe.question("<video>\n<image>\nWhat is shown?", pipe.load_images([image]), seed=params.seed,
                          videos=pipe.load_videos([video], 2))
    assert answer == pipe.engine.generate([alone], params)[0].text
    assert session.handle(f"/image {image}").kind == "say"
    list(session.ask("And now?"))
    assert len(session.images) == 2 and len(session.videos) == 1
    assert session.handle(f"/video {tmp_path}/missing.mp4").kind == "error"
