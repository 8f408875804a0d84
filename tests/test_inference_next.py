"""LLaVA-NeXT (anyres) inference on a tiny llava-hf NeXT directory whose tokenizer is only tokenizer.json:
the engine's greedy ids against transformers' `LlavaNextForConditionalGeneration.generate`, static shapes
over a stream of mixed-size images, and the pipeline under `generate`, `chat` and eval's batched answering.

28 px tiles of 2 x 2 features, the v1.6 pinpoints scaled to 28 px (tests/_inference.py), float32, fresh seeds.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import PIL.Image
import pytest

from llava_jax.data.image import load_image
from llava_jax.inference import answering
from llava_jax.inference.chat import ChatSession
from llava_jax.inference.engine import InputError, Prompt, prefill_step
from llava_jax.inference.pipeline import Pipeline
from llava_jax.inference.sampling import SamplingParams
from tests._inference import NEXT_TILE, hf_next_generate, make_next_model_dir, write_image
from tests._seeds import fresh_seed
from tests.test_inference_cli import run

NEW = 6
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("next-tiny"))
    _, hf = make_next_model_dir(d, seed=fresh_seed())
    return d, hf


@pytest.fixture(scope="module")
def pipe(next_dir):
    return Pipeline.from_pretrained(next_dir[0], conv_mode="raw")


def _prompt(rng: np.random.Generator, pipe: Pipeline, sizes, text_len: int = 3) -> Prompt:
    """BOS, text, per image its tokens and two text ids, more text; random tiles, zero beyond each image's own."""
    cfg = pipe.model.config
    text = lambda n: list(rng.integers(3, 500, n))  # noqa: E731  (ordinary pieces of the BPE vocabulary)
    ids = [pipe.tokenizer.bos_id] + text(3)
    for size in sizes:
        ids += [cfg.image_token_index] * cfg.image_layout(size).num_tokens + text(2)
    ids += text(text_len)
    if not sizes:
        return Prompt(np.asarray(ids, np.int32))
    tiles = rng.standard_normal((len(sizes), cfg.geometry.max_patches, NEXT_TILE, NEXT_TILE, 3)).astype(np.float32)
    for j, size in enumerate(sizes):
        tiles[j, cfg.image_layout(size).num_patches:] = 0
    return Prompt(np.asarray(ids, np.int32), tiles, None, np.asarray(sizes, np.int32))


def _hf_batch(prompts):
    """Left-padded ids, the images in order across the batch, their sizes, the mask (transformers' inputs)."""
    width = max(len(p.ids) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p.ids):], mask[b, width - len(p.ids):] = p.ids, 1
    with_images = [p for p in prompts if p.images is not None]
    pixels = np.concatenate([p.images for p in with_images]) if with_images else None
    sizes = np.concatenate([p.image_sizes for p in with_images]) if with_images else None
    return ids, pixels, sizes, mask


@pytest.mark.slow(seconds=10)
def test_greedy_equals_transformers_generate(next_dir, pipe):
    """One batch: a wide image, a tall one, two images of other sizes in one row, and text only; each row's
    greedy ids are transformers' on the same left-padded batch, and the wide image's are its ids alone."""
    _, hf = next_dir
    rng = np.random.default_rng(fresh_seed())
    prompts = [_prompt(rng, pipe, [(30, 90)]), _prompt(rng, pipe, [(61, 45)], 5),
               _prompt(rng, pipe, [(90, 30), (20, 17)], 1), _prompt(rng, pipe, [], 9)]
    want = hf_next_generate(hf, *_hf_batch(prompts), max_new_tokens=NEW)
    for b, completion in enumerate(pipe.engine.generate(prompts, GREEDY)):
        assert completion.token_ids == want[b].tolist(), f"row {b}"
    alone = hf_next_generate(hf, *_hf_batch(prompts[:1]), max_new_tokens=NEW)
    assert want[0].tolist() == alone[0].tolist()


def test_check_names_what_does_not_match(pipe):
    rng = np.random.default_rng(0)
    p = _prompt(rng, pipe, [(30, 90)])
    with pytest.raises(InputError, match=r"holds \d+ image tokens .* of sizes \[\(90, 30\)\] take \d+"):
        pipe.engine.check(Prompt(p.ids, p.images, None, [(90, 30)]))
    with pytest.raises(InputError, match="image_sizes"):
        pipe.engine.check(Prompt(p.ids, p.images))
    with pytest.raises(InputError, match=r"image 0 \(size \(30, 90\)\) must be \[P, 28, 28, 3\] with P >= its 4"):
        pipe.engine.check(Prompt(p.ids, p.images[:, :2], None, p.image_sizes))
    # Two images whose tokens add up, split across their runs at the wrong place.
    two = _prompt(rng, pipe, [(30, 90), (56, 56)])
    cfg = pipe.model.config
    ids = two.ids.tolist()
    first = ids.index(cfg.image_token_index) + cfg.image_layout((30, 90)).num_tokens
    moved = ids[:first - 1] + ids[first:first + 2] + [cfg.image_token_index] + ids[first + 2:]
    with pytest.raises(InputError, match=r"image run 0 of the prompt .* holds \d+ image tokens, not whole images"):
        pipe.engine.check(Prompt(np.asarray(moved, np.int32), two.images, None, two.image_sizes))
    pipe.engine.check(two)


def test_llava15_padding_is_refused_for_anyres_settings(next_dir):
    with pytest.raises(InputError, match=r"next-tiny.*: image_aspect_ratio 'pad' is LLaVA-1.5's padding choice"):
        Pipeline.from_pretrained(next_dir[0], image_aspect_ratio="pad")


@pytest.mark.slow(seconds=12)
def test_mixed_size_stream_compiles_one_prefill_per_token_bucket(pipe):
    """50 images of random sizes, one request each with a text of random length: the engine compiles at most
    one prefill program per prompt-length bucket, whatever the images' sizes, tiles and token counts."""
    engine, cfg = pipe.engine, pipe.model.config
    rng = np.random.default_rng(fresh_seed())
    sizes = [(int(h), int(w)) for h, w in rng.integers(10, 300, (50, 2))]
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    before = prefill_step._cache_size()
    keys = set()
    for size in sizes:
        batch = engine.prepare([_prompt(rng, pipe, [size], int(rng.integers(0, 30)))], params)
        keys.add(batch.shape_key)
        jax.block_until_ready(engine.prefill(batch, params).tokens)
    compiled = prefill_step._cache_size() - before
    buckets = {t for _, t, _, _ in keys}
    assert len(keys) == len(buckets), keys  # one batch size, tile-slot count and budget: the length picks
    token_counts = {cfg.image_layout(s).num_tokens for s in sizes}
    patch_counts = {cfg.image_layout(s).num_patches for s in sizes}
    assert compiled <= len(buckets) < len(token_counts), (compiled, keys, token_counts)
    assert len(patch_counts) > 1, patch_counts  # the stream mixes tile grids


def _processor(d: str):
    """transformers' LlavaNextProcessor as the llava-hf v1.6 checkpoints configure it (processor_config.json:
    the tower's CLS counted, then dropped by the "default" strategy)."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor

    return LlavaNextProcessor(image_processor=LlavaNextImageProcessor.from_pretrained(d),
                              tokenizer=AutoTokenizer.from_pretrained(d), patch_size=14,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)


@pytest.mark.slow(seconds=15)
def test_generate_cli_image_tokens_and_answer_equal_transformers(next_dir, tmp_path):
    """`generate --conv-mode raw --json` on a tokenizer.json-only NeXT directory: the prompt holds as many
    image tokens as LlavaNextProcessor makes for the image, and the greedy answer is transformers'."""
    d, hf = next_dir
    image = write_image(str(tmp_path / "wide.png"), seed=fresh_seed(), size=(95, 41))  # (width, height)
    text = "Look: <image> what is it?"
    r = run("llava_jax.generate", "--model-path", d, "--image-file", image, "--prompt", text, "--conv-mode", "raw",
            "--json", "--temperature", "0", "--max-new-tokens", str(NEW))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ref = _processor(d)(images=load_image(image), text=text, return_tensors="np")
    image_token = hf.config.image_token_index
    assert out["prompt_ids"].count(image_token) == int((ref["input_ids"] == image_token).sum())
    assert out["prompt_ids"] == ref["input_ids"][0].tolist()  # the raw template adds only BOS, as the processor
    pixels = ref["pixel_values"].transpose(0, 1, 3, 4, 2)
    want = hf_next_generate(hf, ref["input_ids"], pixels, ref["image_sizes"], max_new_tokens=NEW)[0].tolist()
    n = len(out["token_ids"])  # greedy, stopped early only by an EOS the random model emits
    assert out["token_ids"] == want[:n] and (n == NEW or out["finish_reason"] == "eos")


def _images(seed: int, sizes) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.slow(seconds=15)
def test_batched_answering_equals_one_at_a_time(pipe, tmp_path):
    """Eval's answering of anyres questions in mixed-size batches (one with two images, one text only) writes
    the answers that answering them one by one writes."""
    seed = fresh_seed()
    sizes = [[(40, 95)], [(95, 40), (20, 20)], []]
    questions = [answering.Question(f"Question {i}?", _images(seed + i, s), answering.answer_line(i, f"q{i}"))
                 for i, s in enumerate(sizes)]
    answers = {}
    for batch_size in (4, 1):  # 4: the shapes of the greedy test's batch
        path = str(tmp_path / f"answers_{batch_size}.jsonl")
        report = answering.answer_questions(pipe, questions, path, answering.greedy(NEW), batch_size=batch_size,
                                            progress=False)
        assert report.answered == len(questions) and not report.failed
        answers[batch_size] = [(r["question_id"], r["text"]) for r in answering.read_answers(path)]
    assert answers[4] == answers[1]


def test_chat_smoke_with_images_of_two_sizes(pipe, tmp_path):
    """Smoke: a two-turn chat with a wide image, then a tall one; the second prompt carries both."""
    session = ChatSession(pipe, SamplingParams(temperature=0.0, max_new_tokens=3))
    for turn, size in enumerate([(95, 41), (30, 70)]):
        session.add_image(write_image(str(tmp_path / f"{turn}.png"), seed=turn, size=size))
        stream = session.ask(f"turn {turn}")
        while True:
            try:
                next(stream)
            except StopIteration:
                break
    assert len(session.turns) == 4 and len(session.images) == 2 and not session.pending


def test_a_special_token_stop_string_ends_the_answer(pipe):
    """A stop string that is one special token (`<|im_end|>`, `<|eot_id|>`: decoding drops it, so no text shows
    it) ends the answer on its id, in `generate` and `stream` alike, with finish_reason "stop"."""
    engine, rng = pipe.engine, np.random.default_rng(fresh_seed())
    prompt = _prompt(rng, pipe, [(30, 90)])
    free = engine.generate([prompt], GREEDY)[0].token_ids
    special = int(free[2])  # make the third greedy token a special one: its text is dropped by decode
    real = engine.tokenizer

    class Special:  # the real tokenizer, with `special` a special token spelled "<|end|>"
        def __getattr__(self, name):
            return getattr(real, name)

        def piece_to_id(self, piece):
            return special if piece == "<|end|>" else real.piece_to_id(piece)

        def decode(self, ids):
            return real.decode([i for i in ids if i != special])

    engine.tokenizer = Special()
    try:
        params = SamplingParams(max_new_tokens=NEW, ignore_eos=True, stop_strings=("<|end|>",))
        done = engine.generate([prompt], params)[0]
        stream = engine.stream(prompt, params)
        deltas = []
        while True:
            try:
                deltas.append(next(stream))
            except StopIteration as end:
                streamed = end.value
                break
    finally:
        engine.tokenizer = real
    cut = free.index(special) + 1
    assert done.token_ids == free[:cut] and done.finish_reason == "stop"
    assert streamed.token_ids == free[:cut] and [d.token_id for d in deltas] == free[:cut]


@pytest.mark.slow(seconds=12)
def test_slot_engine_serves_anyres_images_as_generate_alone(pipe):
    """Anyres requests of different image sizes and counts joining the slot engine: each answer is the engine's
    for that prompt alone (the prefill places its tiles; decoding shares the rows)."""
    from llava_jax.inference.slots import SlotEngine

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    prompts = [_prompt(rng, pipe, [(30, 90)]), _prompt(rng, pipe, [(61, 45)], 4), _prompt(rng, pipe, [(90, 30)], 2)]
    slots = SlotEngine(pipe.engine, max_batch=2, steps_per_call=2).start()
    try:
        handles = [slots.submit(p, GREEDY) for p in prompts]
        for k, (p, h) in enumerate(zip(prompts, handles)):
            assert h.result(timeout=120).token_ids == pipe.engine.generate([p], GREEDY)[0].token_ids, \
                f"request {k} (seed {seed})"
    finally:
        slots.stop(drain=False, timeout=60)
