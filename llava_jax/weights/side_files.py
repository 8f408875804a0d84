"""The files a model directory keeps beside its weights: tokenizer files and preprocessor_config.json."""

from __future__ import annotations

import os
import sys

from llava_jax import paths
from llava_jax.config import PREPROCESSOR_CONFIG, ImageProcessorConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json")


def copy_tokenizer(src_dir: str | None, dst_dir: str, shown_as: str) -> list[str]:
    """Copy the tokenizer files `src_dir` has; warn (stderr) without tokenizer.model and tokenizer.json."""
    copied = []
    for name in TOKENIZER_FILES:
        if src_dir and paths.isfile(os.path.join(src_dir, name)):
            paths.copy(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    if "tokenizer.model" not in copied and "tokenizer.json" not in copied:
        print(
            f"warning: {src_dir or 'the source'} has no tokenizer.model or tokenizer.json; copy the model's "
            f"tokenizer (sentencepiece tokenizer.model or tokenizer.json) into {shown_as} before training or inference",
            file=sys.stderr,
        )
    return copied


def write_preprocessor(preprocessor: ImageProcessorConfig | str, directory: str) -> None:
    """Copy a preprocessor_config.json (a path) or write one from an `ImageProcessorConfig`."""
    if isinstance(preprocessor, str):
        paths.copy(preprocessor, os.path.join(directory, PREPROCESSOR_CONFIG))
    else:
        preprocessor.save(directory)
