"""Conversation templates as data, and the one renderer that turns a conversation into ids + labels.

A template (`TEMPLATES`, `get_template`) reproduces the prompt strings of the original LLaVA
(haotian-liu/LLaVA v1.2 `llava/conversation.py`, `Conversation.get_prompt`) and the label masks of
its training code (`llava/train/train.py`, `preprocess_*`); `mistral_instruct`, `chatml_direct`,
`llava_llama_3` and `qwen_1_5` (LLaVA-OneVision's) those of LLaVA-NeXT (LLaVA-VL/LLaVA-NeXT, the same
two files), where they differ:

| name             | rendered (two rounds; "<image>" shown where the placeholder run goes)            |
|------------------|-----------------------------------------------------------------------------------|
| vicuna_v1        | {sys} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>       |
| llava_v1         | same, the system prompt says "human"                                              |
| plain            | <image>{a1}\\n  (stage 1; the human text is dropped)                              |
| llava_llama_2    | [INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n<image>\\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s> |
| mistral_instruct | [INST] <image>\\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST] {a2} </s>              |
| chatml_direct    | <|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n<image>\\n{q1}<|im_end|><|im_start|>assistant\\n{a1}<|im_end|>... |
| llava_llama_3    | <|begin_of_text|> + one Llama-3 chat block per message, system first (see `_style_llama_3`) |
| qwen_1_5         | <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<image>\\n{q1} |
|                  | <|im_end|>\\n<|im_start|>assistant\\n{a1}<|im_end|>\\n... (one string: a ChatML block a message) |
| raw              | {q1}{a1}</s>{q2}{a2}</s>: the text used verbatim, nothing added                  |

BOS starts every sequence whose tokenizer starts one with BOS (`Tokenizer.add_bos_token`: always
for sentencepiece; not for Qwen2, which has none, as the original's `tokenizer_image_token` keeps
BOS only when the tokenizer made one; qwen_1_5 never, as its `apply_chat_template` adds none). "</s>"
and "<s>" in these strings are the EOS / BOS ids, never text. Supervised (label = id): each answer and
what closes it: "{a}" + EOS (v1, raw), " {a} " + EOS (llama_2 styles), "{a}<|im_end|>" (chatml),
"{a}\\n" (plain); llava_llama_3 and qwen_1_5 have their own rules (see `_style_llama_3`, `_style_qwen`).
Everything else is IGNORE_INDEX: BOS, system prompt, user turns, role tags, image placeholders.

How ids are built, and how they compare with tokenizing the whole string
--------------------------------------------------------------------------
A conversation becomes a list of segments: BOS/EOS ids, image markers, and text pieces that are
either supervised or not. Each text piece is encoded on its own and the ids are concatenated; the
labels come from the same segments, so ids and labels cannot disagree (the original's
"tokenization mismatch" cannot happen). The reference for "the tokenization of the full string"
is the original LLaVA's `tokenizer_image_token` with its slow, legacy LLaMA tokenizer: the string
is cut at "<image>" and at the special tokens "<s>"/"</s>", and each piece is sentencepiece-
encoded with its dummy-prefix "▁" (hence the famous `29871, -200, 29871, 13` around an image).
We do the same at those cuts: the first text after BOS, EOS or an image gets the dummy prefix.
Our only other cuts are between a prompt and the answer that follows it in the same piece; that
text is encoded as a continuation (no dummy prefix). Where those cuts fall:

* vicuna_v1, llava_v1, llava_llama_2, mistral_instruct: just before the space that precedes the
  answer ("ASSISTANT:" | " {a}", "[/INST]" | " {a} "). A LLaMA (sentencepiece, split-by-whitespace)
  vocabulary has no piece with a "▁" after another character, so no piece can span the cut: the
  ids EQUAL the full-string tokenization (tested on every template and record kind).
* chatml_direct: after "assistant\\n" and after "<|im_end|>". The first is exact with LLaMA-like
  vocabularies ("\\n" is a byte piece, nothing merges across it). The second is exact when the
  ChatML tags are pieces of their own (as in the ChatML models' vocabularies; tested); with a
  vocabulary that spells them in characters (LLaMA's) a piece such as "><" may span the
  "<|im_end|>" | "<|im_start|>" cut, and our ids may then differ from the full string's.
* llava_llama_3: between messages (as the original, which tokenizes each message apart) and after
  each "<|end_header_id|>\\n\\n" header; byte-level BPE pre-tokenizes "\\n\\n" apart from the text after
  it, and the tags are added tokens, so the ids equal the original's (tested).
* qwen_1_5: between messages only (the original tokenizes each message apart); a whole assistant block is
  one supervised piece, so the ids equal the original's (tested). `render_prompt` ends at the open
  "<|im_start|>assistant\\n", which is a prefix of the training ids unless the answer starts with a
  line break (byte-level BPE would then merge the two "\\n").
* raw: the user and answer texts touch directly, so a piece may span the cut.
Where they may differ, the segment form is the right one: the supervised ids are then exactly the
answer's own tokens, and `render_prompt` (inference) is by construction a prefix of the training
sequence, so the model is prompted exactly as it was trained.

Other choices (all documented where the original is silent or crashes):
* "<image>" markers are moved to the front of their (user) turn, "<image>\\n" each, and the rest
  of that turn stripped, as the original's `preprocess_multimodal` does; a turn may hold several.
  The LLaVA-NeXT templates follow LLaVA-NeXT's `preprocess_multimodal` instead: only a turn with
  exactly one marker, not already at its start, is rewritten ("<image>\\n" + the stripped rest);
  a turn with several markers keeps them where they are. A "<video>" counts as a marker there, and
  moves as "<image>" does: the original's video records (LLaVA-Video-178K) mark the video "<image>".
  `raw` leaves markers where they are. A marker in an assistant turn is an error.
* Each "<image>" becomes `num_image_tokens` image ids: one int for every image (LLaVA-1.5), or one
  count per marker of the rendered conversation, in order (LLaVA-NeXT anyres, where each image's
  count depends on its size: `llava_jax.anyres.layout(...).num_tokens`).
* A leading assistant turn is dropped (as the original does); roles must then alternate. A
  "system" turn first replaces the template's system prompt. `render` ignores a trailing user turn.
* `render_prompt` with `plain` gives BOS + the image run(s), the prefix a stage-1 model was trained
  on; the original's `get_prompt()` would print "<image>\\n{q}\\n", which no plain model has seen.
* Truncation happens after image expansion and never splits an image run: a cut inside a run
  moves to before it. `RenderedSample.num_images` says how many image runs survive (the first
  ones, in order). A sample with no supervised token left raises `EmptySampleError`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from llava_jax.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
# Where a video goes (OneVision, NeXT-Video): `video_token_index` ids, as many as its frames take.
VIDEO_MARKER = "<video>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_ROLE_NAMES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}


class EmptySampleError(ValueError):
    """A rendered sample has no supervised token (no answer, or truncation removed them all)."""


@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation format. `style` picks the renderer in `_STYLES`; the other fields are its data.

    Attributes:
      name: registry key.
      style: "two" (vicuna), "llama_2", "llama_3", "qwen", "chatml", "plain" or "raw".
      system: default system prompt (a "system" turn in the record replaces it).
      roles: (user, assistant) role tags as the style writes them.
      sep, sep2: separators, with the meaning of the original `Conversation` for that style.
      stop_strings: extra textual stops for generation; EOS always stops generation.
      unmasked: vocabulary strings whose tokens are supervised wherever they occur (the original
        llava_llama_3's `unmask_tokens`); a string the vocabulary lacks is ignored, as there.
      images_to_front: "all" (LLaVA) or "one" (LLaVA-NeXT): which user turns get their "<image>"
        markers moved to the front (module docstring).
    """

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    stop_strings: tuple[str, ...] = ()
    unmasked: tuple[str, ...] = ()
    images_to_front: str = "all"


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
QWEN_SYSTEM = "You are a helpful assistant."

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template("vicuna_v1", "two", VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
        Template("llava_v1", "two", LLAVA_V1_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
        # The original stops plain generation at its sep "\n" (the caption's end in training).
        Template("plain", "plain", "", ("", ""), "\n", "", stop_strings=("\n",)),
        Template("llava_llama_2", "llama_2", LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>"),
        # LLaVA-NeXT's conv_mistral_instruct (llava-v1.6-mistral-7b): trained with preprocess_llama_2.
        Template("mistral_instruct", "llama_2", "", ("USER", "ASSISTANT"), "", "</s>", images_to_front="one"),
        # LLaVA-NeXT's conv_chatml_direct (llava-v1.6-34b, Yi): version "mpt", trained with preprocess_mpt.
        Template(
            "chatml_direct",
            "chatml",
            "Answer the questions.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "<|im_end|>",
            "",
            stop_strings=("<|im_end|>",),
            images_to_front="one",
        ),
        # LLaVA-NeXT's conv_llava_llama_3 (llama3-llava-next-8b): trained with preprocess_llama3.
        Template(
            "llava_llama_3",
            "llama_3",
            LLAVA_LLAMA_2_SYSTEM,
            ("user", "assistant"),
            "<|eot_id|>",
            "",
            stop_strings=("<|eot_id|>",),
            unmasked=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n"),
            images_to_front="one",
        ),
        # LLaVA-NeXT's conv_qwen (LLaVA-OneVision, PROMPT_VERSION="qwen_1_5"): trained with preprocess_qwen.
        # "Ċ" is the byte-level piece of "\\n", Qwen2's id 198 that the original unmasks by number.
        Template(
            "qwen_1_5",
            "qwen",
            QWEN_SYSTEM,
            ("user", "assistant"),
            "<|im_end|>",
            "\n",
            stop_strings=("<|im_end|>",),
            unmasked=("<|im_start|>", "<|im_end|>", "Ċ"),
            images_to_front="one",
        ),
        Template("raw", "raw", "", ("", ""), "", "</s>"),
    ]
}


def get_template(name: str) -> Template:
    """The registered template called `name`; the error lists the known names."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"Unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None


@dataclasses.dataclass
class RenderedSample:
    """One rendered conversation.

    Attributes:
      input_ids: [T] int32, image runs already expanded to `num_image_tokens` image ids each.
      labels: [T] int32, aligned with input_ids (not shifted), IGNORE_INDEX where not supervised.
      num_images: image runs kept (after truncation): the first `num_images` images of the record.
      num_videos: video runs kept, likewise.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    num_images: int
    num_videos: int = 0


# --- Segments ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: kind "text" (may hold image markers), "bos" or "eos"."""

    kind: str
    text: str = ""
    supervised: bool = False


def _bos() -> Segment:
    return Segment("bos", "<s>")


def _eos(supervised: bool) -> Segment:
    return Segment("eos", "</s>", supervised)


def _text(text: str, supervised: bool = False) -> Segment:
    return Segment("text", text, supervised)


# A style renders (system, [(question, answer | None), ...]) to segments. A None answer means "open
# for generation": the style stops right after the assistant role tag.
Pairs = Sequence[tuple[str, str | None]]


def _style_two(t: Template, system: str, pairs: Pairs) -> list[Segment]:
    # get_prompt (SeparatorStyle.TWO): system + sep, then "ROLE: msg" + (sep | sep2) per turn,
    # an open turn renders "ROLE:". sep2 "</s>" is the EOS id.
    user, assistant = t.roles
    segs, prefix = [_bos()], system + t.sep
    for q, a in pairs:
        segs.append(_text(f"{prefix}{user}: {q}{t.sep}{assistant}:"))
        if a is None:
            break
        segs += [_text(" " + a, supervised=True), _eos(True)]
        prefix = ""
    return segs


def _style_llama_2(t: Template, system: str, pairs: Pairs) -> list[Segment]:
    # get_prompt (LLAMA_2): "[INST] {<<SYS>> block + q1} [/INST]" then " {a} " + sep2 per round,
    # later rounds preceded by sep ("<s>" = BOS for llava_llama_2, nothing for mistral_instruct).
    segs = [_bos()]
    for i, (q, a) in enumerate(pairs):
        if i == 0:
            q = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else "") + q
        elif t.sep == "<s>":
            segs.append(_bos())
        elif t.sep:
            segs.append(_text(t.sep))
        segs.append(_text(f"[INST] {q} [/INST]"))
        if a is None:
            break
        segs += [_text(f" {a} ", supervised=True), _eos(True)]
    return segs


def _style_chatml(t: Template, system: str, pairs: Pairs) -> list[Segment]:
    """get_prompt (MPT): system + sep, then role + msg + sep per turn; an open turn renders the role.

    Labels as LLaVA-NeXT's preprocess_mpt (chatml_direct's version is "mpt"): "{a}<|im_end|>" per
    answer. Its round arithmetic assumes a BOS; with a tokenizer that adds none, a conversation of
    two or more rounds comes out one token short per round, is reported as a "tokenization
    mismatch" and loses all its labels. We supervise the answers there too.
    """
    user, assistant = t.roles
    segs, prefix = [_bos()], f"<|im_start|>system\n{system}{t.sep}"
    for q, a in pairs:
        segs.append(_text(f"{prefix}{user}{q}{t.sep}{assistant}"))
        if a is None:
            break
        segs.append(_text(a + t.sep, supervised=True))
        prefix = ""
    return segs


def _style_llama_3(t: Template, system: str, pairs: Pairs) -> list[Segment]:
    """LLaVA-NeXT's preprocess_llama3: one Llama-3 chat-template block per message, BOS first.

    Each block is "<|start_header_id|>{role}<|end_header_id|>\\n\\n{content | trim}<|eot_id|>", the
    Llama-3-Instruct chat template applied to that message alone; the system block always comes
    first (the template's system prompt, or the record's "system" turn, on which the original
    crashes). The original's quirks, kept:

    * Labels: a whole assistant block is supervised, its "<|start_header_id|>assistant<|end_header_id|>
      \\n\\n" header included; user and system blocks are not, except that every
      <|begin_of_text|>, <|start_header_id|>, <|end_header_id|> and <|eot_id|> token is supervised
      wherever it occurs (`Template.unmasked`, the original's `unmask_tokens`; its "\\n\\n" entry is
      no vocabulary string of a byte-level BPE, so no token, and nothing, is unmasked by it).
    * Inference: the original's `get_prompt()` feeds its role tags ("<|start_header_id|>user") to
      the chat template, doubling <|start_header_id|>, and its tokenizer adds a second BOS to the
      prompt's "<|begin_of_text|>". `render_prompt` gives the training prefix instead (one BOS,
      plain role names): the model is prompted as it was trained.
    """
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    user, assistant = t.roles
    segs = [_bos(), _text(header.format("system") + system.strip() + t.sep)]
    for q, a in pairs:
        segs.append(_text(header.format(user) + q.strip() + t.sep))
        if a is None:
            segs.append(_text(header.format(assistant)))
            break
        segs += [_text(header.format(assistant), supervised=True), _text(a.strip() + t.sep, supervised=True)]
    return segs


def _style_qwen(t: Template, system: str, pairs: Pairs) -> list[Segment]:
    """LLaVA-NeXT's preprocess_qwen: one ChatML block "<|im_start|>{role}\\n{content}<|im_end|>\\n" a message.

    The system block comes first (the template's system prompt, or the record's "system" turn, on which the
    original crashes); contents are used as they are (not stripped); there is no BOS. conv_qwen's
    `get_prompt()` (SeparatorStyle.CHATML) prints the same string, with "<|im_start|>assistant\\n" open for
    generation. The original's quirks, kept:

    * Labels: a whole assistant block is supervised, its "<|im_start|>assistant\\n" header and the "\\n" after
      its <|im_end|> included; system and user blocks are not, except that every <|im_start|>, <|im_end|>
      and lone-"\\n" token (Qwen2's id 198, "Ċ") is supervised wherever it occurs (`Template.unmasked`, the
      original's `unmask_tokens_idx`): in system and user blocks too, after an image, and inside user text.
      Other tokens holding a line break ("\\n\\n", ".\\n") stay masked, as there.
    * A trailing user turn is dropped here; the original would append it (its tags supervised).
    """
    user, assistant = t.roles
    block = "<|im_start|>{}\n{}" + t.sep + t.sep2
    segs = [_text(block.format("system", system))]
    for q, a in pairs:
        segs.append(_text(block.format(user, q)))
        if a is None:
            segs.append(_text(f"<|im_start|>{assistant}\n"))
            break
        segs.append(_text(block.format(assistant, a), supervised=True))
    return segs


def _style_plain(t: Template, system: str, pairs: Pairs) -> list[Segment]:
    # preprocess_plain: the human text is replaced by its image marker(s); answer + sep supervised.
    segs = [_bos()]
    for q, a in pairs:
        segs.append(_text(IMAGE_MARKER * q.count(IMAGE_MARKER)))
        if a is None:
            break
        segs.append(_text(a + t.sep, supervised=True))
    return segs


def _style_raw(t: Template, system: str, pairs: Pairs) -> list[Segment]:
    segs = [_bos()] + ([_text(system)] if system else [])
    for q, a in pairs:
        segs.append(_text(q))
        if a is None:
            break
        segs += [_text(a, supervised=True), _eos(True)]
    return segs


_STYLES: dict[str, Callable[[Template, str, Pairs], list[Segment]]] = {
    "two": _style_two,
    "llama_2": _style_llama_2,
    "chatml": _style_chatml,
    "llama_3": _style_llama_3,
    "qwen": _style_qwen,
    "plain": _style_plain,
    "raw": _style_raw,
}


# --- Conversation normalisation ------------------------------------------------------------------


def _move_images_to_front(text: str, rule: str = "all") -> str:
    """As the original's preprocess_multimodal: markers out, strip, "<image>\\n" per marker in front.

    rule "one" is LLaVA-NeXT's: only a lone marker ("<image>" or "<video>") not already first moves (and gets
    its "\\n").
    """
    if rule == "one":  # a video counts: the original's video records mark it "<image>" (module docstring)
        found = _MARKERS.findall(text)
        if len(found) != 1 or text.startswith(found[0]):
            return text
        return (f"{found[0]}\n" + text.replace(found[0], "").strip()).strip()
    n = text.count(IMAGE_MARKER)
    if n == 0:
        return text
    return (f"{IMAGE_MARKER}\n" * n + text.replace(IMAGE_MARKER, "").strip()).strip()


def _pairs(conversations: Sequence[dict], template: Template) -> tuple[str, list[tuple[str, str | None]]]:
    """Records' turns -> (system prompt, [(question, answer or None for a trailing question)])."""
    turns = []
    for i, turn in enumerate(conversations):
        try:
            role, value = _ROLE_NAMES[turn["from"]], turn["value"]
        except (KeyError, TypeError):
            raise ValueError(
                f"Turn {i} must be {{'from': one of {sorted(_ROLE_NAMES)}, 'value': str}}; got {turn!r}"
            ) from None
        if not isinstance(value, str):
            raise ValueError(f"Turn {i} value must be a string; got {type(value).__name__}")
        turns.append((role, value))
    system = template.system
    if turns and turns[0][0] == SYSTEM:
        system = turns.pop(0)[1]
    if turns and turns[0][0] == ASSISTANT:  # the original skips a conversation-opening answer
        turns.pop(0)
    pairs: list[tuple[str, str | None]] = []
    for j, (role, value) in enumerate(turns):
        expected = USER if j % 2 == 0 else ASSISTANT
        if role != expected:
            raise ValueError(f"Turns must alternate user/assistant after the first; turn {j} is {role!r}")
        if role == USER:
            moved = value if template.style == "raw" else _move_images_to_front(value, template.images_to_front)
            pairs.append((moved, None))
        else:
            if IMAGE_MARKER in value:
                raise ValueError(f"Assistant turn {j} contains {IMAGE_MARKER!r}; images belong to user turns")
            pairs[-1] = (pairs[-1][0], value)
    return system, pairs


def _as_template(template: Template | str) -> Template:
    return get_template(template) if isinstance(template, str) else template


def segments(conversations: Sequence[dict], template: Template | str, *, open_prompt: bool) -> list[Segment]:
    """The segments of a conversation: complete rounds only, or (open_prompt) up to the open assistant tag.

    With open_prompt the last turn must be a user turn; without it a trailing user turn is ignored.
    """
    template = _as_template(template)
    system, pairs = _pairs(conversations, template)
    if not pairs:
        raise ValueError("Conversation has no user turn")
    if open_prompt:
        if pairs[-1][1] is not None:
            raise ValueError("render_prompt needs a conversation that ends with a user turn")
    elif pairs[-1][1] is None:
        pairs = pairs[:-1]
    return _STYLES[template.style](template, system, pairs)


def render_text(conversations: Sequence[dict], template: Template | str) -> str:
    """The rendered string (without the leading BOS), as the original `get_prompt()` would print it.

    A conversation ending with a user turn renders as a generation prompt (open assistant role).
    """
    template = _as_template(template)
    _, pairs = _pairs(conversations, template)
    open_prompt = bool(pairs) and pairs[-1][1] is None
    segs = segments(conversations, template, open_prompt=open_prompt)
    if segs and segs[0].kind == "bos":
        segs = segs[1:]
    return "".join(s.text for s in segs)


# --- Encoding ---------------------------------------------------------------------------------


def _image_counts(segs: Sequence[Segment], num_image_tokens: int | Sequence[int]) -> list[int]:
    """One image-token count per "<image>" marker of the segments, in order (see the module docstring)."""
    markers = sum(seg.text.count(IMAGE_MARKER) for seg in segs if seg.kind == "text")
    if isinstance(num_image_tokens, (int, np.integer)):
        return [int(num_image_tokens)] * markers
    counts = [int(n) for n in num_image_tokens]
    if len(counts) != markers:
        raise ValueError(
            f"num_image_tokens has {len(counts)} counts (one per image) but the rendered conversation has "
            f"{markers} {IMAGE_MARKER} markers"
        )
    return counts


def _encode(
    segs: Sequence[Segment],
    tokenizer: Tokenizer,
    image_token_index: int,
    num_image_tokens: int | Sequence[int],
    unmasked: Sequence[str] = (),
    video_token_index: int | None = None,
    num_video_tokens: Sequence[int] = (),
) -> tuple[list[int], list[int], list[tuple[int, int, bool]]]:
    """Segments -> (ids, labels, image and video runs as [start, end) positions and whether a video's)."""
    counts = iter(_image_counts(segs, num_image_tokens))
    videos = [int(n) for n in num_video_tokens]
    markers = sum(seg.text.count(VIDEO_MARKER) for seg in segs if seg.kind == "text")
    if markers != len(videos):
        raise ValueError(f"num_video_tokens has {len(videos)} counts (one per video) but the rendered conversation "
                         f"has {markers} {VIDEO_MARKER} markers")
    if videos and video_token_index is None:
        raise ValueError(f"{VIDEO_MARKER} markers need a model that takes video (no video_token_index)")
    video_counts = iter(videos)
    always = {tokenizer.piece_to_id(p) for p in unmasked} - {None}
    if segs and segs[0].kind == "bos" and not tokenizer.add_bos_token:
        segs = segs[1:]  # the original keeps BOS only when its tokenizer makes one (Qwen2 has none)
    ids: list[int] = []
    labels: list[int] = []
    runs: list[tuple[int, int, bool]] = []
    after_text = False  # text right after text continues it (no dummy prefix); see module docstring
    for seg in segs:
        if seg.kind in ("bos", "eos"):
            token = tokenizer.bos_id if seg.kind == "bos" else tokenizer.eos_id
            ids.append(token)
            labels.append(token if seg.supervised or token in always else IGNORE_INDEX)
            after_text = False
            continue
        for piece in _MARKERS.split(seg.text):
            if piece in (IMAGE_MARKER, VIDEO_MARKER):
                video = piece == VIDEO_MARKER
                n = next(video_counts) if video else next(counts)
                runs.append((len(ids), len(ids) + n, video))
                ids += [video_token_index if video else image_token_index] * n
                labels += [IGNORE_INDEX] * n
                after_text = False
                continue
            if not piece:
                continue
            piece_ids = tokenizer.encode(piece, add_dummy_prefix=not after_text)
            ids += piece_ids
            labels += [i if seg.supervised or i in always else IGNORE_INDEX for i in piece_ids]
            after_text = True
    return ids, labels, runs


def render(
    conversations: Sequence[dict],
    template: Template | str,
    tokenizer: Tokenizer,
    *,
    image_token_index: int,
    num_image_tokens: int | Sequence[int],
    max_length: int | None = None,
    video_token_index: int | None = None,
    num_video_tokens: Sequence[int] = (),
) -> RenderedSample:
    """A training sample: ids and labels of a conversation (LLaVA record "conversations" list).

    Args:
      conversations: [{"from": "human" | "gpt" | "user" | "assistant" | "system", "value": str}, ...].
      template: a Template or its registry name.
      tokenizer: any `Tokenizer` backend (sentencepiece or tokenizers).
      image_token_index: id written at image positions (e.g. 32000 for llava-hf checkpoints).
      num_image_tokens: placeholders per image (576 for CLIP ViT-L/14-336), or one count per
        "<image>" marker in order (anyres: each image its own count).
      max_length: truncate to this many tokens after expansion, never inside an image run.

    Raises:
      EmptySampleError: nothing supervised (no answer, or truncation removed every answer token).
      ValueError: malformed conversation (unknown role, roles not alternating, image in an answer),
        or a count list whose length is not the number of "<image>" markers.
    """
    template = _as_template(template)
    segs = segments(conversations, template, open_prompt=False)
    ids, labels, runs = _encode(segs, tokenizer, image_token_index, num_image_tokens, template.unmasked,
                                video_token_index, num_video_tokens)
    cut = len(ids)
    if max_length is not None and cut > max_length:
        cut = max_length
        for start, end, _ in runs:
            if start < cut < end:
                cut = start
                break
    num_images = sum(1 for _, end, video in runs if end <= cut and not video)
    num_videos = sum(1 for _, end, video in runs if end <= cut and video)
    labels_arr = np.asarray(labels[:cut], dtype=np.int32)
    if not (labels_arr != IGNORE_INDEX).any():
        where = "after truncation to %d tokens" % cut if cut < len(ids) else "(no assistant answer)"
        raise EmptySampleError(f"No supervised token {where}; conversation has {len(ids)} tokens")
    return RenderedSample(np.asarray(ids[:cut], dtype=np.int32), labels_arr, num_images, num_videos)


def render_prompt(
    conversations: Sequence[dict],
    template: Template | str,
    tokenizer: Tokenizer,
    *,
    image_token_index: int,
    num_image_tokens: int | Sequence[int],
    video_token_index: int | None = None,
    num_video_tokens: Sequence[int] = (),
) -> np.ndarray:
    """Inference prompt ids [T] int32: the conversation (ending with a user turn) + the open assistant role.

    Exactly the ids `render` produces for the same conversation before the answer's first token.
    `num_image_tokens` as in `render`.
    """
    segs = segments(conversations, template, open_prompt=True)
    ids, _, _ = _encode(segs, tokenizer, image_token_index, num_image_tokens, (), video_token_index, num_video_tokens)
    return np.asarray(ids, dtype=np.int32)
