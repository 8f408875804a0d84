"""Continuous batching: a fixed set of decode slots that requests join and leave while the others decode.

    slots = SlotEngine(engine, max_batch=8)
    slots.start()
    handle = slots.submit(prompt, params)        # any thread
    for delta in handle: print(delta.text, end="")
    completion = handle.result()

The state is one `DecodeState` of `max_batch` rows over a cache as long as the context (`max_len`
slots), whose rows are independent (engine.py): a request is prefilled alone (`prefill_step`, its
own bucketed prompt length, exactly the program `Engine.generate` runs for it), then `insert`ed
into a free row while the other rows keep their place, and decoded by the same `decode_loop` as
`Engine.generate`, `steps_per_call` steps per dispatch. Between dispatches the scheduler thread
reads the new tokens, streams them as `Delta`s (stop strings held back and cut as `Engine.stream`
does), marks rows that met a stop string or were cancelled as done, frees finished rows and admits
waiting requests: JetStream's prefill / insert / generate, on one thread.

Nothing recompiles in steady serving: the decode programs (two: all-greedy rows, or some rows
sampling) and `insert` have fixed shapes, and a prefill compiles once per prompt-length bucket and
image-slot bucket (`Engine.prepare`), greedy or not; `stats()["compiles"]` counts them.

A greedy answer does not depend on what else is running: rows never mix, and the prefill is the
one `Engine.generate` runs for the prompt alone.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.inference.engine import (
    MAX_END_IDS,
    Completion,
    DecodeState,
    Delta,
    DeltaMaker,
    Engine,
    Prompt,
    decode_loop,
    insert,
    prefill_step,
)
from llava_jax.inference.sampling import SamplingParams
from llava_jax.models.llama import init_cache

STEPS_PER_CALL = 4  # decode steps per dispatch: a new request waits at most this many steps to join


@dataclasses.dataclass
class Finished:
    """The last event of a request: its Completion (finish_reason "eos", "stop", "length" or "cancelled")."""

    completion: Completion


Listener = Callable[[Any], None]  # gets each Delta, then one Finished; called on the engine thread


class Handle:
    """A submitted request: iterate it for its Deltas, `result()` for its Completion, `cancel()` to drop it.

    Times are `time.monotonic()`: `submit_time`, `first_token_time` (its first token exists), `finish_time`.
    """

    def __init__(self, request_id: int, prompt: Prompt, params: SamplingParams, listener: Listener | None):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.prompt_tokens = len(prompt.ids)
        self.listener = listener
        self.submit_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.completion: Completion | None = None
        self.cancelled = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Drop the request (a client that went away): its slot is freed at the next step boundary, and it
        finishes with finish_reason "cancelled". Thread-safe; nothing happens once it has finished."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Delta]:
        """The request's Deltas as they come (blocking), until it finishes."""
        while True:
            event = self._events.get()
            if isinstance(event, Finished):
                return
            yield event

    def result(self, timeout: float | None = None) -> Completion:
        """The Completion, once the request has finished (TimeoutError after `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        return self.completion

    @property
    def done(self) -> bool:
        """Whether the request has finished (its Finished event was sent)."""
        return self._done.is_set()

    def _emit(self, event: Any) -> None:
        if isinstance(event, Finished):
            self.completion = event.completion
            self.finish_time = time.monotonic()
        elif self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if self.listener is not None:
            self.listener(event)
        self._events.put(event)
        if isinstance(event, Finished):
            self._done.set()


@dataclasses.dataclass
class _Slot:
    """A busy row: its request, the tokens already streamed and the stream's text state."""

    handle: Handle
    deltas: DeltaMaker
    emitted: int = 0  # tokens turned into Deltas so far
    stopped: bool = False  # a stop string appeared (the row is marked done on the device)


class SlotEngine:
    """Serve requests by continuous batching on an `Engine` (module docstring).

    Args:
      engine: the model, tokenizer and devices (`Pipeline.engine`); without a tokenizer, answers are ids only
        (no text, no stop strings).
      max_batch: decode slots: requests decoding at once; more wait in a queue.
      max_len: cache slots of a row, prompt and answer (default the engine's `max_context`).
      steps_per_call: decode steps per dispatch between the scheduler's checks.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_len: int | None = None,
                 steps_per_call: int = STEPS_PER_CALL):
        if max_batch < 1 or steps_per_call < 1:
            raise ValueError(f"max_batch and steps_per_call must be >= 1; got {max_batch}, {steps_per_call}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_len = int(max_len or engine.max_context)
        if self.max_len > engine.max_context:
            raise ValueError(f"max_len {self.max_len} is longer than the engine's context {engine.max_context}")
        self.steps_per_call = steps_per_call
        self._state = self._empty_state()
        self._finish = np.zeros((max_batch,), bool)  # rows freed on the host, to be ended on the device
        self._slots: list[_Slot | None] = [None] * max_batch
        self._queue: collections.deque[Handle] = collections.deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._running = False
        self._drain = True
        self._failure: BaseException | None = None
        self.generated_tokens = 0
        self.requests = 0
        self._compiles0 = self._compiled()

    # -- the device state ------------------------------------------------------------------------

    def _empty_state(self) -> DecodeState:
        """Every row free (done), the cache zeros: `max_batch` rows of `max_len` slots."""
        e, b, s = self.engine, self.max_batch, self.max_len
        if e.mesh is None:
            cache = init_cache(e.config.text, b, s, e.dtype)
        else:  # the cache made in place, split as the engine's programs split it
            import flax.linen as nn
            from jax.sharding import NamedSharding

            from llava_jax.inference.engine import CACHE_AXES

            split = NamedSharding(e.mesh, nn.logical_to_mesh_axes(CACHE_AXES, e.rules))
            cache = jax.jit(lambda: init_cache(e.config.text, b, s, e.dtype), out_shardings={"k": split, "v": split})()
        zeros = lambda dtype: jnp.zeros((b,), dtype)  # noqa: E731
        return DecodeState(
            cache=cache,
            kv_mask=jnp.zeros((b, s), jnp.int32),
            tokens=jnp.full((b, s), e.config.text.pad_token_id, jnp.int32),
            logprobs=jnp.zeros((b, s), jnp.float32),
            positions=zeros(jnp.int32),
            done=jnp.ones((b,), jnp.bool_),
            step=zeros(jnp.int32),
            seeds=zeros(jnp.uint32),
            limits=zeros(jnp.int32),
            base=zeros(jnp.int32),
            warp=SamplingParams().warp_args(b),
            end_ids=jnp.full((b, MAX_END_IDS), -1, jnp.int32),
        )

    @staticmethod
    def _compiled() -> int:
        return prefill_step._cache_size() + decode_loop._cache_size() + insert._cache_size()

    # -- the client side -------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether `submit` takes requests (False once `stop` was called)."""
        return self._accepting

    def submit(self, prompt: Prompt, params: SamplingParams, listener: Listener | None = None) -> Handle:
        """Queue a request; returns its Handle at once. Thread-safe.

        Raises InputError (the prompt cannot run: too long, images not matching) or RuntimeError (shutting down)
        before anything is queued. `listener`, if given, gets each Delta and then a Finished on the engine
        thread: it must not block.
        """
        self.engine.check(prompt, max_context=self.max_len)
        if params.stop_strings:
            self.engine._require_tokenizer("stop strings")
        with self._lock:
            if not self._accepting:
                raise RuntimeError("the server is shutting down and takes no new requests")
            if self._failure is not None:
                raise RuntimeError(f"the engine stopped on an error: {self._failure!r}")
            handle = Handle(next(self._ids), prompt, params, listener)
            self._queue.append(handle)
            self._lock.notify_all()
        return handle

    def stats(self) -> dict[str, int]:
        """Queue length, busy slots, totals of generated tokens and finished requests, programs compiled."""
        with self._lock:
            return {"queued": len(self._queue), "busy": sum(s is not None for s in self._slots),
                    "max_batch": self.max_batch, "generated_tokens": self.generated_tokens,
                    "requests": self.requests, "compiles": self._compiled() - self._compiles0}

    # -- running ---------------------------------------------------------------------------------

    def start(self) -> "SlotEngine":
        """Start the scheduler thread (a daemon); returns self."""
        with self._lock:
            if self._thread is not None:
                return self
            self._running = True
            self._thread = threading.Thread(target=self._run, name="llava-slots", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish the running and queued ones first, else cancel them.
        Blocks until the scheduler thread has ended (or `timeout` seconds)."""
        with self._lock:
            self._accepting = False
            self._drain = drain
            self._running = False
            if not drain:
                for h in list(self._queue) + [s.handle for s in self._slots if s is not None]:
                    h.cancel()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def warmup(self, prompt: Prompt | None = None) -> None:
        """Compile what serving runs (a prefill of a short prompt, insert, both decode programs) by serving one
        greedy and one sampled request of a few tokens; blocks. Starts the thread if needed."""
        self.start()
        e = self.engine
        prompt = prompt or Prompt(np.asarray([e.config.text.bos_token_id], np.int32))
        for params in (SamplingParams(max_new_tokens=2, ignore_eos=True),
                       SamplingParams(temperature=1.0, max_new_tokens=2, ignore_eos=True)):
            self.submit(prompt, params).result()

    def step(self) -> bool:
        """One round of the scheduler: admit waiting requests into free slots, decode `steps_per_call` steps, stream
        and retire. Returns whether anything is running or waiting. (The thread calls it; tests may too.)"""
        self._admit()
        busy = [i for i, s in enumerate(self._slots) if s is not None]
        if busy:
            greedy = all(self._slots[i].handle.params.greedy for i in busy)
            e = self.engine
            self._state = e.decode_steps(self._state, greedy=greedy, stop_at=self.max_len,
                                         max_steps=self.steps_per_call, finish=self._finish)
            self._finish = np.zeros((self.max_batch,), bool)
            self._collect()
        with self._lock:
            return bool(self._queue) or any(s is not None for s in self._slots)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while self._running and not self._queue and all(s is None for s in self._slots):
                        self._lock.wait()
                    if not self._running and not (self._drain and (self._queue or any(self._slots))):
                        if any(self._slots) or self._queue:
                            self._cancel_all()
                        return
                self.step()
        except BaseException as error:  # noqa: BLE001 - every waiting client must hear of it
            self._failure = error
            self._accepting = False
            raise
        finally:
            if self._failure is not None:
                self._cancel_all()

    def _cancel_all(self) -> None:
        """Finish every queued and running request as cancelled (shutdown without drain, or an engine failure)."""
        with self._lock:
            waiting, self._queue = list(self._queue), collections.deque()
        for h in waiting:
            self._finish_handle(h, self.engine.complete(h.prompt.ids, [], [], h.params, "cancelled"))
        for i, slot in enumerate(self._slots):
            if slot is not None:
                self._retire(i, "cancelled")

    # -- the scheduler's parts (engine thread only) ----------------------------------------------

    def _admit(self) -> None:
        """Prefill waiting requests alone and insert each into a free slot."""
        while True:
            with self._lock:
                free = [i for i, s in enumerate(self._slots) if s is None]
                if not free or not self._queue:
                    return
                handle = self._queue.popleft()
            if handle.cancelled.is_set():
                self._finish_handle(handle, self.engine.complete(handle.prompt.ids, [], [], handle.params,
                                                                 "cancelled"))
                continue
            self._insert(handle, free[0])

    def _insert(self, handle: Handle, slot: int) -> None:
        e, params = self.engine, handle.params
        batch = e.prepare([handle.prompt], params, batch_size=1)
        batch.limits = np.minimum(batch.limits, self.max_len - len(handle.prompt.ids)).astype(np.int32)
        # One prefill program per prompt bucket whatever the sampler (a greedy row takes its argmax in it).
        prefix = e.prefill(batch, params, num_new=self.max_len, window=0, greedy=False)
        pad = batch.ids.shape[1] - len(handle.prompt.ids)
        with e._on_mesh():
            self._state = insert(self._state, prefix, jnp.int32(slot), jnp.int32(pad), rules=e.rules)
        self._finish[slot] = False  # a row freed since the last decode call is this request's now
        self._slots[slot] = _Slot(handle, DeltaMaker(e, params))
        # The first token came with the prefill: stream it now (its time is the request's time to first token).
        self._collect(rows=[slot])

    def _collect(self, rows: list[int] | None = None) -> None:
        """Stream the new tokens of busy rows; mark stop strings and cancellations done; retire finished rows."""
        rows = [i for i, s in enumerate(self._slots) if s is not None] if rows is None else rows
        tokens, logprobs, steps, done = (np.asarray(x) for x in jax.device_get(
            (self._state.tokens, self._state.logprobs, self._state.step, self._state.done)))
        newly_done = np.zeros((self.max_batch,), bool)
        for i in rows:
            slot = self._slots[i]
            if slot.handle.cancelled.is_set():
                newly_done[i] = not done[i]
                self._retire(i, "cancelled", tokens[i, : slot.emitted], logprobs[i])
                continue
            end = int(steps[i])
            while slot.emitted < end and not slot.stopped:
                j = slot.emitted
                delta = slot.deltas.push(int(tokens[i, j]), float(logprobs[i, j]), last=bool(done[i]) and j == end - 1)
                slot.emitted += 1
                slot.stopped = slot.deltas.stopped
                self.generated_tokens += 1
                slot.handle._emit(delta)
            if slot.stopped or done[i]:
                newly_done[i] = not done[i]
                self._retire(i, None, tokens[i, : slot.emitted], logprobs[i])
        self._finish |= newly_done  # the device ends these rows at the start of the next decode call

    def _retire(self, i: int, reason: str | None, tokens: Any = (), logprobs: Any = ()) -> None:
        slot = self._slots[i]
        self._slots[i] = None
        h = slot.handle
        completion = self.engine.complete(h.prompt.ids, list(tokens), list(logprobs), h.params, reason or "length")
        if reason == "cancelled":
            completion.finish_reason = "cancelled"
        self._finish_handle(h, completion)

    def _finish_handle(self, handle: Handle, completion: Completion) -> None:
        with self._lock:
            self.requests += 1
        handle._emit(Finished(completion))
