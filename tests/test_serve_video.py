"""`python -m llava_jax.serve` on a tiny LLaVA-OneVision directory (tokenizer.json, OneVision image and video
processor settings): a video part and two image parts in one message are answered greedily exactly as
`Engine.generate` answers the same prompt alone, built here without the server's code (frames decoded and
preprocessed by data/video.py, the two images untiled as transformers' OneVision processor leaves them);
bad videos are 4xx errors naming the part, and the server stays healthy."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import PIL.Image
import pytest

from llava_jax import anyres
from llava_jax.config import ImageProcessorConfig, VideoProcessorConfig
from llava_jax.data.image import preprocess_images
from llava_jax.data.templates import get_template, render_prompt
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.data.video import decode_frames, preprocess_frames
from llava_jax.inference.engine import Engine, Prompt
from llava_jax.inference.sampling import SamplingParams
from tests._seeds import fresh_seed
from tests.test_serve import Server, post
from tests.test_serve_schema import data_url, empty_video_bytes, random_frames, video_bytes

KEY = "sk-test-key"  # tests.test_serve's `post` sends it
NUM_FRAMES = 4
FLAGS = ("--api-key", KEY, "--max-batch", "2", "--num-frames", str(NUM_FRAMES), "--max-videos", "1",
         "--max-body-mb", "1")
TEMPLATE = "vicuna_v1"  # tests.test_serve's Server runs it
ANSWER_TOKENS = 6
# One server subprocess and one engine for the module (start, load and compilation: about 30 s on 2 cores).
pytestmark = pytest.mark.slow(seconds=12)


def make_onevision_dir(path: str, seed: int) -> str:
    """A tiny llava-hf OneVision directory: HF weights (CLIP 42 px tiles of 3 x 3 features, Qwen2, anyres_max_2,
    bilinear video pooling 3 -> 2), a byte-level BPE tokenizer.json, OneVision image and video processor json."""
    import torch
    from transformers import (CLIPVisionConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              Qwen2Config)

    from tests._inference import train_bpe_tokenizer
    from tests.hf_reference import perturb_, text_config_dict, vision_config_dict
    from tests.test_model_onevision import OV_PINPOINTS, TILE

    _, image_token = train_bpe_tokenizer(path)
    tok = Tokenizer.from_pretrained(path)
    text = text_config_dict(vocab=image_token + 8)
    text.update(max_position_embeddings=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(
        vision_config=CLIPVisionConfig(**vision_config_dict(image_size=TILE)), text_config=Qwen2Config(**text),
        image_token_index=image_token, video_token_index=image_token + 1, image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_2", vision_feature_layer=-2, vision_feature_select_strategy="default")
    perturb_(LlavaOnevisionForConditionalGeneration(cfg), seed).save_pretrained(path)
    pinpoints = tuple(tuple(p) for p in OV_PINPOINTS)
    ImageProcessorConfig(size=TILE, crop_size=TILE, pad_to_square=False, grid_pinpoints=pinpoints,
                         onevision=True).save(path)
    VideoProcessorConfig.onevision(size=TILE).save(path)  # num_frames 32: --num-frames overrides it
    return path


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    return make_onevision_dir(str(tmp_path_factory.mktemp("onevision-serve", numbered=False)), fresh_seed())


@pytest.fixture(scope="module")
def server(onevision_dir, tmp_path_factory):
    s = Server(onevision_dir, str(tmp_path_factory.mktemp("serve-video") / "server.log"), *FLAGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(onevision_dir):
    from llava_jax.weights.load import load_pretrained

    return Engine(load_pretrained(onevision_dir), Tokenizer.from_pretrained(onevision_dir))


def png_url(seed: int, size: tuple[int, int]) -> tuple[str, PIL.Image.Image]:
    """A random (height, width) image as a PNG data URL, and the image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), image


def part(kind: str, url: str) -> dict:
    return {"type": kind, "video_url" if kind == "video_url" else "image_url": {"url": url}}


def reference(engine: Engine, directory: str, text: str, images=(), videos=()) -> tuple[list[int], str]:
    """`Engine.generate`'s greedy answer (token count, text) to one user turn, its media rendered here."""
    cfg, g = engine.config, engine.config.geometry
    tiled = anyres.tiled_images(g, len(images))
    ids = render_prompt([{"from": "human", "value": text}], get_template(TEMPLATE), engine.tokenizer,
                        image_token_index=cfg.image_token_index,
                        num_image_tokens=[anyres.layout(g, (im.height, im.width), tiled).num_tokens for im in images],
                        video_token_index=cfg.video_token_index,
                        num_video_tokens=[g.video_tokens(len(v)) for v in videos])
    pixels = sizes = None
    if images:
        batch = preprocess_images(list(images), ImageProcessorConfig.from_pretrained(directory),
                                  max_patches=g.max_patches, batch_num_images=[len(images)])
        pixels, sizes = batch.pixel_values, batch.image_sizes
    params = SamplingParams(max_new_tokens=ANSWER_TOKENS, stop_strings=get_template(TEMPLATE).stop_strings)
    (completion,) = engine.generate([Prompt(ids, pixels, None, sizes, videos=list(videos) or None)], params)
    return len(ids), completion.text


def ask(server: Server, content: list[dict]) -> dict:
    r = post(server, {"messages": [{"role": "user", "content": content}], "temperature": 0,
                      "max_tokens": ANSWER_TOKENS})
    assert r.status_code == 200, r.text
    return r.json()


def test_video_answer_equals_engine_generate(onevision_dir, server, engine, tmp_path):
    """A 9-frame video, 4 frames sampled (--num-frames): the served answer and prompt length are the engine's on the
    prompt built from `decode_frames` + `preprocess_frames` of the same bytes."""
    data = video_bytes(random_frames(fresh_seed(), 9))
    (tmp_path / "v.mp4").write_bytes(data)
    frames, info = decode_frames(tmp_path / "v.mp4", NUM_FRAMES)
    assert info.indices.tolist() == [0, 2, 4, 6]
    video = preprocess_frames(frames, VideoProcessorConfig.from_pretrained(onevision_dir))
    got = ask(server, [part("video_url", data_url(data)), {"type": "text", "text": "What happens?"}])
    prompt_tokens, text = reference(engine, onevision_dir, "<video>\nWhat happens?", videos=[video])
    assert got["usage"]["prompt_tokens"] == prompt_tokens
    assert got["choices"][0]["message"]["content"] == text


def test_two_images_are_untiled_and_equal_engine_generate(onevision_dir, server, engine):
    """Two images in one message take OneVision's untiled tokens (one tile each, not anyres tiles) and are answered
    as the engine answers the prompt built with transformers' batch_num_images rule."""
    seed = fresh_seed()
    (url_a, a), (url_b, b) = png_url(seed, (50, 60)), png_url(seed + 1, (120, 40))
    g = engine.config.geometry
    assert anyres.layout(g, (120, 40), False).num_tokens < anyres.layout(g, (120, 40), True).num_tokens
    got = ask(server, [{"type": "text", "text": "Compare"}, part("image_url", url_a), part("image_url", url_b)])
    prompt_tokens, text = reference(engine, onevision_dir, "Compare<image>\n<image>\n", images=[a, b])
    assert got["usage"]["prompt_tokens"] == prompt_tokens
    assert got["choices"][0]["message"]["content"] == text


def test_video_and_images_at_once_answer_as_alone(server):
    """A video request and a two-image request in flight together (two slots, different tile and frame counts)
    get the answers each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    seed = fresh_seed()
    video = [part("video_url", data_url(video_bytes(random_frames(seed, 6)))), {"type": "text", "text": "Go"}]
    images = [part("image_url", png_url(seed, (40, 90))[0]), part("image_url", png_url(seed + 1, (70, 30))[0]),
              {"type": "text", "text": "Go"}]
    alone = [ask(server, video), ask(server, images)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda content: ask(server, content), [video, images]))
    for a, b in zip(alone, together):
        assert (a["choices"][0]["message"], a["usage"]) == (b["choices"][0]["message"], b["usage"])


def test_short_video_gives_all_its_frames(server, engine):
    """A 2-frame video with --num-frames 4 is served with its 2 frames (as vLLM), not refused."""
    lone = ask(server, [{"type": "text", "text": "Hi"}])["usage"]["prompt_tokens"]
    data = video_bytes(random_frames(fresh_seed(), 2))
    got = ask(server, [part("video_url", data_url(data)), {"type": "text", "text": "Hi"}])
    newline = 1  # "<video>\n": the marker's newline token (BPE: one token)
    assert got["usage"]["prompt_tokens"] == lone + engine.config.geometry.video_tokens(2) + newline


def test_bad_videos_get_openai_errors(server):
    """Each bad video is a 4xx with OpenAI's error object naming the part; the server answers afterwards."""
    good = data_url(video_bytes(random_frames(fresh_seed(), 3)))
    big = data_url(os.urandom(1_200_000))  # over --max-body-mb 1

    def message(*parts):
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, *parts]}]}

    param = "messages[0].content[1].video_url"
    cases = [
        (message(part("video_url", data_url(b"certainly not a video" * 40))), 400, param, None),
        (message(part("video_url", data_url(empty_video_bytes(), "video/avi"))), 400, param, None),
        (message(part("video_url", "https://example.com/v.mp4")), 400, param, "video_url_not_supported"),
        (message(part("video_url", "data:image/png;base64,QQ==")), 400, param, None),
        (message(part("video_url", good), part("video_url", good)), 400, "messages", None),  # --max-videos 1
        (message(part("video_url", big)), 413, None, None),
    ]
    for request, status, want_param, code in cases:
        r = post(server, request)
        where = json.dumps(request)[:200]
        assert r.status_code == status, (where, r.status_code, r.text)
        error = r.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (want_param, code, "invalid_request_error"), error
        assert error["message"], error
    assert ask(server, [part("video_url", good), {"type": "text", "text": "?"}])["choices"][0]["message"]["role"] \
        == "assistant"


def test_web_page_sends_a_video(server, tmp_path):
    """The chat page's file picker takes a video: it is previewed, sent as a video_url data URL part, shown in the
    user's message, and the page shows the API's greedy answer to the same request."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    path = tmp_path / "clip.mp4"
    path.write_bytes(video_bytes(random_frames(fresh_seed(), 5)))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))

    def wait(condition, what: str):
        try:
            WebDriverWait(driver, 60, poll_frequency=0.05).until(condition)
        except Exception as e:
            shot = str(tmp_path / "page.png")
            driver.save_screenshot(shot)
            raise AssertionError(f"waited for {what}; screenshot {shot}") from e

    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        wait(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ready", "the model list")
        for field, value in (("temperature", "0"), ("max-tokens", str(ANSWER_TOKENS))):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "image-input").send_keys(str(path))
        wait(lambda d: d.find_element(By.ID, "video-thumb").is_displayed(), "the video preview")
        assert not driver.find_element(By.ID, "image-thumb").is_displayed()
        driver.find_element(By.ID, "prompt").send_keys("What happens?")
        driver.find_element(By.ID, "send").click()
        done = "#messages .message.assistant[data-state=done]"
        wait(lambda d: d.find_elements(By.CSS_SELECTOR, done), "the answer")
        sent = json.loads(driver.execute_script("return JSON.stringify(window.__llava.lastRequest)"))
        content = [part("video_url", data_url(path.read_bytes())), {"type": "text", "text": "What happens?"}]
        assert sent["messages"] == [{"role": "user", "content": content}]
        shown = driver.execute_script(f"return document.querySelector('{done} .text').textContent")
        assert shown == ask(server, content)["choices"][0]["message"]["content"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#messages .message.user video")) == 1
    finally:
        driver.quit()
