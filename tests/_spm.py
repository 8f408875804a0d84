"""A tiny LLaMA-like sentencepiece tokenizer trained on generated English text, for tests.

Trainer settings copy LLaMA's tokenizer.model (BPE, byte fallback, digits split, identity
normalisation, no whitespace collapsing, unk 0 / bos 1 / eos 2, no pad), only the vocabulary is
small, so tokenization behaviour (dummy prefix, bytes for unseen characters, runs of spaces) is the
same as the real one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import sentencepiece as spm

WORDS = (
    "the a an image picture photo shows man woman dog cat car street tree sky blue red green white "
    "black small large two three people sitting standing on in at with of and near next to is are "
    "what where how many color describe question answer assistant user human chat curious helpful "
    "detailed polite answers questions render clear concise summary single word phrase option letter "
    "given choices directly yes no there this that it its looking camera table food plate"
).split()


def corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic English-like lines with the punctuation, digits and role tags prompts use."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","])
        if i % 7 == 0:
            line = "USER: " + line + " ASSISTANT: " + line.lower()
        if i % 11 == 0:
            line = "[INST] " + line + " [/INST]"
        if i % 13 == 0:  # indentation and space runs, so whitespace-only pieces ("▁▁", "▁▁▁▁") exist
            line = rng.choice(["  ", "    ", "        "]) + line.replace(" ", rng.choice(["  ", "   "]), 2)
        lines.append(line)
    return lines


def train_tiny_spm(
    directory: str, vocab_size: int = 400, model_type: str = "bpe", user_defined_symbols: tuple[str, ...] = ()
) -> str:
    """Trains the tokenizer into `directory/tokenizer.model` (once per directory) and returns its path.

    `user_defined_symbols` become atomic pieces (as ChatML tags are in a ChatML model's vocabulary).
    Several processes may share `directory` (tests/_inference.py's one per machine): each trains in a
    private subdirectory and moves the finished model into place, so that none reads a half-written one.
    """
    os.makedirs(directory, exist_ok=True)
    model_path = os.path.join(directory, "tokenizer.model")
    if os.path.exists(model_path):
        return model_path
    work = tempfile.mkdtemp(dir=directory, prefix=".training-")
    text_path = os.path.join(work, "corpus.txt")
    with open(text_path, "w") as f:
        f.write("\n".join(corpus()) + "\n")
    spm.SentencePieceTrainer.train(
        input=text_path,
        model_prefix=os.path.join(work, "tokenizer"),
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(user_defined_symbols),
        num_threads=1,
        minloglevel=2,
    )
    os.replace(os.path.join(work, "tokenizer.model"), model_path)  # the same pieces whichever process wins
    shutil.rmtree(work, ignore_errors=True)
    return model_path
