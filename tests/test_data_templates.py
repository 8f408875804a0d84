"""Conversation rendering against the original LLaVA's prompt strings, tokenization and label masks."""

from __future__ import annotations

import re

import numpy as np
import pytest

from llava_jax.data import templates as T
from llava_jax.data.templates import IGNORE_INDEX, EmptySampleError, render, render_prompt, render_text
from llava_jax.data.tokenizer import Tokenizer

IMG = 400  # == the tiny vocabulary size: outside the vocabulary, like llava-hf's 32000
N_IMG = 5

SINGLE = [
    {"from": "human", "value": "What is the man doing?\n<image>"},
    {"from": "gpt", "value": "He is sitting on a red car."},
]
MULTI = SINGLE + [
    {"from": "human", "value": "What color is the sky?"},
    {"from": "gpt", "value": "Blue, with two white clouds."},
    {"from": "human", "value": "How many dogs?"},
    {"from": "gpt", "value": "Three."},
]
TEXT_ONLY = [
    {"from": "human", "value": "Describe a cat."},
    {"from": "gpt", "value": "A small animal\nwith  whiskers."},
    {"from": "human", "value": "And a dog?"},
    {"from": "gpt", "value": "A loyal friend."},
]
TWO_IMAGES = [
    {"from": "human", "value": "<image>\nWhat is this?"},
    {"from": "gpt", "value": "A plate of food."},
    {"from": "human", "value": "And here? <image>"},
    {"from": "gpt", "value": "A table near a tree."},
]
CAPTION = [
    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
    {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"},
]
RECORDS = {"single": SINGLE, "multi": MULTI, "text_only": TEXT_ONLY, "two_images": TWO_IMAGES}

VICUNA = T.VICUNA_SYSTEM
LLAVA_V1 = T.LLAVA_V1_SYSTEM
LL2 = T.LLAVA_LLAMA_2_SYSTEM
Q1 = "<image>\nWhat is the man doing?"  # the original moves <image> to the front, "\n" after it
A1 = "He is sitting on a red car."
Q2, A2 = "What color is the sky?", "Blue, with two white clouds."

# Strings derived by hand from haotian-liu/LLaVA v1.2 llava/conversation.py get_prompt() for the
# messages [(USER, Q1), (ASSISTANT, A1), (USER, Q2), (ASSISTANT, A2)] (training form), and for
# [(USER, Q1), (ASSISTANT, None)] (evaluation prompt, as llava/eval/model_vqa*.py builds it).
# TWO: system + " " + "USER: q" + " " + "ASSISTANT: a" + "</s>" ...; open turn "ASSISTANT:".
# LLAMA_2: sep + "[INST] " + (<<SYS>> block on turn 0) + q + " [/INST]", " " + a + " " + sep2, lstrip(sep).
# MPT: system + sep + role + msg + sep ...; open turn = role. PLAIN: preprocess_plain "<image>" + a + "\n".
# CHATML (LLaVA-NeXT conv_qwen): system + sep + "\n", then role + "\n" + msg + sep + "\n"; open turn role + "\n".
EXPECTED = {
    "vicuna_v1": (
        f"{VICUNA} USER: {Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>",
        f"{VICUNA} USER: {Q1} ASSISTANT:",
    ),
    "llava_v1": (
        f"{LLAVA_V1} USER: {Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>",
        f"{LLAVA_V1} USER: {Q1} ASSISTANT:",
    ),
    "llava_llama_2": (
        f"[INST] <<SYS>>\n{LL2}\n<</SYS>>\n\n{Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST] {A2} </s>",
        f"[INST] <<SYS>>\n{LL2}\n<</SYS>>\n\n{Q1} [/INST]",
    ),
    "mistral_instruct": (
        f"[INST] {Q1} [/INST] {A1} </s>[INST] {Q2} [/INST] {A2} </s>",
        f"[INST] {Q1} [/INST]",
    ),
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n{A1}<|im_end|>"
        f"<|im_start|>user\n{Q2}<|im_end|><|im_start|>assistant\n{A2}<|im_end|>",
        f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{Q1}<|im_end|><|im_start|>assistant\n",
    ),
    "qwen_1_5": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
        f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n",
        f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
}


@pytest.fixture(scope="module")
def tok(tiny_spm_dir):
    return Tokenizer.from_pretrained(tiny_spm_dir)


def _render(conv, name, tok, **kw):
    return render(conv, name, tok, image_token_index=IMG, num_image_tokens=N_IMG, **kw)


def _prompt(conv, name, tok):
    return render_prompt(conv, name, tok, image_token_index=IMG, num_image_tokens=N_IMG)


# --- An independent implementation of the original tokenization and label rules --------------


def original_ids(text: str, tok: Tokenizer) -> list[int]:
    """The original's tokenizer_image_token with its slow legacy LLaMA tokenizer, images expanded.

    BOS first; the text is cut at "<image>" and at "<s>"/"</s>" (special tokens), and every piece
    is encoded by sentencepiece on its own, with the dummy prefix.
    """
    ids = [tok.bos_id]
    for k, chunk in enumerate(text.split("<image>")):
        if k:
            ids += [IMG] * N_IMG
        for part in re.split(r"(</s>|<s>)", chunk):
            if part == "<s>":
                ids.append(tok.bos_id)
            elif part == "</s>":
                ids.append(tok.eos_id)
            elif part:
                ids += tok.encode(part)
    return ids


def original_labels(text: str, name: str, tok: Tokenizer) -> list[int]:
    """The original's label rule, by round lengths (train.py preprocess_v1 / _llama_2 / _plain)."""
    ids = original_ids(text, tok)
    labels = list(ids)
    if name == "plain":
        n_prompt = len(original_ids("<image>" * text.count("<image>"), tok))
        return [IGNORE_INDEX] * n_prompt + labels[n_prompt:]
    sep = " ASSISTANT: " if name in ("vicuna_v1", "llava_v1") else "[/INST] "
    pos = 1  # BOS
    labels[0] = IGNORE_INDEX
    for rnd in text.split("</s>"):
        if not rnd:
            break
        head, _, _ = rnd.partition(sep)
        # len(round with BOS) = round tokens + its "</s>"; the instruction, minus BOS and the
        # lone "▁" its trailing space makes, ends just before the answer's first token.
        round_len = len(original_ids(rnd, tok))
        instruction_len = len(original_ids(head + sep, tok)) - 2
        labels[pos : pos + instruction_len] = [IGNORE_INDEX] * instruction_len
        pos += round_len
    labels[pos:] = [IGNORE_INDEX] * (len(labels) - pos)
    return labels


def supervised_runs(labels: np.ndarray) -> list[list[int]]:
    runs, cur = [], []
    for x in labels.tolist():
        if x == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(x)
    return runs + ([cur] if cur else [])


# --- Strings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendered_strings_equal_original_get_prompt(name):
    conv = MULTI[:4]
    train, prompt = EXPECTED[name]
    assert render_text(conv, name) == train
    assert render_text(conv[:1], name) == prompt


def test_plain_string_is_preprocess_plain():
    assert render_text(CAPTION, "plain") == "<image>" + CAPTION[1]["value"] + "\n"


def test_llava_hf_prompt_with_raw_template():
    # HF llava-1.5 prompt, used verbatim.
    conv = [{"from": "human", "value": "USER: <image>\nWhat is this? ASSISTANT:"}]
    assert render_text(conv, "raw") == "USER: <image>\nWhat is this? ASSISTANT:"


def test_registry_and_errors():
    assert set(T.TEMPLATES) >= {"vicuna_v1", "llava_v1", "plain", "llava_llama_2", "mistral_instruct", "chatml_direct",
                                "raw", "qwen_1_5"}
    assert T.get_template("vicuna_v1").roles == ("USER", "ASSISTANT")
    with pytest.raises(KeyError, match="vicuna_v1"):
        T.get_template("vicuna")
    assert T.get_template("chatml_direct").stop_strings == ("<|im_end|>",)
    assert T.get_template("qwen_1_5").stop_strings == ("<|im_end|>",)


# --- Ids and labels against the original ------------------------------------------------------


@pytest.mark.parametrize("record", sorted(RECORDS))
@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llava_llama_2", "mistral_instruct"])
def test_ids_and_labels_equal_original(tok, name, record):
    conv = RECORDS[record]
    text = render_text(conv, name)
    sample = _render(conv, name, tok)
    assert sample.input_ids.tolist() == original_ids(text, tok)  # no mismatch with the full string
    assert sample.labels.tolist() == original_labels(text, name, tok)
    assert sample.input_ids.dtype == np.int32 and sample.labels.dtype == np.int32
    assert sample.num_images == text.count("<image>")


def test_plain_ids_and_labels_equal_original(tok):
    sample = _render(CAPTION, "plain", tok)
    text = render_text(CAPTION, "plain")
    assert sample.input_ids.tolist() == original_ids(text, tok)
    assert sample.labels.tolist() == original_labels(text, "plain", tok)
    assert sample.num_images == 1


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_chatml_ids_equal_full_string(tok, record):
    # The tiny vocabulary spells the ChatML tags in characters; no piece spans our cuts here.
    conv = RECORDS[record]
    sample = _render(conv, "chatml_direct", tok)
    assert sample.input_ids.tolist() == original_ids(render_text(conv, "chatml_direct"), tok)


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_chatml_ids_equal_full_string_with_tag_pieces(tiny_chatml_spm_dir, record):
    tok = Tokenizer.from_pretrained(tiny_chatml_spm_dir)
    assert len(tok.encode("<|im_end|>", add_dummy_prefix=False)) == 1
    conv = RECORDS[record]
    sample = _render(conv, "chatml_direct", tok)
    assert sample.input_ids.tolist() == original_ids(render_text(conv, "chatml_direct"), tok)
    for run, answer in zip(supervised_runs(sample.labels), [t["value"] for t in conv if t["from"] == "gpt"]):
        assert tok.decode(run) == answer + "<|im_end|>"


def test_no_piece_has_a_space_after_another_character(tok):
    # The vocabulary property that makes our prompt|answer cuts exact (module docstring).
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        assert "▁" not in piece.lstrip("▁"), piece


def test_image_neighbourhood_is_the_original_pattern(tok):
    # LLaMA's famous "... :, ▁, <image>, ▁, \n": the text before and after an image is encoded apart.
    ids = _render(SINGLE, "vicuna_v1", tok).input_ids.tolist()
    start = ids.index(IMG)
    assert tok.id_to_piece(ids[start - 1]) == "▁"
    assert [tok.id_to_piece(i) for i in ids[start + N_IMG : start + N_IMG + 2]] == ["▁", "<0x0A>"]


# --- Supervised spans decode to exactly the answers ------------------------------------------


@pytest.mark.parametrize("record", sorted(RECORDS))
@pytest.mark.parametrize("name", sorted(set(T.TEMPLATES) - {"plain"}))
def test_supervised_spans_are_the_answers(tok, name, record):
    conv = RECORDS[record]
    runs = supervised_runs(_render(conv, name, tok).labels)
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        if name == "chatml_direct":
            assert tok.decode(run) == answer + "<|im_end|>"
            continue
        if name == "llava_llama_3":  # the original supervises the whole assistant block, header included
            assert tok.decode(run) == "<|start_header_id|>assistant<|end_header_id|>\n\n" + answer + "<|eot_id|>"
            continue
        if name == "qwen_1_5":  # likewise (this vocabulary has no ChatML tag or "Ċ" to unmask elsewhere)
            assert tok.decode(run) == "<|im_start|>assistant\n" + answer + "<|im_end|>\n"
            continue
        assert run[-1] == tok.eos_id and tok.eos_id not in run[:-1]
        # llama_2 styles supervise " {a} ": sentencepiece decoding drops the first space only.
        expected = answer + " " if name in ("llava_llama_2", "mistral_instruct") else answer
        assert tok.decode(run[:-1]) == expected
        if name != "raw":  # (raw answers continue the user text directly: no dummy prefix)
            assert run[:-1] == tok.encode(expected)  # the answer's own tokens


def test_plain_supervised_span_is_caption_and_newline(tok):
    sample = _render(CAPTION, "plain", tok)
    (run,) = supervised_runs(sample.labels)
    assert tok.decode(run) == CAPTION[1]["value"] + "\n"
    assert tok.eos_id not in sample.input_ids.tolist()  # stage 1 has no EOS
    # Masked: BOS and the image run only.
    assert sample.labels[: 1 + N_IMG].tolist() == [IGNORE_INDEX] * (1 + N_IMG)
    assert sample.input_ids[1 : 1 + N_IMG].tolist() == [IMG] * N_IMG


def test_masked_positions(tok):
    sample = _render(TWO_IMAGES, "vicuna_v1", tok)
    ids, labels = sample.input_ids, sample.labels
    assert labels[0] == IGNORE_INDEX and ids[0] == tok.bos_id
    assert (labels[ids == IMG] == IGNORE_INDEX).all()
    assert sample.num_images == 2 and (ids == IMG).sum() == 2 * N_IMG
    supervised = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[supervised], ids[supervised])


# --- render_prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize("record", sorted(RECORDS) + ["caption"])
@pytest.mark.parametrize("name", sorted(T.TEMPLATES))
def test_render_prompt_is_prefix_of_render(tok, name, record):
    conv = CAPTION if record == "caption" else RECORDS[record]
    full = _render(conv, name, tok)
    for k in range(1, len(conv), 2):  # each point where the assistant is about to answer
        prompt = _prompt(conv[:k], name, tok)
        sub = _render(conv[: k + 1], name, tok)
        n = len(prompt)
        assert sub.input_ids[:n].tolist() == prompt.tolist()
        assert sub.labels[n] != IGNORE_INDEX  # the answer starts right after the prompt
        if name in ("llava_llama_3", "qwen_1_5"):  # (its supervised answer block starts with the prompt's last header)
            assert sub.labels[n - 1] == sub.input_ids[n - 1]
        elif name != "plain":  # (plain has no prompt text: the previous caption ends right before)
            assert sub.labels[n - 1] == IGNORE_INDEX
        assert full.input_ids[:n].tolist() == prompt.tolist()


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_llama_2", "mistral_instruct"])
def test_render_prompt_equals_original_eval_prompt(tok, name):
    prompt = _prompt(SINGLE[:1], name, tok)
    assert prompt.dtype == np.int32
    assert prompt.tolist() == original_ids(EXPECTED[name][1].replace(Q1, "<image>\nWhat is the man doing?"), tok)


def test_render_prompt_needs_a_user_turn_last(tok):
    with pytest.raises(ValueError, match="ends with a user turn"):
        _prompt(SINGLE, "vicuna_v1", tok)


# --- Truncation ---------------------------------------------------------------------------------


def test_truncation_never_cuts_an_image_run(tok):
    full = _render(TWO_IMAGES, "vicuna_v1", tok)
    second = np.flatnonzero(full.input_ids == IMG)[N_IMG]  # first position of the second image run
    sample = _render(TWO_IMAGES, "vicuna_v1", tok, max_length=int(second) + 2)
    assert len(sample.input_ids) == second  # cut moved back to before the run
    assert sample.num_images == 1
    np.testing.assert_array_equal(sample.input_ids, full.input_ids[:second])
    np.testing.assert_array_equal(sample.labels, full.labels[:second])
    # A cut exactly after a run keeps it.
    end = int(second) + N_IMG
    kept = _render(TWO_IMAGES, "vicuna_v1", tok, max_length=end)
    assert len(kept.input_ids) == end and kept.num_images == 2
    # No truncation when it fits.
    assert len(_render(TWO_IMAGES, "vicuna_v1", tok, max_length=len(full.input_ids)).input_ids) == len(full.input_ids)


def test_truncation_that_leaves_nothing_supervised(tok):
    first_answer = int(np.flatnonzero(_render(SINGLE, "vicuna_v1", tok).labels != IGNORE_INDEX)[0])
    with pytest.raises(EmptySampleError):
        _render(SINGLE, "vicuna_v1", tok, max_length=first_answer)
    assert len(_render(SINGLE, "vicuna_v1", tok, max_length=first_answer + 1).labels) == first_answer + 1
    # A cut inside the first image run leaves only BOS + text: nothing to learn either.
    with pytest.raises(EmptySampleError):
        _render(TWO_IMAGES, "vicuna_v1", tok, max_length=3)


def test_no_answer_is_empty(tok):
    with pytest.raises(EmptySampleError):
        _render(SINGLE[:1], "vicuna_v1", tok)


# --- Conversation handling ------------------------------------------------------------------


def test_roles_and_markers(tok):
    aliases = [{"from": "user", "value": SINGLE[0]["value"]}, {"from": "assistant", "value": A1}]
    assert render_text(aliases, "vicuna_v1") == render_text(SINGLE, "vicuna_v1")
    # A leading answer is dropped, as the original does.
    assert render_text([{"from": "gpt", "value": "hi"}] + SINGLE, "vicuna_v1") == render_text(SINGLE, "vicuna_v1")
    # A system turn replaces the system prompt.
    sys_conv = [{"from": "system", "value": "Be brief."}] + SINGLE
    assert render_text(sys_conv, "vicuna_v1").startswith("Be brief. USER: <image>\n")
    # Two markers in one turn: both move to the front.
    two = [{"from": "human", "value": "<image> compare <image>"}, {"from": "gpt", "value": "Same."}]
    assert render_text(two, "vicuna_v1") == f"{VICUNA} USER: <image>\n<image>\ncompare ASSISTANT: Same.</s>"
    assert _render(two, "vicuna_v1", tok).num_images == 2
    with pytest.raises(ValueError, match="alternate"):
        render_text([SINGLE[0], SINGLE[0], SINGLE[1]], "vicuna_v1")
    with pytest.raises(ValueError, match="images belong"):
        render_text([SINGLE[0], {"from": "gpt", "value": "<image>"}], "vicuna_v1")
    with pytest.raises(ValueError, match="from"):
        render_text([{"from": "bot", "value": "x"}], "vicuna_v1")


def test_eos_in_answer_text_is_not_an_eos(tok):
    conv = [{"from": "human", "value": "Say it."}, {"from": "gpt", "value": "x </s> y"}]
    ids = _render(conv, "vicuna_v1", tok).input_ids.tolist()
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id


# --- Image token counts per image (anyres) ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(T.TEMPLATES))
def test_a_count_per_image(tok, name):
    counts = [3, 7]
    sample = render(TWO_IMAGES, name, tok, image_token_index=IMG, num_image_tokens=counts)
    ids = sample.input_ids.tolist()
    runs = [len(r) for r in re.findall(r"(?:I)+", "".join("I" if i == IMG else "." for i in ids))]
    assert runs == counts[: len(runs)] and sample.num_images == len(runs)
    # The same counts as an int give the same text around the runs (LLaVA-1.5's case is a list of equal counts).
    same = render(TWO_IMAGES, name, tok, image_token_index=IMG, num_image_tokens=[N_IMG] * len(runs))
    assert same.input_ids.tolist() == _render(TWO_IMAGES, name, tok).input_ids.tolist()
    prompt = render_prompt(TWO_IMAGES[:1], name, tok, image_token_index=IMG, num_image_tokens=counts[:1])
    assert prompt.tolist() == ids[: len(prompt)]
    with pytest.raises(ValueError, match=r"num_image_tokens has 3 counts .* 2 <image> markers"):
        render(TWO_IMAGES, name, tok, image_token_index=IMG, num_image_tokens=[1, 2, 3])


# --- qwen_1_5 (LLaVA-OneVision) against LLaVA-NeXT's preprocess_qwen, on a Qwen2-style byte-level BPE ------------

# preprocess_qwen's reset chat template: one ChatML block a message, no system prompt of its own, no BOS.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Records with what the original's label rule reacts to: line breaks inside user text (a lone "\n" token is
# supervised wherever it is), "\n\n" and surrounding spaces in answers (neither stripped), a marker not first (it
# moves), two markers (they stay), a leading answer (dropped).
QWEN_QUIRKS = [
    {"from": "gpt", "value": "Dropped."},
    {"from": "human", "value": "First line\nsecond line. <image>"},
    {"from": "gpt", "value": " Two lines\nand\n\nmore. "},
    {"from": "human", "value": "Compare <image> with <image>\nplease."},
    {"from": "gpt", "value": "Same.\n"},
]
QWEN_RECORDS = {**RECORDS, "quirks": QWEN_QUIRKS}
VID = IMG + 1  # stand-ins, as image_id: positions the model fills


@pytest.fixture(scope="module", params=["qwen2", "bos"])
def qwen_tok_dir(request, tmp_path_factory):
    """Qwen2's tokenizer in small (no BOS, ChatML tags as additional specials, `<image>` added); "bos": the same
    with a BOS its post-processor adds, which preprocess_qwen never uses (apply_chat_template adds none)."""
    from tokenizers import processors

    from tests.test_tokenizers_hf import QWEN2_REGEX, QWEN2_SPECIAL, _train_byte_level, _write

    bos = request.param == "bos"
    raw = _train_byte_level(QWEN2_REGEX, ["<|startoftext|>"] * bos + QWEN2_SPECIAL)
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    if bos:
        raw.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", raw.token_to_id("<|startoftext|>"))])
        config["bos_token"] = "<|startoftext|>"
    return _write(tmp_path_factory.mktemp(request.param), raw, config)


def next_multimodal(conv: list[dict]) -> list[dict]:
    """LLaVA-NeXT's preprocess_multimodal: a turn's lone "<image>" not first moves to the front, with "\\n"."""
    out = []
    for turn in conv:
        value = turn["value"]
        if len(re.findall("<image>", value)) == 1 and not value.startswith("<image>"):
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append({**turn, "value": value})
    return out


def _chat_ids(hf, messages: list[dict], **kw) -> list[int]:
    """apply_chat_template's ids (transformers 5 returns an encoding where 4 returned the list)."""
    encoded = hf.apply_chat_template(messages, **kw)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def original_qwen(conv: list[dict], hf, system: str = T.QWEN_SYSTEM) -> tuple[list[int], list[int]]:
    """LLaVA-NeXT train.py preprocess_qwen (after preprocess_multimodal), `<image>` left as its token id."""
    import copy

    roles = {"human": "user", "gpt": "assistant"}
    conv = next_multimodal(conv)
    hf = copy.deepcopy(hf)
    hf.add_tokens(["<image>"], special_tokens=True)
    # (`im_start, im_end = tokenizer.additional_special_tokens_ids` there; transformers 5 dropped that attribute)
    im_start, im_end = hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # The original unmasks [198, im_start, im_end]: 198 is "\n" ("Ċ") in Qwen2's vocabulary; here, its id here.
    unmask_tokens_idx = [hf.convert_tokens_to_ids("Ċ"), im_start, im_end]
    hf.chat_template = QWEN_CHAT_TEMPLATE
    if roles[conv[0]["from"]] != roles["human"]:
        conv = conv[1:]
    input_id = _chat_ids(hf, [{"role": "system", "content": system}])
    target = [IGNORE_INDEX] * len(input_id)
    for turn in conv:
        role = roles.get(turn["from"], turn["from"])
        encode_id = _chat_ids(hf, [{"role": role, "content": turn["value"]}])
        input_id += encode_id
        target += [IGNORE_INDEX] * len(encode_id) if role in ["user", "system"] else encode_id
    target = [i if i in unmask_tokens_idx else t for i, t in zip(input_id, target)]
    return input_id, target


def expand(ids: list[int], labels: list[int], image_id: int, counts: list[int], video_at: int | None = None):
    """The model side: the k-th `<image>` position becomes counts[k] ids (`VID`s for the video_at-th), IGNORE_INDEX."""
    from tests.test_tokenizers_hf import expand_images

    return expand_images(ids, labels, image_id, counts, video_at, VID)


def _hf_and_ours(d: str):
    from transformers import AutoTokenizer

    tok, hf = Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    return tok, hf, tok.piece_to_id("<image>")


@pytest.mark.parametrize("system", [None, "Answer in one word."], ids=["default_system", "system_turn"])
@pytest.mark.parametrize("record", sorted(QWEN_RECORDS))
def test_qwen_ids_and_labels_equal_original(qwen_tok_dir, record, system):
    """Ids and labels of every record equal preprocess_qwen's, its quirks included: the whole assistant block
    supervised, header and trailing "\\n" too; every <|im_start|>, <|im_end|> and lone "\\n" token supervised
    in system and user blocks as well. A record's system turn (on which the original crashes) is its
    `system_message`."""
    from tests._seeds import fresh_seed

    tok, hf, image_id = _hf_and_ours(qwen_tok_dir)
    conv = QWEN_RECORDS[record]
    rng = np.random.default_rng(fresh_seed())
    counts = [int(c) for c in rng.integers(1, 9, size=sum(t["value"].count("<image>") for t in conv))]
    turns = ([{"from": "system", "value": system}] if system else []) + conv
    ours = render(turns, "qwen_1_5", tok, image_token_index=image_id, num_image_tokens=counts)
    expected = expand(*original_qwen(conv, hf, system or T.QWEN_SYSTEM), image_id, counts)
    assert ours.input_ids.tolist() == expected[0]
    assert ours.labels.tolist() == expected[1]
    assert ours.num_images == len(counts) and tok.bos_id not in ours.input_ids.tolist()
    # The quirk is there to see: supervised tokens outside the answers (in the system block, say).
    im_start = tok.piece_to_id("<|im_start|>")
    assert ours.labels[0] == im_start and ours.labels[1] == IGNORE_INDEX  # "<|im_start|>" "system"


def test_qwen_prompt_equals_original_eval_prompt(qwen_tok_dir):
    """render_prompt: conv_qwen.get_prompt() with the assistant open, as tokenizer_image_token cuts it (Qwen2: no
    BOS), and as the llava-hf OneVision chat template's generation prompt."""
    tok, hf, image_id = _hf_and_ours(qwen_tok_dir)
    conv = QWEN_QUIRKS[1:2]
    prompt = render_prompt(conv, "qwen_1_5", tok, image_token_index=image_id, num_image_tokens=[4])
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nFirst line\n"
            "second line.<|im_end|>\n<|im_start|>assistant\n")
    assert render_text(conv, "qwen_1_5") == text
    ids = hf(text, add_special_tokens=False).input_ids
    assert prompt.tolist() == expand(ids, ids, image_id, [4])[0]
    hf.chat_template = QWEN_CHAT_TEMPLATE
    messages = [{"role": "system", "content": T.QWEN_SYSTEM}, {"role": "user", "content": text.split("user\n")[1]
                                                                .split("<|im_end|>")[0]}]
    assert _chat_ids(hf, messages, add_generation_prompt=True) == ids


@pytest.mark.parametrize("where", ["first", "last"])
def test_qwen_video_renders_as_the_original_with_its_image_marker(qwen_tok_dir, where):
    """A `<video>` turn renders as the original renders the same record with `<image>` there (LLaVA-Video-178K's
    marker for the video, moved to the front when it is not first), the run of video ids in its place."""
    tok, hf, image_id = _hf_and_ours(qwen_tok_dir)
    question = {"first": "<video>\nWhat happens?", "last": "What happens in this clip?\n<video>"}[where]
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": "A ball rolls."},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "It stops."}]
    ours = render(conv, "qwen_1_5", tok, image_token_index=image_id, num_image_tokens=[], video_token_index=VID,
                  num_video_tokens=[7])
    as_image = [{**t, "value": t["value"].replace("<video>", "<image>")} for t in conv]
    expected = expand(*original_qwen(as_image, hf), image_id, [7], video_at=0)
    assert ours.input_ids.tolist() == expected[0]
    assert ours.labels.tolist() == expected[1]
    assert ours.num_videos == 1 and ours.num_images == 0
    assert render_text(conv, "qwen_1_5") == render_text(as_image, "qwen_1_5").replace("<image>", "<video>")
    assert "<|im_start|>user\n<video>\nWhat happens" in render_text(conv, "qwen_1_5")
