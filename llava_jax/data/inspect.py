"""Shows what the model will be trained on: each record rendered, supervised spans marked.

    python -m llava_jax.data.inspect --data-path data.json --image-folder images/ \\
        --model-path checkpoints/llava-v1.5-7b --conv-mode vicuna_v1 [--max-length 2048] [--json]

Text mode prints, per record, the token pieces as text: supervised spans between [[ and ]]
(green on a terminal), an image as <image x576> (a LLaVA-NeXT image as its own count, which its
size decides: `llava_jax.anyres.layout`), BOS/EOS and other special tokens as their pieces
(<s>/</s> for LLaMA). Spaces are shown as the tokenizer has them (a piece "▁USER" prints " USER"),
so odd tokenizations are visible.
`--json` prints one object per line: {"id", "input_ids", "labels"} (labels -100 where ignored).

--model-path is a model directory of any kind the project reads or writes (weights/model_dir.py:
ours, a training stage's output, a training checkpoint, HF, original LLaVA); its tokenizer
(tokenizer.model, else tokenizer.json) is used, and the image token count and id come from its
config (ours: llava_jax_config.json; HF LLaVA: vision_config image_size/patch_size,
vision_feature_select_strategy, image_seq_length, image_token_index; HF LLaVA-NeXT: its anyres
geometry, image_grid_pinpoints included; original LLaVA:
mm_vision_tower, mm_vision_select_feature), or from --num-image-tokens / --image-token-index,
which win (a directory with only a tokenizer then does). Records that cannot be trained on
(malformed, unsafe or missing image path, an image that does not decode, nothing supervised after
truncation) are reported by id on stderr, as `data.pack` and training skip them; the others are
still printed. Exit status 1 if there was any such record.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import TextIO

import numpy as np
import PIL.Image

from llava_jax import anyres, cli, paths
from llava_jax.config import llava_config_from_hf
from llava_jax.data import packed_format
from llava_jax.data import records as records_lib
from llava_jax.data import templates
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.weights import model_dir
from llava_jax.weights.safetensors_io import CheckpointError

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\033[32m", "\033[0m"


ImageTokens = int | anyres.AnyresConfig  # tokens every image takes (LLaVA-1.5), or how sizes decide them (NeXT)


def image_settings(model_path: str, vocab_size: int) -> tuple[ImageTokens | None, int, list[str]]:
    """(image tokens or None if unknown, image_token_index, notes) of a model directory.

    Image tokens are a count (LLaVA-1.5) or, for an anyres (LLaVA-NeXT) model, its geometry: each image
    then takes `anyres.layout(geometry, size).num_tokens`. Ours (a converted directory, a stage output,
    a training checkpoint) says both in its config; an HF `llava_next` config.json is read as loading reads
    it. Otherwise they come from config.json:

    num_image_tokens is what the vision tower really produces, (image_size / patch_size)^2, +1 when
    the class token is kept (strategy "full" / feature "cls_patch"); `image_seq_length` is used only
    when the vision config has no sizes (a tiny HF test config keeps the 576 default there).
    image_token_index defaults to `vocab_size`: the id HF LLaVA appends after the text vocabulary.
    """
    if model_dir.kind(model_path) in (model_dir.OURS, model_dir.CHECKPOINT):
        ours = model_dir.config_of(model_path)
        return ours.geometry if ours.is_anyres else ours.num_image_tokens, ours.image_token_index, []
    path = os.path.join(model_path, "config.json")
    if not paths.isfile(path):
        return None, vocab_size, [f"no config.json in {model_path}"]
    cfg = json.loads(paths.read_text(path))
    if cfg.get("model_type") == "llava_next":
        try:
            return llava_config_from_hf(cfg, path).geometry, int(cfg.get("image_token_index", vocab_size)), []
        except ValueError as e:
            return None, vocab_size, [str(e)]
    if str(cfg.get("image_aspect_ratio", "")).startswith("anyres"):
        return None, vocab_size, [f"{path} is an original LLaVA-NeXT config (image_aspect_ratio "
                                  f"{cfg['image_aspect_ratio']!r}): convert it first (python -m llava_jax.convert)"]
    notes = []
    num = None
    vision = cfg.get("vision_config") or {}
    if "image_size" in vision and "patch_size" in vision:
        num = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
        num += 1 if cfg.get("vision_feature_select_strategy", "default") == "full" else 0
        if cfg.get("image_seq_length") not in (None, num):
            notes.append(f"config image_seq_length={cfg['image_seq_length']} disagrees with the vision config "
                         f"({num} image tokens); using {num}")
    elif cfg.get("image_seq_length"):
        num = int(cfg["image_seq_length"])
    elif cfg.get("mm_vision_tower"):
        # Original LLaVA: the CLIP name tells the size (openai/clip-vit-large-patch14[-336]).
        match = re.search(r"patch(\d+)(?:-(\d+))?", str(cfg["mm_vision_tower"]))
        if match:
            patch, size = int(match.group(1)), int(match.group(2) or 224)
            num = (size // patch) ** 2 + (1 if cfg.get("mm_vision_select_feature") == "cls_patch" else 0)
    token = cfg.get("image_token_index", cfg.get("image_token_id"))
    return num, int(token) if token is not None else vocab_size, notes


def format_sample(input_ids: np.ndarray, labels: np.ndarray, tokenizer: Tokenizer, image_token_index: int,
                  color: bool = False) -> str:
    """The sample as text with supervised spans marked (see the module docstring)."""
    # Group consecutive tokens of the same kind: (supervised?, image?, [ids]).
    groups: list[tuple[bool, bool, list[int]]] = []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        key = (label != templates.IGNORE_INDEX, token == image_token_index)
        if groups and groups[-1][:2] == key:
            groups[-1][2].append(token)
        else:
            groups.append((*key, [token]))
    out = []
    special = {i: tokenizer.id_to_piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}
    for supervised, is_image, ids in groups:
        if is_image:
            text = f"<image x{len(ids)}>"
        else:
            text, run = "", []
            for token in ids + [None]:
                if token is None or token in special or not 0 <= token < tokenizer.vocab_size:
                    text += tokenizer.pieces_text(run)
                    run = []
                    if token is not None:
                        text += special.get(token, f"<id {token}>")
                else:
                    run.append(token)
        if supervised:
            text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
        out.append(text)
    return "".join(out)


def inspect_records(data_path: str, image_folder: str, tokenizer: Tokenizer, template: str, *,
                    num_image_tokens: ImageTokens, image_token_index: int, max_length: int | None, as_json: bool,
                    out: TextIO, err: TextIO, limit: int | None = None, color: bool = False) -> int:
    """Writes every renderable record to `out` and every problem record to `err`; returns #problems.

    `num_image_tokens`: a count, or an anyres geometry (each image's count from its size, as training).
    """
    problems = 0

    def report(where: str, message: str) -> None:
        nonlocal problems
        problems += 1
        err.write(f"skipped {where}: {message}\n")

    def bad_record(e: records_lib.RecordError) -> None:
        report(records_lib.record_location(e.path, e.index, e.line, e.record_id), e.problem)

    shown = 0
    for record, index, line in records_lib.load_located_records(data_path, on_error=bad_record):
        if limit is not None and shown >= limit:
            break
        try:
            # Pack's check, which training's loader agrees with: every image read and fully decoded, so
            # a corrupt or truncated file is reported here as it is skipped there.
            images = packed_format.read_example(record, image_folder)
            counts = num_image_tokens
            if isinstance(counts, anyres.AnyresConfig):  # the header gives the size: no second decode
                counts = [anyres.layout(counts, _size(data)).num_tokens for data in images]
            sample = templates.render(record["conversations"], template, tokenizer,
                                      image_token_index=image_token_index, num_image_tokens=counts,
                                      max_length=max_length)
        except (ValueError, OSError) as e:  # ImagePathError, ImageError, EmptySampleError, FileNotFoundError, ...
            report(records_lib.record_location(data_path, index, line, record["id"]), f"{type(e).__name__}: {e}")
            continue
        shown += 1
        if as_json:
            out.write(json.dumps({"id": record["id"], "input_ids": sample.input_ids.tolist(),
                                  "labels": sample.labels.tolist()}) + "\n")
        else:
            supervised = int((sample.labels != templates.IGNORE_INDEX).sum())
            out.write(f"### {record['id']}  (tokens {len(sample.input_ids)}, supervised {supervised}, "
                      f"images {sample.num_images})\n")
            out.write(format_sample(sample.input_ids, sample.labels, tokenizer, image_token_index, color) + "\n\n")
    return problems


def _size(data: bytes) -> tuple[int, int]:
    with PIL.Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m llava_jax.data.inspect",
                                description="Show what the model will be trained on, supervised spans marked.")
    p.add_argument("--data-path", required=True, help="LLaVA .json or .jsonl data file")
    p.add_argument("--image-folder", required=True, help="root of the records' image paths")
    p.add_argument("--model-path", required=True,
                   help="a model directory of any kind (ours, a stage output, a training checkpoint, HF, original)")
    p.add_argument("--conv-mode", required=True, help=f"template: one of {sorted(templates.TEMPLATES)}")
    p.add_argument("--max-length", type=int, default=2048, help="truncation length after image expansion")
    p.add_argument("--json", action="store_true", help='one {"id", "input_ids", "labels"} object per line')
    p.add_argument("--num-image-tokens", type=int, help="override: tokens per image")
    p.add_argument("--image-token-index", type=int, help="override: id of the image token")
    p.add_argument("--limit", type=int, help="show at most this many records")
    a = p.parse_args(argv)
    try:
        template = templates.get_template(a.conv_mode).name
    except KeyError as e:
        p.error(str(e.args[0]))
    kind = model_dir.kind(a.model_path)
    if kind is None and a.num_image_tokens is None:
        try:  # says what the directory holds instead (a workdir: its model directories)
            model_dir.require(a.model_path, accept=model_dir.ALL)
        except CheckpointError as e:
            p.error(f"{e}; or pass --num-image-tokens (and --image-token-index) to use its tokenizer.model alone")
    tokenizer = Tokenizer.from_pretrained(model_dir.tokenizer_dir(a.model_path) if kind else a.model_path)
    num, token, notes = image_settings(a.model_path, tokenizer.vocab_size)
    num = a.num_image_tokens if a.num_image_tokens is not None else num
    token = a.image_token_index if a.image_token_index is not None else token
    if num is None:
        p.error(f"cannot tell the image token count from {a.model_path} ({'; '.join(notes) or 'no image size'}); "
                "pass --num-image-tokens")
    if a.num_image_tokens is None:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    color = not a.json and sys.stdout.isatty()
    try:
        problems = inspect_records(a.data_path, a.image_folder, tokenizer, template, num_image_tokens=num,
                                   image_token_index=token, max_length=a.max_length, as_json=a.json,
                                   out=sys.stdout, err=sys.stderr, limit=a.limit, color=color)
    except records_lib.DataFileError as e:  # the whole file is unreadable: one line, as data.pack says it
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problems:
        print(f"{problems} problem record(s), listed above", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    cli.exit_with(main)
