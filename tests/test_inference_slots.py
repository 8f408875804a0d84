"""The slot engine (continuous batching): requests that join a running batch at any time get exactly the answer
`Engine.generate` gives each alone; slots free at once; steady serving compiles nothing; stop drains."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from llava_jax import load_pretrained
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.inference.engine import Engine, InputError, Prompt
from llava_jax.inference.sampling import SamplingParams
from llava_jax.inference.slots import Finished, SlotEngine
from tests._inference import IMAGE_SIZE, IMAGE_TOKEN, NUM_IMAGE_TOKENS, SPM_VOCAB, make_model_dir
from tests._seeds import fresh_seed

MAX_BATCH = 3


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path, _ = make_model_dir(str(tmp_path_factory.mktemp("model")), seed=3)
    return Engine(load_pretrained(path), Tokenizer.from_pretrained(path))


@pytest.fixture(scope="module")
def slots(engine):
    s = SlotEngine(engine, max_batch=MAX_BATCH, steps_per_call=3).start()
    yield s
    s.stop(drain=False, timeout=60)


def _prompt(rng: np.random.Generator, images: int, text_len: int, seed: int | None = None) -> Prompt:
    ids = [1] + list(rng.integers(3, SPM_VOCAB, 3))
    for _ in range(images):
        ids += [IMAGE_TOKEN] * NUM_IMAGE_TOKENS + list(rng.integers(3, SPM_VOCAB, 2))
    ids += list(rng.integers(3, SPM_VOCAB, text_len))
    pixels = rng.standard_normal((images, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32) if images else None
    return Prompt(np.asarray(ids, np.int32), pixels, seed)


def _requests(seed: int) -> list[tuple[Prompt, SamplingParams]]:
    """Prompts with and without an image, of different lengths, budgets and samplers: more than the slots hold
    (one prompt bucket, so that the test compiles little)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(6):
        sampled = i in (2, 5)
        params = SamplingParams(temperature=1.2 if sampled else 0.0, top_p=0.9, max_new_tokens=int(rng.integers(3, 14)),
                                ignore_eos=i % 2 == 0)
        out.append((_prompt(rng, i % 2, int(rng.integers(2, 16)), seed=int(rng.integers(1000))), params))
    return out


@pytest.mark.slow(seconds=15)
def test_requests_joining_a_running_batch_equal_generate_alone(engine, slots):
    seed = fresh_seed()
    requests = _requests(seed)
    alone = [engine.generate([p], params)[0] for p, params in requests]
    # The first request decodes alone; each of the others is submitted from the stream of the one before,
    # so that requests join (and leave) a batch that is decoding.
    handles, deltas = [], [[] for _ in requests]

    def submit(k: int) -> None:
        fired = threading.Event()

        def listener(event):
            if isinstance(event, Finished):
                return
            deltas[k].append(event)
            if k + 1 < len(requests) and not fired.is_set() and len(deltas[k]) >= 2:
                fired.set()
                submit(k + 1)

        handles.append(slots.submit(*requests[k], listener=listener))

    submit(0)
    for k in range(len(requests)):
        while len(handles) <= k:  # a request too short to fire its successor: submit it now
            handles[-1].result(timeout=120)
            if len(handles) <= k:
                submit(len(handles))
        got, want = handles[k].result(timeout=120), alone[k]
        assert got.token_ids == want.token_ids, f"request {k} (seed {seed})"
        assert got.text == want.text and got.finish_reason == want.finish_reason, f"request {k} (seed {seed})"
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert "".join(d.text for d in deltas[k]) == want.text
    stats = slots.stats()
    assert stats["busy"] == 0 and stats["queued"] == 0


def test_stop_strings_and_cancel_free_their_slot(engine, slots):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    p = _prompt(rng, 1, 5)
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    full = engine.generate([p], greedy)[0]
    text = full.text
    # A stop string from inside the answer (the one nearest its middle): two characters, not blank, first
    # occurring there, after at least one character of answer.
    middle = len(text) // 2
    at = min((i for i in range(1, len(text) - 1) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i),
             key=lambda i: abs(i - middle))
    stop = text[at:at + 2]
    params = dataclasses.replace(greedy, stop_strings=(stop,))
    want = engine.generate([p], params)[0]
    handle = slots.submit(p, params)
    streamed = "".join(d.text for d in handle)
    got = handle.result(timeout=60)
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    assert streamed == want.text

    # A long request cancelled after its first tokens finishes as cancelled and frees its slot at once.
    long = slots.submit(p, SamplingParams(max_new_tokens=200, ignore_eos=True))
    it = iter(long)
    next(it)
    long.cancel()
    assert long.result(timeout=60).finish_reason == "cancelled"
    assert len(long.result().token_ids) < 200
    assert slots.stats()["busy"] == 0
    assert slots.submit(p, greedy).result(timeout=60).token_ids == full.token_ids


@pytest.mark.slow(seconds=6)
def test_steady_serving_compiles_nothing_and_stop_drains(engine):
    slots = SlotEngine(engine, max_batch=2, steps_per_call=2).start()
    rng = np.random.default_rng(fresh_seed())
    slots.warmup()
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    first = [slots.submit(_prompt(rng, 1, n), params) for n in (3, 9, 15)]  # one prompt bucket
    [h.result(timeout=60) for h in first]
    compiled = slots.stats()["compiles"]
    again = [slots.submit(_prompt(rng, 1, n), dataclasses.replace(params, temperature=t))
             for n, t in ((4, 0.0), (12, 0.8), (6, 0.0), (14, 1.0))]
    [h.result(timeout=60) for h in again]
    assert slots.stats()["compiles"] == compiled
    with pytest.raises(InputError, match="context"):
        slots.submit(Prompt(np.ones((slots.max_len,), np.int32)), params)
    # stop(drain=True): what was queued still finishes, whole; nothing new is taken.
    queued = [slots.submit(_prompt(rng, 0, n), params) for n in (5, 6, 7)]
    slots.stop(drain=True, timeout=60)
    assert [len(h.result(timeout=1).token_ids) for h in queued] == [5, 5, 5]
    with pytest.raises(RuntimeError, match="shutting down"):
        slots.submit(_prompt(rng, 0, 5), params)
