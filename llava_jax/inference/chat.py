"""A multi-turn conversation with a model, and the commands an interactive chat understands.

`ChatSession` keeps the turns and images; each message renders the whole conversation as the
prompt (images where their markers are), and the engine's length buckets keep a growing chat from
recompiling at every turn. `ChatSession.handle` turns one typed line into what to do: a command
(`/image`, `/video`, `/reset`, `/help`, `/exit`, in any case) is done here and never reaches the model.

A line is a command when its first word is "/" and letters (`/exit`, `/EXIT`, `/bogus`): an
unknown one is refused, so that a mistyped command is not sent as a message. A message may still
start with "/": a path (`/usr/share/cat.png ...`, its first word has a second "/") is a message,
and "//" sends the rest of the line after one "/" (`//exit` sends "/exit").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Generator

import numpy as np
import PIL.Image

from llava_jax.data.image import load_image
from llava_jax.data.templates import IMAGE_MARKER, VIDEO_MARKER
from llava_jax.inference.pipeline import Pipeline
from llava_jax.inference.sampling import SamplingParams

COMMANDS = (
    ("/image PATH", "attach an image to your next message (several may be attached)"),
    ("/video PATH", "attach a video to your next message (OneVision, NeXT-Video)"),
    ("/reset", "forget the conversation and its images"),
    ("/help", "list these commands"),
    ("/exit", "quit (so does end of input, Ctrl-D)"),
    ("//TEXT", "send /TEXT as a message (commands are case-insensitive; other /words are refused)"),
)
# The first word of a command line: "/" and letters ("/?" is help's short form). A word with a second
# "/" (a path) is not one.
_COMMAND_WORD = re.compile(r"/(?:[A-Za-z]+|\?)")


def commands_help() -> str:
    """The command list, one command a line."""
    width = max(len(name) for name, _ in COMMANDS)
    return "\n".join(f"  {name.ljust(width)}  {text}" for name, text in COMMANDS)


@dataclasses.dataclass
class Action:
    """What a typed line asks for.

    Attributes:
      kind: "ask" (send `text` to the model), "say" (print `text`), "error" (print `text` as an
        error) or "exit".
      text: the message to send, or what to print.
    """

    kind: str
    text: str = ""


class ChatSession:
    """A conversation with a model: its turns, its images, and images waiting for the next message."""

    def __init__(self, pipe: Pipeline, params: SamplingParams, num_frames: int | None = None):
        self.pipe, self.params, self.num_frames = pipe, params, num_frames
        self.reset()

    def reset(self) -> None:
        """Forget every turn, image and video."""
        self.turns: list[dict] = []
        # The conversation's images as loaded, in marker order: preprocessed together for each prompt, since
        # OneVision tiles a lone image but not one of several.
        self.images: list[PIL.Image.Image] = []
        self.pending: list[PIL.Image.Image] = []
        self.videos: list[np.ndarray] = []  # preprocessed frames, in marker order
        self.pending_videos: list[np.ndarray] = []

    def add_image(self, path: str) -> None:
        """Load an image for the next message (ImageError names a bad file)."""
        self.pending.append(load_image(path))

    def add_video(self, path: str) -> None:
        """Load a video for the next message (VideoError names a bad file; InputError: the model takes none)."""
        self.pending_videos += self.pipe.load_videos([path], self.num_frames)

    def handle(self, line: str) -> Action:
        """A typed line -> what to do; commands are carried out here (an empty line asks nothing)."""
        line = line.strip()
        if not line:
            return Action("say")
        word, rest = (line.split(None, 1) + [""])[:2]
        if line.startswith("//"):  # the escape: a message that starts with "/"
            return Action("ask", line[1:])
        if not _COMMAND_WORD.fullmatch(word):
            return Action("ask", line)
        command = word.lower()
        if command in ("/exit", "/quit"):
            return Action("exit")
        if command in ("/help", "/?"):
            return Action("say", "commands:\n" + commands_help())
        if command == "/reset":
            self.reset()
            return Action("say", "(conversation reset)")
        if command in ("/image", "/video"):
            path, what = rest.strip(), command[1:]
            if not path:
                return Action("error", f"{command} needs a file: {command} PATH")
            try:
                self.add_image(path) if what == "image" else self.add_video(path)
            except (OSError, ValueError) as e:
                return Action("error", str(e))
            return Action("say", f"({what} {path} attached to your next message)")
        return Action("error", f"unknown command {word}, /help lists them (// sends a message starting with /)")

    def ask(self, text: str) -> Generator[str, None, str]:
        """Stream the answer to `text` (with any pending images); returns the whole answer.

        On an error (e.g. the conversation outgrew the context) the turn is undone, pending images
        stay pending, and the error propagates.
        """
        value = (f"{VIDEO_MARKER}\n" * len(self.pending_videos) + f"{IMAGE_MARKER}\n" * len(self.pending)
                 + text.replace(IMAGE_MARKER, "").replace(VIDEO_MARKER, ""))
        turns = self.turns + [{"from": "human", "value": value}]
        images, videos = self.images + self.pending, self.videos + self.pending_videos
        prompt = self.pipe.prompt(turns, self.pipe.preprocess(images), seed=self.params.seed + len(self.turns),
                                  videos=videos)
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
        self.videos, self.pending_videos = videos, []
        return answer
