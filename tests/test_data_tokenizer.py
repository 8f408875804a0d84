"""Tokenizer ids against transformers' LlamaTokenizer built from the same tokenizer.model."""

from __future__ import annotations

import pickle

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from transformers import LlamaTokenizer

from llava_jax.data.tokenizer import Tokenizer

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Texts that do not start with whitespace and contain no special-token strings: HF must agree.
PLAIN_TEXTS = [
    "Hello world",
    "What is the man doing?",
    "a\nb",
    "two\n\nnewlines\n",
    "trailing space ",
    "trailing spaces   ",
    "inner    spaces and\ttab",
    "ünïcode café naïve 日本語 😀 Ω≈ç",
    "digits 1234567890 and 3.14",
    f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the photo? ASSISTANT:",
    "USER: <image>\nDescribe the image. ASSISTANT: A dog on a red car.",
    "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\n<image>\nWhat? [/INST]",
    "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "\nstarts with newline",
    "x",
    "\tstarts with a tab",
]


@pytest.fixture(scope="module")
def model_dir(tiny_spm_dir):
    return tiny_spm_dir


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module", params=[False, True], ids=["legacy_false", "legacy_true"])
def hf(request, model_dir):
    return LlamaTokenizer.from_pretrained(model_dir, legacy=request.param)


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 0)  # LLaMA: no pad -> unk
    assert tok.vocab_size == 400
    assert tok.id_to_piece(1) == "<s>" and tok.id_to_piece(2) == "</s>"
    with pytest.raises(IndexError):
        tok.id_to_piece(400)
    assert tok.piece_to_id("</s>") == 2 and tok.piece_to_id("not-a-piece") is None


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_encode_matches_hf(tok, hf, text):
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_bos=True) == [hf.bos_token_id] + hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_decode_matches_hf(tok, hf, text):
    ids = tok.encode(text, add_bos=True) + [tok.eos_id]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    # Byte-fallback text survives the round trip.
    assert tok.decode(ids) == text


def test_decode_skips_ids_outside_vocab(tok):
    ids = tok.encode("a dog", add_bos=True) + [tok.vocab_size, tok.vocab_size + 5, -100] + tok.encode("b")
    assert tok.decode(ids) == tok.decode(tok.encode("a dog") + tok.encode("b"))
    assert tok.decode([tok.pad_id, tok.bos_id, tok.eos_id]) == ""


# --- The documented differences (module docstring of llava_jax/data/tokenizer.py) ------------


@pytest.mark.parametrize("text", [" leading space", "  two", "   "])
def test_difference_1_leading_whitespace(tok, hf, model_dir, text):
    sp = spm.SentencePieceProcessor(model_file=f"{model_dir}/tokenizer.model")
    assert tok.encode(text) == sp.encode(text)  # sentencepiece itself (the original LLaVA's tokenizer)
    ours = [tok.id_to_piece(i) for i in tok.encode(text)]
    assert "".join(ours).startswith("▁" + text[0].replace(" ", "▁"))  # dummy prefix always added
    if text[0] == " ":
        theirs = hf.convert_ids_to_tokens(hf.encode(text, add_special_tokens=False))
        assert "".join(theirs) == "".join(ours)[1:]  # HF: no extra "▁" before an existing space


def test_difference_2_special_strings_are_text(tok, hf):
    ids = tok.encode("x </s> y")
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == "x </s> y"
    assert hf.eos_token_id in hf.encode("x </s> y", add_special_tokens=False)


def test_difference_3_text_after_special_token(tok, model_dir):
    # Original LLaVA (slow tokenizer, legacy) = HF legacy=True: the text after </s> gets its "▁".
    hf_legacy = LlamaTokenizer.from_pretrained(model_dir, legacy=True)
    hf_new = LlamaTokenizer.from_pretrained(model_dir, legacy=False)
    ours = tok.encode("yo") + [tok.eos_id] + tok.encode("USER: q")
    assert ours == hf_legacy.encode("yo</s>USER: q", add_special_tokens=False)
    assert ours != hf_new.encode("yo</s>USER: q", add_special_tokens=False)


# --- Continuation encoding (no dummy prefix) -----------------------------------------------


@pytest.mark.parametrize("text", PLAIN_TEXTS + [" leading", "  two", ""])
def test_continuation_equals_sentencepiece_without_dummy_prefix(tok, model_dir, text):
    proto = sentencepiece_model_pb2.ModelProto()
    with open(f"{model_dir}/tokenizer.model", "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = False
    ref = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    assert tok.encode(text, add_dummy_prefix=False) == ref.encode(text)


def test_split_at_space_is_exact(tok):
    # The property the conversation renderer relies on: cutting before a space changes nothing.
    for left, right in [("USER: hi ASSISTANT:", " A dog."), ("[/INST]", " yes "), ("x:", "   spaced"), ("a", " \nb")]:
        assert tok.encode(left) + tok.encode(right, add_dummy_prefix=False) == tok.encode(left + right)
        assert tok.encode(right, add_dummy_prefix=False) == tok.encode(right[1:])  # the dummy "▁" is that space


def test_save_load_and_pickle(tok, tmp_path):
    path = tok.save(str(tmp_path / "out"))
    again = Tokenizer.from_pretrained(str(tmp_path / "out"))
    assert path.endswith("tokenizer.model")
    for text in PLAIN_TEXTS:
        assert again.encode(text) == tok.encode(text)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(" cont", add_dummy_prefix=False) == tok.encode(" cont", add_dummy_prefix=False)


def test_missing_model_error_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_pretrained(str(tmp_path))
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer(str(bad))
