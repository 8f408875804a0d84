"""The LLaMA sentencepiece tokenizer, used directly (no torch, no transformers).

`encode` is `sentencepiece` itself, which is what the original LLaVA used (it loads LLaMA's
tokenizer with `use_fast=False`, i.e. the slow `LlamaTokenizer`, legacy mode, which calls
`sp_model.encode` on the text). transformers 5 only offers the `tokenizers`-backed
`LlamaTokenizer` (BPE converted from tokenizer.model, `legacy=False` by default). On plain text
its ids are equal to ours (tests/test_data_tokenizer.py) except in three documented places:

1. Text that starts with whitespace. sentencepiece always prepends its dummy-prefix "▁", so " a"
   becomes "▁▁a"; HF's Metaspace pre-tokenizer does not prepend when the text already starts with
   a space, giving "▁a". Ours is what LLaMA/LLaVA were trained with.
2. Special-token strings inside text ("<s>", "</s>", "<unk>"). HF turns them into the control
   ids; we encode them as ordinary characters. A prompt or an answer therefore can never inject
   an EOS; the conversation templates insert BOS/EOS as ids, explicitly.
3. Text right after a special token, inside one HF call. With `legacy=False` HF adds no "▁" there
   ("</s>USER" -> "U", "SER"); with `legacy=True` it does ("▁USER"), like the slow tokenizer the
   original LLaVA trained with. We never split text at special tokens (see 2); the templates
   encode the text after an EOS as a new piece, with the dummy prefix, reproducing the original.

`decode` agrees with HF's `decode(ids, skip_special_tokens=True)`: BOS/EOS/pad (and unk, which is
LLaMA's pad) are dropped, and so are ids outside the vocabulary such as LLaVA's image token 32000.

`encode(text, add_dummy_prefix=False)` encodes text as the continuation of earlier text (no "▁"
prepended). It is served by a second sentencepiece processor whose model has
`normalizer_spec.add_dummy_prefix = false`, the same trick transformers uses for `legacy=False`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2  # needs protobuf (a dependency of ours, not of sentencepiece)

from llava_jax import paths

TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    """A sentencepiece (LLaMA) tokenizer: text <-> ids, without special-token parsing."""

    def __init__(self, model_file: str):
        """Loads `model_file` (a sentencepiece tokenizer.model)."""
        if not paths.isfile(model_file):
            raise FileNotFoundError(f"Tokenizer model file {model_file!r} does not exist")
        proto = paths.read_bytes(model_file)
        self.model_file = model_file
        self._init_from_proto(proto)

    def _init_from_proto(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError depending on the failure
            raise ValueError(f"{self.model_file!r} is not a valid sentencepiece model: {e}") from e
        self._sp_continuation = None  # built on first use of add_dummy_prefix=False

    # Tokenizers travel to data-loader worker processes: pickle the model bytes, not the C++ object.
    def __getstate__(self):
        return {"model_file": self.model_file, "proto": self._proto}

    def __setstate__(self, state):
        self.model_file = state["model_file"]
        self._init_from_proto(state["proto"])

    @classmethod
    def from_pretrained(cls, directory: str) -> "Tokenizer":
        """Loads `directory/tokenizer.model` (the file LLaMA, Vicuna and LLaVA checkpoints ship)."""
        path = os.path.join(directory, TOKENIZER_FILE)
        if not paths.isfile(path):
            present = paths.listdir(directory) if paths.isdir(directory) else "directory does not exist"
            raise FileNotFoundError(
                f"No {TOKENIZER_FILE} in {directory!r} (found: {present}). A sentencepiece model is required; "
                "a tokenizer.json alone (fast tokenizer) is not supported."
            )
        return cls(path)

    def save(self, directory: str) -> str:
        """Writes the model to `directory/tokenizer.model`; returns that path."""
        paths.makedirs(directory)
        path = os.path.join(directory, TOKENIZER_FILE)
        if paths.absolute(path) != paths.absolute(self.model_file):
            paths.write_bytes(path, self._proto)
        return path

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the sentencepiece model (32000 for LLaMA; ids >= this are extra, e.g. <image>)."""
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (1 for LLaMA)."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (2 for LLaMA)."""
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (0 for LLaMA)."""
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        """Padding id: the model's pad piece if it has one, else unk (0 for LLaMA).

        LLaMA defines no pad; the original LLaVA sets `pad_token = unk_token`, so padding is id 0.
        Padded positions are masked out of attention and loss, so the value only needs to be a
        valid embedding row.
        """
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self._sp.unk_id()

    def encode(self, text: str, add_bos: bool = False, add_dummy_prefix: bool = True) -> list[int]:
        """Text -> ids, exactly as sentencepiece (and the original LLaVA's slow LLaMA tokenizer).

        Args:
          text: plain text; special-token strings in it ("</s>") are just characters.
          add_bos: put `bos_id` first.
          add_dummy_prefix: False encodes `text` as a continuation of preceding text: no "▁" is
            prepended, so encode(a) + encode(b, add_dummy_prefix=False) == encode(a + b) whenever
            no vocabulary piece spans the a|b boundary (e.g. when b starts with a space).
        """
        sp = self._sp if add_dummy_prefix else self._continuation_processor()
        ids = sp.encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def _continuation_processor(self) -> spm.SentencePieceProcessor:
        if self._sp_continuation is None:
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(_without_dummy_prefix(self._proto))
            self._sp_continuation = sp
        return self._sp_continuation

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, dropping BOS/EOS/pad/unk and ids outside the vocabulary (image tokens, -100)."""
        skip = {self.bos_id, self.eos_id, self.pad_id, self.unk_id}
        vocab = self.vocab_size
        kept = [int(i) for i in ids if 0 <= int(i) < vocab and int(i) not in skip]
        return self._sp.decode(kept)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of an id ("▁the", "<0x0A>", "</s>"); ids outside it raise IndexError."""
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"id {token_id} outside the vocabulary [0, {self.vocab_size})")
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary piece, or None if the piece is not in the vocabulary."""
        token_id = self._sp.piece_to_id(piece)
        # sentencepiece answers unk for unknown pieces; only "<unk>" itself maps to unk legitimately.
        if token_id == self.unk_id and piece != self._sp.id_to_piece(self.unk_id):
            return None
        return token_id


def _without_dummy_prefix(proto: bytes) -> bytes:
    """The serialized ModelProto with normalizer_spec.add_dummy_prefix = false."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()
