"""Answer a file of questions with the batched engine: what `generate --questions-file` and
`python -m llava_jax.eval run` share.

A `Question` holds the user-turn text the model sees, its images (paths inside the image folder,
encoded bytes, or PIL images) and the answer line to write, in the original's jsonl format
(`question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`, plus whatever a benchmark
adds). `answer_questions` answers them in padded batches and appends one line per answer:

- Resumable: questions whose key is already in the answers file are skipped; a torn last line (a
  run killed mid-write) is cut off first, and each batch is written with one `write` of whole lines.
  At the end of a run the file is put in question order (a resumed run may have answered some
  later), because some original scorers pair answers with labels by position.
- Greedy answers do not depend on the batch: padded rows compute what they compute alone
  (`Engine`), and each question's seed is its position in the question list.
- A question that cannot be asked (missing or unreadable image, an image path leaving the image
  folder, a prompt longer than the context) is reported by id and counted, and the others are
  answered; with `strict` the first one stops the run (`QuestionError`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Union

import PIL.Image

from llava_jax import paths
from llava_jax.data.image import ImageError, load_image, to_rgb
from llava_jax.data.records import record_location, resolve_image_path

if TYPE_CHECKING:  # this module imports no jax: scorers read question files without it
    from llava_jax.inference.engine import Prompt
    from llava_jax.inference.pipeline import Pipeline
    from llava_jax.inference.sampling import SamplingParams

# An image of a question: a path relative to the image folder, encoded file bytes, or a PIL image.
ImageSource = Union[str, bytes, PIL.Image.Image]
# What building one question's prompt may raise (ImageError, ImagePathError and InputError are
# ValueErrors; a malformed record raises KeyError or TypeError).
QUESTION_ERRORS = (ValueError, KeyError, TypeError, OSError)
PREFETCH_BATCHES = 2  # batches whose images load in threads while the current one generates


class QuestionError(ValueError):
    """A question that cannot be asked, in a strict run (the message names its id)."""


@dataclasses.dataclass
class Question:
    """One question to answer.

    Attributes:
      text: the user turn as the model sees it; `<image>` markers where the images go (none: one
        `<image>\\n` per image in front, as the original's `model_vqa` writes it).
      images: the question's images, in marker order.
      line: the answer record to write, in its key order; `text`, `answer_id` and `model_id` are
        filled in when answered.
      seed: the sampling seed of this question (irrelevant to greedy decoding).
    """

    text: str
    images: Sequence[ImageSource]
    line: dict[str, Any]
    seed: int | None = None  # default: SamplingParams.seed + the question's position

    @property
    def key(self) -> str:
        """What identifies the answer in the answers file (see `answer_key`)."""
        return answer_key(self.line)


@dataclasses.dataclass
class AnswerReport:
    """What a run did: answers written now, answers found from an earlier run, failures by id."""

    answered: int = 0
    skipped: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)  # "question <id>: <why>"

    def summary(self, answers_file: str) -> str:
        """One line for the end of a run."""
        text = f"{self.answered} answered, {self.skipped} already in {answers_file}, {len(self.failed)} failed"
        return text + (" (listed above)" if self.failed else "")


def answer_key(line: dict) -> str:
    """The identity of an answer: its question id, and its round for multi-round benchmarks (MMBench)."""
    key = json.dumps(line["question_id"])
    return key if line.get("round_id") is None else f"{key}#{line['round_id']}"


# --- question files -------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[Any]:
    """The JSON values of a .jsonl file (a file holding one JSON list is accepted too).

    A line that is not JSON raises ValueError naming the file and line.
    """
    text = paths.read_text(path)
    if text.lstrip().startswith("["):
        return json.loads(text)
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not valid JSON ({e})") from None
    return out


def read_vqa_questions(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """A `model_vqa` question file: (index, record, None) per good line, (index, None, error) per bad one.

    One JSON object a line with `question_id`, a string `text` and optionally `image` (a JSON list of
    such objects is accepted too). Records count from 0 and errors say `record N (line L)`, as
    training and inspect do (`records.record_location`).
    """
    text = paths.read_text(path)
    if text.lstrip().startswith("["):
        lines = [(None, json.dumps(r)) for r in json.loads(text)]
    else:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for i, (line_no, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, None, f"{record_location(path, i, line_no)}: not valid JSON ({e})"
            continue
        if not isinstance(record, dict) or "question_id" not in record or not isinstance(record.get("text"), str):
            yield i, None, f"{record_location(path, i, line_no)}: needs 'question_id' and a string 'text'"
            continue
        yield i, record, None


def answer_line(question_id: Any, prompt: str, **extra: Any) -> dict[str, Any]:
    """An answer record in the original's key order; `extra` keys go between `text` and `answer_id`."""
    return {"question_id": question_id, "prompt": prompt, "text": None, **extra,
            "answer_id": None, "model_id": None, "metadata": {}}


# --- answers files --------------------------------------------------------------------------------


def read_answers(path: str, *, repair: bool = False) -> list[dict]:
    """The answer records of an answers file ([] if it does not exist).

    A last line without its newline is the torn write of a killed run: with `repair` it is cut off
    the file, otherwise ignored. Lines that are not answer records are skipped.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(data))
    out = []
    for line in data.decode("utf-8").splitlines():
        try:
            record = json.loads(line)
            answer_key(record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # not ours to judge; that question is simply answered again
        out.append(record)
    return out


def _append_lines(path: str, lines: Sequence[dict]) -> None:
    """Whole lines in one write: a kill leaves the file at a line boundary or with one torn tail line."""
    data = "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _put_in_question_order(path: str, order: dict[str, int]) -> None:
    """Rewrite the answers file in question order (atomically) when it is not; other lines go last."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    ranks = []
    for line in lines:
        try:
            ranks.append(order.get(answer_key(json.loads(line)), len(order)))
        except (json.JSONDecodeError, KeyError, TypeError):
            ranks.append(len(order))
    if ranks == sorted(ranks):
        return
    paths.atomic_write(path, "".join(line for _, line in sorted(zip(ranks, lines), key=lambda x: x[0])))


# --- answering ------------------------------------------------------------------------------------


def load_question_images(sources: Sequence[ImageSource], image_folder: str) -> list[PIL.Image.Image]:
    """A question's images as RGB PIL images; paths are resolved safely inside `image_folder`."""
    images = []
    for source in sources:
        if isinstance(source, PIL.Image.Image):
            images.append(to_rgb(source))
        elif isinstance(source, bytes):
            try:
                with PIL.Image.open(io.BytesIO(source)) as img:
                    img.load()
                    images.append(to_rgb(img))
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"cannot decode the embedded image: {type(e).__name__}: {e}") from e
        else:
            images.append(load_image(resolve_image_path(image_folder, source)))
    return images


def build_prompt(pipe: Pipeline, question: Question, image_folder: str, seed: int | None = None) -> Prompt:
    """The engine prompt of one question (raises a QUESTION_ERRORS error saying what is wrong)."""
    images = load_question_images(question.images, image_folder)
    return pipe.question(question.text, pipe.preprocess(images), seed=seed)


def answer_questions(
    pipe: Pipeline,
    questions: Iterable[Question],
    answers_file: str,
    params: SamplingParams,
    *,
    image_folder: str = "",
    batch_size: int = 8,
    strict: bool = False,
    model_id: str | None = None,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
) -> AnswerReport:
    """Answer every question not yet in `answers_file`, appending one line per answer (module docstring).

    Args:
      pipe: the model, tokenizer, image settings and template.
      questions: in file order; a question's position seeds its sampling (`params.seed` + position).
      answers_file: the jsonl to append to (created with its folder).
      params: sampling; temperature 0 is greedy, as every benchmark is run.
      image_folder: where question image paths are (they may not leave it).
      batch_size: rows per generate call (a fixed shape: the last batch is padded).
      strict: raise QuestionError at the first question that cannot be asked.
      model_id: the `model_id` of answer lines (default: the model directory's name).
      progress: a progress bar on stderr (when it is a terminal; llava_jax/progress.py).
      on_error: called with each failure message (default: printed to stderr as "error: ...").
    """
    from llava_jax import progress as progress_bars

    questions = list(questions)
    model_id = model_id or pipe.model_id
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    done = {answer_key(r) for r in read_answers(answers_file, repair=True)}
    order = {}
    for i, q in enumerate(questions):
        order.setdefault(q.key, i)
    todo = [(i, q) for i, q in enumerate(questions) if q.key not in done]
    report = AnswerReport(skipped=len(questions) - len(todo))
    bar = progress_bars.bar(len(todo), desc="answering", unit="q", enabled=progress)  # drawn on a terminal only

    def fail(question: Question, error: Exception) -> None:
        message = f"question {question.line['question_id']}: {error}"
        if strict:
            raise QuestionError(message) from error
        report.failed.append(message)
        if on_error is not None:
            on_error(message)
        else:
            bar.write(f"error: {message}", file=sys.stderr)
        bar.update(1)

    def prepare(item: tuple[int, Question]) -> Prompt:
        index, question = item
        seed = params.seed + index if question.seed is None else question.seed
        return build_prompt(pipe, question, image_folder, seed=seed)

    def flush(batch: list[tuple[Question, Prompt]]) -> None:
        completions = pipe.engine.generate([p for _, p in batch], params, batch_size=batch_size)
        lines = []
        for (question, _), completion in zip(batch, completions):
            line = dict(question.line)
            line.update(text=completion.text.strip(), answer_id=uuid.uuid4().hex, model_id=model_id)
            lines.append(line)
        _append_lines(answers_file, lines)
        report.answered += len(batch)
        bar.update(len(batch))

    with bar, concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        queue: collections.deque = collections.deque()
        upcoming = iter(todo)

        def refill() -> None:
            while len(queue) < PREFETCH_BATCHES * batch_size:
                item = next(upcoming, None)
                if item is None:
                    return
                queue.append((item[1], pool.submit(prepare, item)))

        refill()
        batch: list[tuple[Question, Prompt]] = []
        try:
            while queue:
                question, future = queue.popleft()
                refill()
                try:
                    batch.append((question, future.result()))
                except QUESTION_ERRORS as e:
                    fail(question, e)
                if batch and (len(batch) == batch_size or not queue):
                    flush(batch)
                    batch = []
        finally:
            for _, future in queue:
                future.cancel()
    _put_in_question_order(answers_file, order)
    return report


def chunk(items: Sequence[Any], num_chunks: int, index: int) -> list[Any]:
    """The original's `get_chunk`: chunk `index` of `num_chunks` consecutive chunks of ceil(n / k) items."""
    if not 0 <= index < num_chunks:
        raise ValueError(f"--chunk-idx must be in [0, {num_chunks}); got {index}")
    size = -(-len(items) // num_chunks) or 1
    return list(items[index * size : (index + 1) * size])


def greedy(max_new_tokens: int) -> SamplingParams:
    """Greedy decoding stopped by EOS only: how the original answers every benchmark."""
    from llava_jax.inference.sampling import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
