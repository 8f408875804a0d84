"""Interactive multi-turn chat with a LLaVA.

    python -m llava_jax.chat --model-path DIR [--image-file PATH]

Type a message and press Enter; the answer streams as it is generated. Commands:
  /image PATH   attach an image to your next message (several may be attached)
  /reset        forget the conversation and its images
  /exit         quit (so does end of input)

The whole conversation is the prompt of each turn (rendered by the conversation template, images
where their markers are); the engine's length buckets keep it from recompiling at every turn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Generator

import numpy as np

from llava_jax.data.templates import IMAGE_MARKER
from llava_jax.generate import EXIT_BAD_INPUT, QUESTION_ERRORS, USER_ERRORS, add_model_flags, load_pipeline
from llava_jax.inference.pipeline import Pipeline
from llava_jax.inference.sampling import SamplingParams
from llava_jax.parallel import xla_flags


class ChatSession:
    """A conversation with a model: its turns, its images, and images waiting for the next message."""

    def __init__(self, pipe: Pipeline, params: SamplingParams):
        self.pipe, self.params = pipe, params
        self.reset()

    def reset(self) -> None:
        """Forget every turn and image."""
        self.turns: list[dict] = []
        self.images: list[np.ndarray] = []  # [H, W, 3] each, in marker order
        self.pending: list[np.ndarray] = []

    def add_image(self, path: str) -> None:
        """Load an image for the next message (ImageError names a bad file)."""
        self.pending.extend(self.pipe.load_images([path]))

    def ask(self, text: str) -> Generator[str, None, str]:
        """Stream the answer to `text` (with any pending images); returns the whole answer.

        On an error (e.g. the conversation outgrew the context) the turn is undone, pending images
        stay pending, and the error propagates.
        """
        value = f"{IMAGE_MARKER}\n" * len(self.pending) + text.replace(IMAGE_MARKER, "")
        turns = self.turns + [{"from": "human", "value": value}]
        images = self.images + self.pending
        prompt = self.pipe.prompt(turns, np.stack(images) if images else None, seed=self.params.seed + len(self.turns))
        stream = self.pipe.engine.stream(prompt, self.params)
        while True:
            try:
                delta = next(stream)
            except StopIteration as stop:
                completion = stop.value
                break
            yield delta.text
        answer = completion.text.strip()
        self.turns = turns + [{"from": "gpt", "value": answer}]
        self.images, self.pending = images, []
        return answer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m llava_jax.chat", description=__doc__.split("\n")[0])
    add_model_flags(p)
    p.add_argument("--image-file", "--image_file", action="append", default=[], help="image(s) for the first message")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=512)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: a read-eval-print loop over stdin; returns the exit status."""
    args = parse_args(argv)
    xla_flags.apply(not args.no_xla_flags)
    try:
        pipe = load_pipeline(args)
        params = pipe.sampling(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        chat = ChatSession(pipe, params)
        for path in args.image_file:
            chat.add_image(path)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    user, assistant = "USER", "ASSISTANT"
    while True:
        try:
            line = input(f"{user}: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            chat.reset()
            print("(conversation reset)")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                chat.add_image(path)
                print(f"(image {path} attached to your next message)")
            except QUESTION_ERRORS as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        print(f"{assistant}: ", end="", flush=True)
        try:
            for text in chat.ask(line):
                print(text, end="", flush=True)
            print()
        except QUESTION_ERRORS as e:
            print()
            print(f"error: {e} (use /reset to start over)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
