"""Generation against transformers' `generate`, and the properties a KV-cache engine must keep.

One tiny perturbed LLaVA (float32) serves every test; shapes are kept to a few buckets because
jit compilation dominates the run time on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llava_jax import load_pretrained
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.inference.engine import Engine, InputError, Prompt, bucket
from llava_jax.inference.sampling import SamplingParams, warp_logits
from llava_jax.models.llava import LlavaModel
from tests._inference import IMAGE_SIZE, IMAGE_TOKEN, NUM_IMAGE_TOKENS, SPM_VOCAB, hf_generate, make_model_dir

LOGPROB_ATOL = 1e-4
NEW = 12  # tokens generated per test prompt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, hf = make_model_dir(str(tmp_path_factory.mktemp("model")), seed=3)
    model = load_pretrained(path)
    engine = Engine(model, Tokenizer.from_pretrained(path))
    return hf, model, engine


def _prompt(seed: int, images: int, text_len: int) -> Prompt:
    """BOS, text, then per image some text and a placeholder run, then text; random pixels."""
    rng = np.random.default_rng(seed)
    ids = [1] + list(rng.integers(3, SPM_VOCAB, 3))
    for _ in range(images):
        ids += [IMAGE_TOKEN] * NUM_IMAGE_TOKENS + list(rng.integers(3, SPM_VOCAB, 2))
    ids += list(rng.integers(3, SPM_VOCAB, text_len))
    pixels = rng.standard_normal((images, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32) if images else None
    return Prompt(np.asarray(ids, np.int32), pixels)


PROMPTS = [_prompt(0, 0, 9), _prompt(1, 1, 4), _prompt(2, 2, 7)]  # no image, one, two
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(setup):
    """Each prompt generated on its own (batch of one), greedy."""
    _, _, engine = setup
    return [engine.generate([p], GREEDY)[0] for p in PROMPTS]


@pytest.mark.parametrize("i", range(len(PROMPTS)), ids=["0_images", "1_image", "2_images"])
def test_greedy_equals_transformers_generate(setup, alone, i):
    hf, _, _ = setup
    p = PROMPTS[i]
    ref_ids, ref_lp = hf_generate(hf, p.ids[None], p.images, max_new_tokens=NEW, eos=None)
    assert alone[i].token_ids == ref_ids[0].tolist()
    err = np.abs(np.asarray(alone[i].logprobs) - ref_lp[0]).max()
    assert err < LOGPROB_ATOL, f"log-prob error {err:.2e}"


def test_eos_stops_like_transformers(setup, alone):
    """Declare the 6th greedy token EOS: both implementations stop right after producing it."""
    hf, model, _ = setup
    toks = alone[1].token_ids
    k = next(j for j in range(5, NEW) if toks[j] not in toks[:j])
    eos = toks[k]
    engine = Engine(model, eos_token_id=eos)
    got = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=NEW))[0]
    ref_ids, _ = hf_generate(hf, PROMPTS[1].ids[None], PROMPTS[1].images, max_new_tokens=NEW, eos=eos)
    assert got.token_ids == toks[: k + 1] == ref_ids[0].tolist()
    assert got.finish_reason == "eos"


@pytest.mark.slow(seconds=15)
def test_batch_equals_each_prompt_alone(setup, alone):
    """Three prompts of different lengths and image counts (0, 1, 2) in one left-padded batch."""
    _, _, engine = setup
    batched = engine.generate(PROMPTS, GREEDY)
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)


@pytest.mark.slow(seconds=8)
def test_prefill_through_splash_equals_xla(setup, alone):
    """The prefill attends over the prompt's own keys, so a fused kernel runs it: Pallas splash (in
    interpret mode on this CPU) over the left-padded batch gives each prompt's greedy ids and
    log-probs of the XLA path alone (decode steps stay on XLA)."""
    _, model, _ = setup
    splash = Engine(LlavaModel(model.config.replace(attention="splash"), model.params))
    for b, a in zip(splash.generate(PROMPTS, GREEDY), alone):
        assert b.token_ids == a.token_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)


def test_kv_cache_decoding_equals_full_recompute(setup, alone):
    """Feeding prompt + generated tokens through the uncached forward reproduces every step."""
    _, model, _ = setup
    p, c = PROMPTS[2], alone[2]
    ids = np.concatenate([p.ids, c.token_ids[:-1]])[None]
    logits = np.asarray(model(ids, p.images).logits)[0, len(p.ids) - 1 :]  # [NEW, V]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    assert logits.argmax(-1).tolist() == c.token_ids
    err = np.abs(logp[np.arange(NEW), c.token_ids] - np.asarray(c.logprobs)).max()
    assert err < LOGPROB_ATOL, f"log-prob error {err:.2e}"


@pytest.mark.slow(seconds=30)
def test_sampling_reproducible_and_batch_independent(setup):
    _, _, engine = setup
    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=NEW, seed=7, ignore_eos=True)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # Row r draws with seed + r, and its draws depend on nothing else: alone with that seed, same tokens.
    alone = engine.generate([dataclasses.replace(PROMPTS[2], seed=9)], params)[0]
    assert alone.token_ids == a[2].token_ids
    other = engine.generate(PROMPTS, dataclasses.replace(params, seed=8))
    assert [c.token_ids for c in other] != [c.token_ids for c in a]
    # top_k = 1 leaves one candidate: sampling is then greedy.
    top1 = engine.generate(PROMPTS, dataclasses.replace(params, top_k=1))
    assert [c.token_ids for c in top1] == [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.5, 20, 0.9), (1.0, 0, 0.01)]
)
def test_warpers_equal_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32) * 3
    ref = torch.as_tensor(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = np.asarray(warp_logits(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[~np.isinf(got)], ref[~np.isinf(ref)], rtol=1e-6)


@pytest.mark.slow(seconds=13)
def test_stop_strings_and_streaming_equal_generate(setup, alone):
    _, _, engine = setup
    full = engine.generate([PROMPTS[1]], GREEDY)[0]
    stream = engine.stream(PROMPTS[1], GREEDY)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            streamed = stop.value
            break
    assert [d.token_id for d in pieces] == full.token_ids == streamed.token_ids
    assert "".join(d.text for d in pieces) == full.text == streamed.text
    # A stop string taken from the middle of the answer: the text ends before it, and the tokens
    # end with the one that completed it.
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick another stop string than {stop!r}"
    params = dataclasses.replace(GREEDY, stop_strings=(stop,))
    got = engine.generate([PROMPTS[1]], params)[0]
    assert got.finish_reason == "stop"
    assert got.text == text[: text.find(stop)]
    n = len(got.token_ids)
    assert stop in engine.tokenizer.decode(full.token_ids[:n])
    assert stop not in engine.tokenizer.decode(full.token_ids[: n - 1])
    assert got.token_ids == full.token_ids[:n]
    pieces = list(_drain(engine.stream(PROMPTS[1], params)))
    assert "".join(d.text for d in pieces) == got.text


def _drain(gen):
    result = yield from gen
    return result


def test_context_limits(setup):
    _, model, full_engine = setup
    engine = Engine(model, max_context=len(PROMPTS[1].ids) + 5)
    got = engine.generate([PROMPTS[1]], GREEDY)[0]
    assert len(got.token_ids) == 5 and got.finish_reason == "length"
    with pytest.raises(InputError, match="context"):
        Engine(model, max_context=len(PROMPTS[1].ids)).check(PROMPTS[1])
    with pytest.raises(InputError, match="2 image placeholders but 1 images"):
        full_engine.check(Prompt(PROMPTS[2].ids, PROMPTS[2].images[:1]))


def test_buckets():
    sizes = (1, 2, 3, 4, 5, 6, 7, 9, 13, 17, 25, 33, 600)
    assert [bucket(n) for n in sizes] == [1, 2, 3, 4, 6, 6, 8, 12, 16, 24, 32, 48, 768]
    for n in range(1, 3000):
        assert n <= bucket(n) <= max(n * 1.5, 2)


def test_growing_prompt_reuses_compiled_code(setup, alone):
    """A chat-like sequence of longer and longer prompts inside one bucket compiles nothing new."""
    from llava_jax.inference.engine import decode_loop, prefill_step

    _, _, engine = setup
    before = (prefill_step._cache_size(), decode_loop._cache_size())
    base = PROMPTS[1]
    for extra in (1, 4, 7):
        ids = np.concatenate([base.ids, np.arange(10, 10 + extra, dtype=np.int32)])
        assert bucket(len(ids), 32) == bucket(len(base.ids), 32)
        engine.generate([Prompt(ids, base.images)], dataclasses.replace(GREEDY, max_new_tokens=5 + extra))
    assert (prefill_step._cache_size(), decode_loop._cache_size()) == before


LONG = 40  # new tokens of the long answer: budget 48, windows 16, 32, 48


@pytest.mark.slow(seconds=12)
def test_decode_window_grows_and_equals_full_window_decode(setup):
    """The cache starts with a 16-slot window for generated tokens, not the 48 of the budget, and
    doubles as the answer grows; the long answer across three windows equals the previous layout
    (one window of the whole budget) token for token."""
    from llava_jax.inference.engine import FIRST_WINDOW

    _, model, engine = setup
    p = PROMPTS[2]
    params = dataclasses.replace(GREEDY, max_new_tokens=LONG)
    batch = engine.prepare([p], params)
    t, n = batch.ids.shape[1], batch.num_new
    assert n == bucket(LONG) > 2 * FIRST_WINDOW
    state = engine.prefill(batch, params)
    c = model.config.text
    per_slot = c.num_layers * len(batch.ids) * c.num_kv_heads * c.head_dim
    seen = [state.kv_mask.shape[1]]
    for stop_at in (10, 20, LONG):  # windows 16, 32 and 48 are the first to hold them
        state = engine.decode(state, params, stop_at=stop_at)
        assert int(state.step.max()) == stop_at
        seen.append(state.kv_mask.shape[1])
        assert state.cache["k"].size == per_slot * seen[-1]  # the cache has as many slots as the mask
    assert seen == [t + 16, t + 16, t + 32, t + 48]
    got = engine.finish(batch, state, params)[0]

    full = Engine(model, engine.tokenizer, first_window=None)
    state = full.prefill(full.prepare([p], params), params)
    assert state.kv_mask.shape[1] == t + n
    want = full.generate([p], params)[0]
    assert len(got.token_ids) == LONG
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    # A short answer (one window, never grown) is the start of the long one.
    assert engine.generate([p], GREEDY)[0].token_ids == want.token_ids[:NEW]
    # Streaming (one step per dispatch) grows the window between steps: the same tokens.
    assert [d.token_id for d in _drain(engine.stream(p, params))] == want.token_ids


INT8_AGREE = 8  # int8 greedy ids equal float's for at least this many leading tokens (of NEW)
INT8_LOGPROB_ATOL = 0.1  # nats, on the tokens where they agree


@pytest.mark.slow(seconds=15)
def test_int8_weights_stay_close_to_float(setup, alone):
    """Weight-only int8 (per output channel): the documented tolerance on the tiny model. A rounding
    flip of a near tie may change a later token, after which the answers diverge."""
    _, model, _ = setup
    engine = Engine(model, first_window=None, int8=True)
    mlp = engine.params["language_model"]["layers"]["mlp"]["up_proj"]
    assert mlp["kernel"].dtype == jnp.int8 and mlp["kernel_scale"].dtype == jnp.float32
    got = [engine.generate([p], GREEDY)[0] for p in PROMPTS]
    for g, a in zip(got, alone):
        agree = next((i for i, (x, y) in enumerate(zip(g.token_ids, a.token_ids)) if x != y), NEW)
        assert agree >= INT8_AGREE, (g.token_ids, a.token_ids)
        err = np.abs(np.asarray(g.logprobs[:agree]) - np.asarray(a.logprobs[:agree])).max()
        assert err < INT8_LOGPROB_ATOL, f"int8 log-prob error {err:.3f}"
    # Quantised, not float: the log-probs move (by about the rounding of the weights).
    assert max(np.abs(np.asarray(g.logprobs[:4]) - np.asarray(a.logprobs[:4])).max() for g, a in zip(got, alone)) > 1e-4


def test_int8_parameter_shapes_without_weights(setup):
    """`abstract_quantized` (what compile-only memory figures use, bench/serve_memory.py) is the tree
    `quantize_params` makes: the same leaves, shapes and dtypes (int8 kernels, float32 scales)."""
    from llava_jax.inference.quant import abstract_quantized, quantize_params

    _, model, _ = setup
    real = jax.eval_shape(lambda: quantize_params(model.params))
    shapes = abstract_quantized(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params))
    assert jax.tree.structure(real) == jax.tree.structure(shapes)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(real)] == [(x.shape, x.dtype) for x in jax.tree.leaves(shapes)]
    assert sum(x.dtype == jnp.int8 for x in jax.tree.leaves(shapes)) >= 7  # q, k, v, o, gate, up, down at least
