"""Interactive multi-turn chat with a LLaVA.

    python -m llava_jax.chat --model-path DIR [--image-file PATH] [--video-file PATH]

Type a message and press Enter; the answer streams as it is generated. Commands (any case, never
sent to the model; an unknown /word is refused, a path such as /usr/... is a message):
{commands}

The whole conversation is the prompt of each turn (`llava_jax.inference.chat.ChatSession`).
"""

from __future__ import annotations

import argparse
import sys

from llava_jax import cli
from llava_jax.inference.chat import ChatSession, commands_help
from llava_jax.inference.flags import (
    EXIT_BAD_INPUT,
    USER_ERRORS,
    add_model_flags,
    add_sampling_flags,
    load_pipeline,
    sampling_from_args,
)

__doc__ = __doc__.format(commands=commands_help())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m llava_jax.chat",
        description=__doc__.split("\n\n")[0],
        epilog="commands in the chat:\n" + commands_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(p)
    add_sampling_flags(p)
    p.add_argument("--image-file", "--image_file", action="append", default=[], help="image(s) for the first message")
    p.add_argument("--video-file", "--video_file", action="append", default=[],
                   help="video(s) for the first message (OneVision, NeXT-Video)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=512)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: a read-eval-print loop over stdin; returns the exit status."""
    args = parse_args(argv)
    try:
        pipe = load_pipeline(args)
        chat = ChatSession(pipe, sampling_from_args(pipe, args), num_frames=args.num_frames)
        for path in args.image_file:
            chat.add_image(path)
        for path in args.video_file:
            chat.add_video(path)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("commands:\n" + commands_help(), flush=True)
    while True:
        try:
            line = input("USER: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        action = chat.handle(line)
        if action.kind == "exit":
            return 0
        if action.kind == "say":
            if action.text:
                print(action.text)
        elif action.kind == "error":
            print(f"error: {action.text}", file=sys.stderr)
        else:
            print("ASSISTANT: ", end="", flush=True)
            try:
                for text in chat.ask(action.text):
                    print(text, end="", flush=True)
                print()
            except BrokenPipeError:  # the reader of stdout left: not the model's error (cli.exit_with)
                raise
            except (ValueError, KeyError, TypeError, OSError) as e:
                print()
                print(f"error: {e} (use /reset to start over)", file=sys.stderr)


if __name__ == "__main__":
    cli.exit_with(main)
