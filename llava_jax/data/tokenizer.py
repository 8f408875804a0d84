"""Tokenizers behind one protocol: a SentencePiece backend and a Hugging Face `tokenizers` backend.

`Tokenizer` is the protocol the templates, the engine, evaluation and the CLIs talk to: `encode`,
`decode`, `id_to_piece`, `piece_to_id`, `vocab_size`, the special ids, `add_bos_token`, `save`,
and pickling (tokenizers travel to data-loader worker processes). `Tokenizer.from_pretrained(dir)`
picks the backend from the files a checkpoint ships: `tokenizer.model` -> `SentencePieceTokenizer`
(LLaMA, Vicuna, Mistral, Yi), else `tokenizer.json` -> `HFTokenizer` (Llama-3, Qwen2: byte-level
BPE). `Tokenizer(file)` loads one file the same way (a `.json` file is a tokenizer.json).

SentencePiece backend
---------------------
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

Hugging Face `tokenizers` backend
---------------------------------
Reads `tokenizer.json` with the `tokenizers` package (transformers is not needed), and, beside it,
`tokenizer_config.json` and `special_tokens_map.json` as transformers' `PreTrainedTokenizerFast`
reads them: the bos/eos/pad/unk tokens (the map overrides the config), the config's
`added_tokens_decoder` and any named special token the vocabulary lacks are added, and the
tokenizer.json post-processor decides whether a sequence starts with BOS (transformers 5 ignores the
config's `add_bos_token` there): Llama-3's adds `<|begin_of_text|>`, Qwen2's adds nothing and Qwen2
has no BOS at all (`bos_id` is None). Its ids and text equal `PreTrainedTokenizerFast`'s (tests/test_tokenizers_hf.py):

* `encode` is `encode(text, add_special_tokens=False)`: added tokens in the text ("<|im_end|>",
  "<|eot_id|>") become their ids, as in transformers and in the original LLaVA-NeXT, whose
  templates are strings containing them (unlike the SentencePiece backend, point 2 above).
* `add_dummy_prefix=False`: byte-level BPE (Llama-3, Qwen2) has no dummy prefix, so it changes
  nothing; for a Metaspace vocabulary (a Mistral/LLaMA tokenizer.json) it drops the "▁" that
  would be prepended, as the SentencePiece backend does.
* `decode` is `decode(ids, skip_special_tokens=True)` less ids outside the vocabulary. A prefix
  that ends inside a UTF-8 sequence decodes with a trailing U+FFFD, which the engine's streaming
  (`_IncrementalText`) holds back, as with sentencepiece byte pieces.
* `id_to_piece` is the vocabulary string (byte-level pieces spell bytes as "Ġ"-style characters).
"""
from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Iterable
from typing import Any

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2  # needs protobuf (a dependency of ours, not of sentencepiece)

from llava_jax import paths

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"


class Tokenizer(abc.ABC):
    """The tokenizer protocol: text <-> ids and the special ids; see the module docstring.

    `Tokenizer(file)` loads one file: a `.json` file with `HFTokenizer`, anything else with
    `SentencePieceTokenizer`. `Tokenizer.from_pretrained(dir)` picks the file in a directory.
    """

    def __new__(cls, *args, **kwargs):
        """Calling the protocol itself picks the backend from the file name (see the class docstring)."""
        if cls is Tokenizer:
            path = args[0] if args else kwargs.get("model_file", kwargs.get("path", ""))
            cls = HFTokenizer if str(path).endswith(".json") else SentencePieceTokenizer
        return super().__new__(cls)

    @staticmethod
    def file_in(directory: str) -> str:
        """The tokenizer file of a model directory: `tokenizer.model` if present, else `tokenizer.json`
        (`tokenizer.model`'s path when neither is, for the error that opening it gives)."""
        json_file = os.path.join(directory, HF_TOKENIZER_FILE)
        model_file = os.path.join(directory, TOKENIZER_FILE)
        return json_file if not paths.isfile(model_file) and paths.isfile(json_file) else model_file

    @staticmethod
    def from_pretrained(directory: str) -> "Tokenizer":
        """Loads the tokenizer of a model directory: `tokenizer.model` if present, else `tokenizer.json`."""
        path = Tokenizer.file_in(directory)
        if not paths.isfile(path):
            present = paths.listdir(directory) if paths.isdir(directory) else "directory does not exist"
            raise FileNotFoundError(
                f"No {TOKENIZER_FILE} (sentencepiece) or {HF_TOKENIZER_FILE} (Hugging Face tokenizers) in "
                f"{directory!r} (found: {present})"
            )
        return Tokenizer(path)

    @abc.abstractmethod
    def save(self, directory: str) -> str:
        """Writes the tokenizer's files into `directory`; returns the path of its main file."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows; ids >= this are extra (e.g. LLaVA-1.5's <image> 32000)."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, None for a vocabulary without one (Qwen2)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """End-of-sequence id."""

    @property
    @abc.abstractmethod
    def unk_id(self) -> int | None:
        """Unknown-piece id, None for byte-level vocabularies (which need none)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Padding id (masked out of attention and loss: it only needs to be a valid embedding row)."""

    @property
    @abc.abstractmethod
    def add_bos_token(self) -> bool:
        """Whether this tokenizer starts a sequence with BOS (the conversation templates follow it)."""

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_dummy_prefix: bool = True) -> list[int]:
        """Text -> ids.

        Args:
          text: the text.
          add_bos: put `bos_id` first (when the tokenizer has one).
          add_dummy_prefix: False encodes `text` as a continuation of preceding text (no "▁"
            prepended where the vocabulary would prepend one).
        """

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, dropping special ids and ids outside the vocabulary (image tokens, -100)."""

    @abc.abstractmethod
    def pieces_text(self, ids: Iterable[int]) -> str:
        """Ids (all in the vocabulary) -> text as the pieces spell it, for showing a tokenization.

        Every space is kept (no dummy-prefix removal) and special tokens are written out
        (`python -m llava_jax.data.inspect`).
        """

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of an id; ids outside the vocabulary raise IndexError."""

    @abc.abstractmethod
    def piece_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary string, or None if it is not in the vocabulary."""


class SentencePieceTokenizer(Tokenizer):
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

    @property
    def add_bos_token(self) -> bool:
        """Always True: LLaMA's slow tokenizer starts every sequence with BOS."""
        return True

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

    def pieces_text(self, ids: Iterable[int]) -> str:
        """The pieces joined, "▁" shown as a space (a piece "▁USER" is " USER"), byte pieces UTF-8 decoded."""
        out, pending = [], bytearray()
        for piece in (self.id_to_piece(int(i)) for i in ids):
            match = _BYTE_PIECE.match(piece)
            if match:
                pending.append(int(match.group(1), 16))
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            out.append(piece.replace("▁", " "))
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

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


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _without_dummy_prefix(proto: bytes) -> bytes:
    """The serialized ModelProto with normalizer_spec.add_dummy_prefix = false."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()


# --- Hugging Face tokenizers ----------------------------------------------------------------------

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value: Any) -> str | None:
    """A special token as the config files write it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json + its config files); see the module docstring."""

    def __init__(self, path: str):
        """Loads `path` (a tokenizer.json) and the tokenizer_config.json / special_tokens_map.json beside it."""
        if not paths.isfile(path):
            raise FileNotFoundError(f"Tokenizer file {path!r} does not exist")
        directory = os.path.dirname(path)
        configs = {}
        for name in (HF_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE):
            config_path = os.path.join(directory, name)
            if paths.isfile(config_path):
                try:
                    configs[name] = json.loads(paths.read_text(config_path))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{config_path!r} is not valid JSON: {e}") from e
        self.model_file = path
        self._init(paths.read_text(path), configs.get(HF_CONFIG_FILE, {}), configs.get(HF_SPECIAL_TOKENS_FILE, {}))

    def _init(self, tokenizer_json: str, config: dict, special_map: dict) -> None:
        self._json, self._config, self._special_map = tokenizer_json, config, special_map
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{self.model_file!r} is not a valid tokenizers tokenizer.json: {e}") from e
        # transformers: special_tokens_map.json overrides tokenizer_config.json's named tokens.
        named = {key: _token_content(config.get(key)) for key in _NAMED_SPECIAL}
        named.update({k: _token_content(v) for k, v in special_map.items() if k in _NAMED_SPECIAL})
        # Tokens the config declares but the vocabulary lacks are added, as transformers does.
        declared = [(t.get("content"), bool(t.get("special", True)))
                    for _, t in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))]
        extra = list(config.get("additional_special_tokens") or []) + list(special_map.get("additional_special_tokens")
                                                                           or [])
        declared += [(_token_content(t), True) for t in extra] + [(t, True) for t in named.values()]
        for content, special in declared:
            if content and self._tok.token_to_id(content) is None:
                token = tokenizers.AddedToken(content, special=special, normalized=not special)
                (self._tok.add_special_tokens if special else self._tok.add_tokens)([token])
        self._named = {key: (self._tok.token_to_id(v) if v else None) for key, v in named.items()}
        if self._named["eos_token"] is None:
            raise ValueError(f"{self.model_file!r}: no eos_token in {HF_CONFIG_FILE} or {HF_SPECIAL_TOKENS_FILE}")
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._special |= {i for i in self._named.values() if i is not None}
        # transformers 5 ignores the config's add_bos_token beside a tokenizer.json: the post-processor decides.
        probe = self._tok.encode("a", add_special_tokens=True).ids
        self._add_bos = self.bos_id is not None and probe[:1] == [self.bos_id]
        continuation = _without_prepended_space(json.loads(self._tok.to_str()))
        self._tok_continuation = tokenizers.Tokenizer.from_str(continuation) if continuation else self._tok

    def __getstate__(self):
        return {"model_file": self.model_file, "json": self._json, "config": self._config,
                "special_map": self._special_map}

    def __setstate__(self, state):
        self.model_file = state["model_file"]
        self._init(state["json"], state["config"], state["special_map"])

    def save(self, directory: str) -> str:
        """Writes tokenizer.json, tokenizer_config.json (and special_tokens_map.json if loaded with one)."""
        paths.makedirs(directory)
        path = os.path.join(directory, HF_TOKENIZER_FILE)
        paths.write_text(path, self._tok.to_str())
        config = dict(self._config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for key, token_id in self._named.items():
            config.setdefault(key, self._tok.id_to_token(token_id) if token_id is not None else None)
        paths.write_text(os.path.join(directory, HF_CONFIG_FILE), json.dumps(config, indent=2, ensure_ascii=False))
        if self._special_map:
            paths.write_text(os.path.join(directory, HF_SPECIAL_TOKENS_FILE),
                             json.dumps(self._special_map, indent=2, ensure_ascii=False))
        return path

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """The bos_token's id (Llama-3 128000), None when the config names none (Qwen2)."""
        return self._named["bos_token"]

    @property
    def eos_id(self) -> int:
        """The eos_token's id (the config's: Llama-3-Instruct <|eot_id|>, Qwen2-Instruct <|im_end|>)."""
        return self._named["eos_token"]

    @property
    def unk_id(self) -> int | None:
        """The unk_token's id, None when the config names none (byte-level BPE)."""
        return self._named["unk_token"]

    @property
    def pad_id(self) -> int:
        """The pad_token's id; without one, unk's, else EOS's (padding is masked, any valid row will do)."""
        for key in ("pad_token", "unk_token", "eos_token"):
            if self._named[key] is not None:
                return self._named[key]
        raise AssertionError("eos_token is checked at load")

    @property
    def add_bos_token(self) -> bool:
        """Whether a sequence starts with BOS: whether the tokenizer.json post-processor adds it."""
        return self._add_bos

    def encode(self, text: str, add_bos: bool = False, add_dummy_prefix: bool = True) -> list[int]:
        """Text -> ids as transformers' `encode(text, add_special_tokens=False)`, added tokens parsed.

        Args:
          text: the text; added-token strings in it ("<|im_end|>") become their ids.
          add_bos: put `bos_id` first (nothing when the tokenizer has no BOS).
          add_dummy_prefix: False drops the "▁" a Metaspace vocabulary would prepend; no effect on
            byte-level BPE, which prepends nothing.
        """
        tok = self._tok if add_dummy_prefix else self._tok_continuation
        ids = tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text as transformers' `decode(ids, skip_special_tokens=True)`; ids outside the vocabulary dropped."""
        vocab = self.vocab_size
        kept = [int(i) for i in ids if 0 <= int(i) < vocab and int(i) not in self._special]
        return self._tok.decode(kept, skip_special_tokens=True)

    def pieces_text(self, ids: Iterable[int]) -> str:
        """The text of the ids with special tokens written out (byte-level BPE keeps every space as it is)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of an id ("Ġthe", "<|eot_id|>"); ids outside it raise IndexError."""
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"id {token_id} outside the vocabulary [0, {self.vocab_size})")
        piece = self._tok.id_to_token(token_id)
        if piece is None:  # a hole in a non-contiguous vocabulary
            raise IndexError(f"id {token_id} has no piece in {self.model_file!r}")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary string (an added token included), or None."""
        return self._tok.token_to_id(piece)


def _without_prepended_space(spec: dict) -> str | None:
    """The tokenizer.json (as a string) with its dummy-prefix "▁" switched off, None if it prepends none.

    The two ways a tokenizer.json prepends it: a Metaspace pre-tokenizer (prepend_scheme "always" or
    "first", or the older add_prefix_space) and a Prepend("▁") normalizer (LLaMA's legacy export).
    """
    changed = False

    def visit(node: Any) -> Any:
        nonlocal changed
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "Metaspace":
                if node.get("prepend_scheme", "always") != "never" or node.get("add_prefix_space"):
                    node = {**node, "prepend_scheme": "never"}
                    node.pop("add_prefix_space", None)
                    changed = True
            elif kind == "Sequence":
                items = [n for n in (node.get("normalizers") or []) if n.get("type") != "Prepend"]
                if node.get("normalizers") is not None and len(items) != len(node["normalizers"]):
                    changed = True
                    node = {**node, "normalizers": items}
                for key in ("pretokenizers", "normalizers"):
                    if node.get(key) is not None:
                        node = {**node, key: [visit(n) for n in node[key]]}
            elif kind == "Prepend":
                changed = True
                return None
            return node
        return node

    spec = dict(spec)
    spec["normalizer"] = visit(spec.get("normalizer"))
    spec["pre_tokenizer"] = visit(spec.get("pre_tokenizer"))
    return json.dumps(spec) if changed else None
