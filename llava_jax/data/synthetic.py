"""A synthetic LLaVA dataset: coloured shapes, questions that can only be answered by looking.

`build(out_dir)` writes, in LLaVA's own data format (so the real code path reads it):

    out_dir/images/train_00000.png ...   images of 1-4 identical shapes on a dark background
    out_dir/stage1.json                  captions, like blip_laion_cc_sbu_558k.json (template `plain`)
    out_dir/stage2.json                  multi-turn Q/A like llava_v1_5_mix665k.json (template
                                         `vicuna_v1`), plus some text-only records (like ShareGPT)
    out_dir/val.json                     held-out images, one question per record, each with the
                                         machine-readable fields "answer" and "qtype" for `score`
    out_dir/tokenizer.model              a small LLaMA-like sentencepiece model trained on the text
    out_dir/manifest.json                written last: a complete build for these arguments

Questions are about colour, shape, count and (for a single object) position; answers are one word
from a small closed set, balanced by construction, so that held-out accuracy is easy to score and a
tiny model trained from scratch can learn the task (objects are big, clean and well separated).
Stage 2 asks every image where its objects are (position, or for two or three objects a training-only
question answered with their quadrants), since that is what a frozen tower's features make hardest.

With `SceneConfig.sizes` (the LLaVA-NeXT variant, `--sizes`), each image takes one of the given
(height, width) sizes, wide, tall and square, and objects sit at fractions of its width and height:
the images anyres tiles differently, where left/right/top/bottom are exactly what tiling helps read.

Example:
    python -m llava_jax.data.synthetic --out-dir /tmp/shapes --num-train 2000 --num-val 200
    python -m llava_jax.data.synthetic --out-dir /tmp/shapes_next --image-size 28 --sizes 28x56,56x28,56x56,42x84
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava_jax import paths

# Bump when the generated content changes, so that cached builds are redone.
SYNTHETIC_VERSION = 3

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
# Object centre as a fraction of the image side, for single-object images.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# Quadrant centres used when there are several objects: never overlapping.
QUADRANTS = ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73))
QUADRANT_NAMES = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (24, 24, 24)
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
QTYPES = ("color", "shape", "count", "position")

# Count-neutral phrasings: a question must not give away the answer to another one.
QUESTIONS = {
    "color": ("What color are the shapes?", "Which color do you see?", "Name the color of the shapes.",
              "What is the color of the objects in the image?"),
    "shape": ("What shape is drawn?", "Which shape do you see?", "Name the shape in the image.",
              "What kind of shape is shown?"),
    "count": ("How many shapes are there?", "How many objects do you see?", "Count the shapes.",
              "What is the number of shapes in the image?"),
    "position": ("Where is the shape?", "Where is the object located?",
                 "In which part of the image is the shape?"),
}
# Stage-2 training only (never held out): where several objects are, answered with their quadrants
# ("top left and bottom right"). See `build` for why stage 2 needs them.
QUADRANT_QUESTIONS = ("Where are the shapes?", "Where are the objects located?",
                      "In which parts of the image are the shapes?")
# A few of the prompts LLaVA pairs with BLIP captions in blip_laion_cc_sbu_558k.json.
CAPTION_PROMPTS = (
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Share a concise interpretation of the image provided.", "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
)
# Text that the templates add around conversations: trained into the tokenizer so that it is compact.
TEMPLATE_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: Answer the question using a single word or phrase.",
)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """What images may show. Defaults keep the task learnable by a tiny model in minutes."""

    image_size: int = 56
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    max_count: int = 4
    positions: tuple[str, ...] = tuple(POSITIONS)
    object_scale: float = 0.36  # object diameter / image side
    # (height, width) sizes drawn uniformly per image (LLaVA-NeXT's varied sizes); empty: image_size square.
    sizes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple((int(h), int(w)) for h, w in self.sizes))
        if any(min(s) < 8 for s in self.sizes):
            raise ValueError(f"image sizes {self.sizes} must be at least 8 pixels a side")
        unknown = [s for s in self.shapes if s not in SHAPES] + [c for c in self.colors if c not in COLORS]
        unknown += [p for p in self.positions if p not in POSITIONS]
        if unknown:
            raise ValueError(f"unknown shapes/colors/positions {unknown}; known: {SHAPES}, "
                             f"{tuple(COLORS)}, {tuple(POSITIONS)}")
        if not 1 <= self.max_count <= len(QUADRANTS):
            raise ValueError(f"max_count must be in 1..{len(QUADRANTS)}, found {self.max_count}")


@dataclasses.dataclass(frozen=True)
class Scene:
    """One image's content: `count` identical objects; `position` is set only when count == 1."""

    shape: str
    color: str
    count: int
    position: str | None
    centers: tuple[tuple[float, float], ...]  # pixels
    radius: float  # pixels
    quadrants: tuple[str, ...] = ()  # QUADRANT_NAMES of the objects when count > 1

    def answers(self) -> dict[str, str]:
        """The answer to each question type that applies to this scene."""
        out = {"color": self.color, "shape": self.shape, "count": str(self.count)}
        if self.position is not None:
            out["position"] = self.position
        return out

    def description(self) -> str:
        """A short caption, e.g. 'a red circle on the left' or 'two blue squares at the top left and
        the bottom right'.

        Where the objects are is said for every image, not only for single objects: it is the one
        thing that depends on which image tokens hold an object, and captions (short, cheap to
        train on) are where a model from scratch learns it.
        """
        if self.count == 1:
            return f"a {self.color} {self.shape} {POSITION_PHRASES[self.position]}"
        word = next(w for w, d in NUMBER_WORDS.items() if d == str(self.count))
        text = f"{word} {self.color} {self.shape}s"
        if self.quadrants and len(self.quadrants) < len(QUADRANTS):
            places = [f"the {q}" for q in self.quadrants]
            text += f" at {', '.join(places[:-1])} and {places[-1]}"
        return text

    def quadrant_answer(self) -> str | None:
        """Where several objects are, e.g. 'top left and bottom right'; None for one object, or for four
        (they fill every quadrant, so the answer would not depend on the image)."""
        if not self.quadrants or len(self.quadrants) == len(QUADRANTS):
            return None
        return f"{', '.join(self.quadrants[:-1])} and {self.quadrants[-1]}"


def sample_scene(rng: np.random.Generator, cfg: SceneConfig, size: tuple[int, int] | None = None) -> Scene:
    """Draws a scene with uniform count, shape, colour and (single object) position.

    `size` (height, width): the image it is drawn on (default: image_size square); objects scale with
    its shorter side and sit at fractions of each side.
    """
    height, width = size or (cfg.image_size, cfg.image_size)
    size = min(height, width)
    count = int(rng.integers(1, cfg.max_count + 1))
    shape = cfg.shapes[rng.integers(len(cfg.shapes))]
    color = cfg.colors[rng.integers(len(cfg.colors))]
    radius = 0.5 * cfg.object_scale * size * rng.uniform(0.9, 1.1)
    jitter = rng.uniform(-0.03, 0.03, size=(count, 2)) * size
    if count == 1:
        position = cfg.positions[rng.integers(len(cfg.positions))]
        fractions, quadrants = [POSITIONS[position]], ()
    else:
        position = None
        chosen = sorted(int(q) for q in rng.choice(len(QUADRANTS), count, replace=False))
        fractions = [QUADRANTS[q] for q in chosen]
        quadrants = tuple(QUADRANT_NAMES[q] for q in chosen)
        radius *= 0.95  # quadrants are a little tighter than the single-object positions
    centers = tuple((fx * width + jx, fy * height + jy) for (fx, fy), (jx, jy) in zip(fractions, jitter))
    return Scene(shape, color, count, position, centers, float(radius), quadrants)


def draw_scene(scene: Scene, image_size: int | tuple[int, int]) -> Image.Image:
    """Renders a scene as an RGB image of side `image_size`, or (height, width) (no anti-aliasing: clean edges)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill, r = COLORS[scene.color], scene.radius
    for cx, cy in scene.centers:
        if scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif scene.shape == "square":
            s = 0.85 * r  # same visual area as the circle, roughly
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
        else:
            raise ValueError(f"unknown shape {scene.shape!r}")
    return img


def _with_marker(rng: np.random.Generator, text: str) -> str:
    # Both placements occur in LLaVA's data; the templates move the marker to the front.
    return f"<image>\n{text}" if rng.random() < 0.5 else f"{text}\n<image>"


def _caption(rng: np.random.Generator, scene: Scene) -> str:
    d = scene.description()
    forms = (f"{d}.", f"there is {d}." if scene.count == 1 else f"there are {d}.",
             f"an image of {d}.", f"{d} on a dark background.")
    text = forms[rng.integers(len(forms))]
    return text[0].upper() + text[1:]


def _qa_turns(questions: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for q, a in questions:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


def _text_only_qa(rng: np.random.Generator) -> tuple[str, str]:
    kind = rng.integers(3)
    if kind == 0:
        a, b = (int(x) for x in rng.integers(0, 5, size=2))
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        shape = ("triangle", "square")[rng.integers(2)]
        return f"How many sides does a {shape} have?", {"triangle": "3", "square": "4"}[shape]
    pos = ("left", "right", "top", "bottom")[rng.integers(4)]
    return f"What is the opposite of {pos}?", {"left": "right", "right": "left", "top": "bottom",
                                                 "bottom": "top"}[pos]


def _save_png(img: Image.Image, path: str) -> None:
    # Atomic, like every file here: several processes (hosts) may build the same folder at once.
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    paths.atomic_write(path, buf.getvalue())


def _write_json(path: str, value: Any) -> None:
    paths.atomic_write(path, json.dumps(value, indent=1).encode())


def train_tokenizer(sentences: Iterable[str], vocab_size: int) -> bytes:
    """Trains a small LLaMA-like sentencepiece BPE model and returns its serialized bytes.

    Ids as in LLaMA: unk 0, bos 1, eos 2, no pad piece; digits split, unknown characters fall back
    to bytes, whitespace kept as is. Repeated sentences count: merges follow text frequency.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return model.getvalue()


def _build_args(num_train, num_val, image_size, seed, vocab_size, scene) -> dict[str, Any]:
    args = {"version": SYNTHETIC_VERSION, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "seed": seed, "vocab_size": vocab_size,
            "scene": dataclasses.asdict(scene)}
    return json.loads(json.dumps(args))  # as the manifest will read back (tuples become lists)


def _paths(out_dir: str) -> dict[str, str]:
    return {"out_dir": out_dir, "image_folder": os.path.join(out_dir, "images"),
            "stage1": os.path.join(out_dir, "stage1.json"), "stage2": os.path.join(out_dir, "stage2.json"),
            "val": os.path.join(out_dir, "val.json"), "tokenizer": os.path.join(out_dir, "tokenizer.model"),
            "manifest": os.path.join(out_dir, "manifest.json")}


def _is_complete(files: Mapping[str, str], args: Mapping[str, Any]) -> bool:
    try:
        manifest = json.loads(paths.read_text(files["manifest"]))
    except (OSError, ValueError):
        return False
    return manifest.get("args") == args and all(paths.exists(p) for p in files.values())


def build(out_dir: str | os.PathLike, *, num_train: int = 2000, num_val: int = 200, image_size: int = 56,
          seed: int = 0, vocab_size: int = 1024, scene: SceneConfig | None = None,
          sizes: Sequence[Sequence[int]] = ()) -> dict[str, str]:
    """Writes the synthetic dataset into `out_dir` (see the module docstring) and returns its paths.

    Deterministic in its arguments, and cached: if `out_dir` already holds a complete build for the
    same arguments (its manifest, written last, says so), returns at once.

    Args:
      out_dir: the folder to write (created if needed).
      num_train: training images; stage1.json and stage2.json each have one record per image, and
        stage2.json has num_train // 10 text-only records more.
      num_val: held-out images (disjoint from training); val.json has one record per question.
      image_size: image side in pixels.
      seed: seeds everything.
      vocab_size: target sentencepiece vocabulary size (a soft limit for a small corpus).
      scene: what the images may show; `image_size` overrides scene.image_size.
      sizes: (height, width) sizes to draw images at (the LLaVA-NeXT variant); when given, they override
        scene.sizes. Objects then scale with the shorter side, `image_size` is unused by the images.

    Returns:
      {"out_dir", "image_folder", "stage1", "stage2", "val", "tokenizer", "manifest"} -> path.
    """
    out_dir = paths.absolute(out_dir)
    scene_cfg = dataclasses.replace(scene or SceneConfig(), image_size=image_size)
    if sizes:
        scene_cfg = dataclasses.replace(scene_cfg, sizes=tuple(tuple(s) for s in sizes))
    files = _paths(out_dir)
    args = _build_args(num_train, num_val, image_size, seed, vocab_size, scene_cfg)
    if _is_complete(files, args):
        return files
    if paths.exists(files["manifest"]):
        # A build of ours for other arguments: drop its images so that none are left stale.
        paths.as_path(files["manifest"]).unlink()
        paths.rmtree(files["image_folder"])
    paths.makedirs(files["image_folder"])

    sentences: list[str] = list(TEMPLATE_TEXT)
    stage1, stage2, val = [], [], []
    train_rng = np.random.default_rng([seed, 0])
    # Sizes come from their own stream: without them every other draw is what it always was.
    size_rng = np.random.default_rng([seed, 4])
    draw_size = lambda: (scene_cfg.sizes[size_rng.integers(len(scene_cfg.sizes))]  # noqa: E731
                         if scene_cfg.sizes else (image_size, image_size))
    for i in range(num_train):
        size_i = draw_size()
        scene_i = sample_scene(train_rng, scene_cfg, size_i)
        name = f"train_{i:05d}.png"
        _save_png(draw_scene(scene_i, size_i), os.path.join(files["image_folder"], name))
        prompt = CAPTION_PROMPTS[train_rng.integers(len(CAPTION_PROMPTS))]
        caption = _caption(train_rng, scene_i)
        stage1.append({"id": f"cap_{i:05d}", "image": name, "conversations": [
            {"from": "human", "value": _with_marker(train_rng, prompt)}, {"from": "gpt", "value": caption}]})
        # Where objects are is what stage 2 struggles to learn: the stage-1 model reads it off which
        # image tokens hold an object, a reading that the new template's ~40 tokens in front of the
        # image do not leave intact, and the tower is frozen. So every image with a "where" answer
        # asks it (single objects: position; two or three: their quadrants, a training-only question),
        # about 4x the spatial supervision of the position questions alone.
        answers = scene_i.answers()
        qtypes = [qtype for qtype in QTYPES if qtype in answers]
        others = [q for q in (qtypes[k] for k in train_rng.permutation(len(qtypes))) if q != "position"]
        chosen = others[: train_rng.integers(2 - ("position" in answers), len(others) + 1)]
        qa = [(QUESTIONS[q][train_rng.integers(len(QUESTIONS[q]))], answers[q]) for q in chosen]
        where = scene_i.quadrant_answer()
        if "position" in answers:
            where_qa = (QUESTIONS["position"][train_rng.integers(len(QUESTIONS["position"]))], answers["position"])
        elif where is not None:
            where_qa = (QUADRANT_QUESTIONS[train_rng.integers(len(QUADRANT_QUESTIONS))], where)
        else:
            where_qa = None
        if where_qa is not None:
            qa.insert(int(train_rng.integers(len(qa) + 1)), where_qa)
        turns = _qa_turns(qa)
        turns[0]["value"] = _with_marker(train_rng, turns[0]["value"])
        stage2.append({"id": f"qa_{i:05d}", "image": name, "conversations": turns})
        # Template text weighs as much as in training, once per rendered conversation.
        sentences += [prompt, caption, TEMPLATE_TEXT[0], TEMPLATE_TEXT[2]]
        sentences += [t for pair in qa for t in pair]
    text_rng = np.random.default_rng([seed, 1])
    for i in range(num_train // 10):
        qa = [_text_only_qa(text_rng) for _ in range(text_rng.integers(1, 4))]
        stage2.append({"id": f"text_{i:05d}", "conversations": _qa_turns(qa)})
        sentences += [t for pair in qa for t in pair]
    # Text-only records sit among the image ones, as ShareGPT does in mix665k.
    stage2 = [stage2[k] for k in np.random.default_rng([seed, 2]).permutation(len(stage2))]
    val_rng = np.random.default_rng([seed, 3])
    for i in range(num_val):
        size_i = draw_size()
        scene_i = sample_scene(val_rng, scene_cfg, size_i)
        name = f"val_{i:05d}.png"
        _save_png(draw_scene(scene_i, size_i), os.path.join(files["image_folder"], name))
        for qtype, answer in scene_i.answers().items():
            q = QUESTIONS[qtype][val_rng.integers(len(QUESTIONS[qtype]))]
            val.append({"id": f"val_{i:05d}_{qtype}", "image": name, "qtype": qtype, "answer": answer,
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                          {"from": "gpt", "value": answer}]})
            sentences.append(q)

    _write_json(files["stage1"], stage1)
    _write_json(files["stage2"], stage2)
    _write_json(files["val"], val)
    paths.atomic_write(files["tokenizer"], train_tokenizer(sentences, vocab_size))
    _write_json(files["manifest"], {"args": args, "counts": {
        "train_images": num_train, "val_images": num_val, "stage1": len(stage1), "stage2": len(stage2),
        "val": len(val)}})
    return files


# ----------------------------------------------------------------------------- many images and video

MEDIA_VERSION = 2
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
MEDIA_QTYPES = ("frame", "count_images")
FRAME_QUESTIONS = ("Which frame shows the red square?", "In which frame is there a red square?",
                   "Which frame has the red square?")
DESCRIBE_FRAMES, DESCRIBE_IMAGES = "Describe each frame.", "Describe each image."
COUNT_IMAGES_QUESTIONS = ("How many images show a red shape?", "In how many of the images is the shape red?",
                          "Count the images with a red shape.")
# Always this many images to count over: a tiny model counts by how much of its attention lands on red tokens,
# a fraction that is a count only when the number of images is fixed.
COUNT_IMAGES = 3


# The template the tasks are meant for: `mistral_instruct` (no system prompt), so that a row is mostly its media
# and question (a few dozen tokens) and a tiny model trains on it in seconds.
MEDIA_TEMPLATE = "mistral_instruct"
MEDIA_TEMPLATE_TEXT = "[INST] [/INST]"


def _media_paths(out_dir: str) -> dict[str, str]:
    return {"out_dir": out_dir, "image_folder": out_dir, "train": os.path.join(out_dir, "train.json"),
            "val": os.path.join(out_dir, "val.json"), "tokenizer": os.path.join(out_dir, "tokenizer.model"),
            "manifest": os.path.join(out_dir, "manifest.json")}


def write_video(path: str, frames: np.ndarray, rate: int = 4) -> None:
    """uint8 [F, H, W, 3] frames (H, W even) as an MPEG-4 .mp4 file, with PyAV (atomically)."""
    import av  # pylint: disable=g-import-not-at-top  # only the video tasks need PyAV

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: the colours stay what they were drawn as
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    paths.atomic_write(path, buf.getvalue())


def _one_shape(rng: np.random.Generator, size: int, shape: str, color: str) -> Image.Image:
    """One large object, near the centre: what a frame or one of several images shows."""
    radius = 0.3 * size * rng.uniform(0.9, 1.1)
    center = tuple(size * 0.5 + rng.uniform(-0.05, 0.05, 2) * size)
    return draw_scene(Scene(shape, color, 1, "center", (center,), float(radius)), size)


def _frame_task(rng: np.random.Generator, size: int, num_frames: int) -> tuple[np.ndarray, str, str]:
    """A video whose one frame shows a red square (the others: squares and circles of other colours), the
    ordinal of that frame, and a description of the frames in order."""
    target = int(rng.integers(num_frames))
    others = [c for c in COLORS if c != "red"]
    frames, parts = [], []
    for f in range(num_frames):
        shape, color = ("square", "red") if f == target else (("square", "circle")[rng.integers(2)],
                                                              others[rng.integers(len(others))])
        frames.append(_one_shape(rng, size, shape, color))
        parts.append(f"{color} {shape}")
    return np.stack([np.asarray(f) for f in frames]), ORDINALS[target], ", ".join(parts) + "."


def _count_images_task(rng: np.random.Generator, size: int) -> tuple[list[Image.Image], str, str]:
    """COUNT_IMAGES images, each a circle or a square; the answer (how many are red) is uniform over
    0..COUNT_IMAGES; the others are of other colours; and a description of the images in order."""
    n = COUNT_IMAGES
    k = int(rng.integers(n + 1))
    red = set(rng.choice(n, k, replace=False).tolist())
    others = [c for c in COLORS if c != "red"]
    images, parts = [], []
    for i in range(n):
        shape = ("square", "circle")[rng.integers(2)]
        color = "red" if i in red else others[rng.integers(len(others))]
        images.append(_one_shape(rng, size, shape, color))
        parts.append(f"{color} {shape}")
    return images, str(k), ", ".join(parts) + "."


def build_media(out_dir: str | os.PathLike, *, num_train: int = 800, num_val: int = 80, image_size: int = 28,
                num_frames: int = 4, seed: int = 0, vocab_size: int = 640, describe: bool = True) -> dict[str, str]:
    """Writes the many-image and short-video tasks into `out_dir` and returns its paths (cached like `build`).

    Half the records are a video of `num_frames` frames (an .mp4 written with PyAV) asking "Which frame shows
    the red square?" (answered with an ordinal, qtype "frame"); half are COUNT_IMAGES images asking "How many
    images show a red shape?" (a digit, qtype "count_images"; colour, not shape, is what a tower trained from
    scratch on 28-pixel images learns in minutes). Records follow LLaVA-OneVision's formats: `"image": [paths]`
    with one `<image>` marker each, and LLaVA-Video-178K's `"video": path` marked with `<image>`. Answers are
    uniform by construction (blind: 1 / num_frames and 1 / (COUNT_IMAGES + 1)). With `describe`, train.json
    also asks of each record's media "Describe each frame." / "Describe each image." (qtype "describe": "red
    square, blue circle, ..."), the supervision a tower trained from scratch learns colour and shape from.
    val.json holds held-out questions with "answer" and "qtype"; the tokenizer is trained on the text and
    MEDIA_TEMPLATE's.

    Returns:
      {"out_dir", "image_folder" (= out_dir), "train", "val", "tokenizer", "manifest"} -> path.
    """
    if not 1 <= num_frames <= len(ORDINALS) or image_size % 2:
        raise ValueError(f"num_frames must be in 1..{len(ORDINALS)} and image_size even (a video's frame); found "
                         f"{num_frames}, {image_size}")
    out_dir = paths.absolute(out_dir)
    files = _media_paths(out_dir)
    args = json.loads(json.dumps({"version": MEDIA_VERSION, "num_train": num_train, "num_val": num_val,
                                  "image_size": image_size, "num_frames": num_frames, "seed": seed,
                                  "vocab_size": vocab_size, "describe": describe}))
    if _is_complete(files, args):
        return files
    for sub in ("images", "videos"):
        paths.makedirs(os.path.join(out_dir, sub))
    sentences = list(TEMPLATE_TEXT)
    splits = {"train": [], "val": []}
    for split, count, stream in (("train", num_train, 0), ("val", num_val, 1)):
        rng = np.random.default_rng([seed, 10 + stream])
        for i in range(count):
            name = f"{split}_{i:05d}"
            if i % 2 == 0:
                frames, answer, described = _frame_task(rng, image_size, num_frames)
                rel = f"videos/{name}.mp4"
                write_video(os.path.join(out_dir, rel), frames)
                q = FRAME_QUESTIONS[rng.integers(len(FRAME_QUESTIONS))]
                # The video last, right before the answer: each frame then sits at the same distance from the
                # answer in every record, which is what a tiny model (rotary positions only) can read a frame's
                # place from.
                record = {"id": name, "video": rel, "qtype": "frame", "conversations": [
                    {"from": "human", "value": f"{q}\n<image>"}, {"from": "gpt", "value": answer}]}
            else:
                images, answer, described = _count_images_task(rng, image_size)
                rels = [f"images/{name}_{k}.png" for k in range(len(images))]
                for im, rel in zip(images, rels):
                    _save_png(im, os.path.join(out_dir, rel))
                q = COUNT_IMAGES_QUESTIONS[rng.integers(len(COUNT_IMAGES_QUESTIONS))]
                record = {"id": name, "image": rels, "qtype": "count_images", "conversations": [
                    {"from": "human", "value": "".join(f"Image {k + 1}: <image>\n" for k in range(len(rels))) + q},
                    {"from": "gpt", "value": answer}]}
            record["answer"] = answer
            splits[split].append(record)
            sentences += [q, answer, "Image 1: Image 2: Image 3:", MEDIA_TEMPLATE_TEXT]
            if split == "train" and describe:
                # What each frame or image shows, in order: many tokens of supervision a record (a caption
                # stage's role), from which a tower trained from scratch learns colour and shape.
                media = {k: v for k, v in record.items() if k in ("image", "video")}
                prompt = DESCRIBE_FRAMES if "video" in record else DESCRIBE_IMAGES
                splits[split].append({"id": f"{name}_describe", **media, "qtype": "describe", "conversations": [
                    {"from": "human", "value": f"{prompt}\n<image>" if "video" in record else
                     record["conversations"][0]["value"].replace(q, prompt)},
                    {"from": "gpt", "value": described}]})
                sentences += [prompt, described]
    _write_json(files["train"], splits["train"])
    _write_json(files["val"], splits["val"])
    paths.atomic_write(files["tokenizer"], train_tokenizer(sentences, vocab_size))
    _write_json(files["manifest"], {"args": args, "counts": {k: len(v) for k, v in splits.items()}})
    return files


_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-cases, strips punctuation and spaces, and writes number words as digits."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def score(val_records: Sequence[Mapping[str, Any]],
          predictions: Mapping[str, str] | Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy of predictions against val.json's "answer" fields.

    Args:
      val_records: records carrying "id", "answer" and "qtype" (val.json).
      predictions: generated answers, by record id or in record order. A record without a
        prediction counts as wrong.

    Returns:
      {"accuracy": overall, "accuracy/<qtype>": per question type, "n": records, "n/<qtype>": ...}
      after `normalize_answer` on both sides.
    """
    if not isinstance(predictions, Mapping):
        if len(predictions) != len(val_records):
            raise ValueError(f"got {len(predictions)} predictions for {len(val_records)} records")
        predictions = {r["id"]: p for r, p in zip(val_records, predictions)}
    hits: dict[str, list[bool]] = {}
    for r in val_records:
        ok = normalize_answer(predictions.get(r["id"], "")) == normalize_answer(r["answer"])
        hits.setdefault(r["qtype"], []).append(ok)
    total = [h for hs in hits.values() for h in hs]
    out = {"accuracy": float(np.mean(total)) if total else 0.0, "n": len(total)}
    for qtype, hs in sorted(hits.items()):
        out[f"accuracy/{qtype}"], out[f"n/{qtype}"] = float(np.mean(hs)), len(hs)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: builds the dataset and prints its paths."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--sizes", default="", help="HxW,HxW,...: draw each image at one of these (height, width) "
                   "sizes (the LLaVA-NeXT variant); default: --image-size square")
    a = p.parse_args(argv)
    try:
        sizes = [tuple(int(v) for v in part.split("x")) for part in a.sizes.split(",") if part]
        if any(len(size) != 2 for size in sizes):
            raise ValueError
    except ValueError:
        p.error(f"--sizes {a.sizes!r}: expected HxW,HxW,... e.g. 28x56,56x28")
    files = build(a.out_dir, num_train=a.num_train, num_val=a.num_val, image_size=a.image_size,
                  seed=a.seed, vocab_size=a.vocab_size, sizes=sizes)
    print(json.dumps(files, indent=1))


if __name__ == "__main__":
    main()
