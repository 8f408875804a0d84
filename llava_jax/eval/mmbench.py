"""MMBench: prompted as LLaVA's `model_vqa_mmbench.py`, the submission as
`scripts/convert_mmbench_for_submission.py`, and circular accuracy where the file has answers.

Data: `mmbench_dev_20230712.tsv` (download.openmmlab.com/mmclassification/datasets/mmbench/), one
question a row with its image inline (base64): columns index, question, hint, A-D, answer (dev
only), category, image, source, l2-category, comment, split.

Prompt: "{hint}\\n" when the hint is present, the question, then "\\nA. {option}" for each option
up to the first missing one, "<image>\\n" in front, and with `--single-pred-prompt` (the LLaVA-1.5
setting, on by default here) "\\nAnswer with the option's letter from the given choices directly."
(`--lang cn`: "请直接回答选项字母。"). A cell is missing as pandas reads it (empty, "nan", "NA",
"None", "null", ... in any of pandas' default spellings) or when it says "nan"/"none" in any case.
With `--all-rounds` each question is asked once per option, the options rotated left by one each
round with the letters kept in place (circular evaluation); the answer line records `round_id`,
the `options` in the order asked and the original letter of each (`option_char`). The answer's
`prompt` is the text without "<image>\\n" and without the suffix. Up to 1024 new tokens.

Submission (`--upload-file`, .xlsx as the original writes it, or .tsv): the
tsv without hint, category, source, image, comment and l2-category, a `prediction` column inserted
before `answer` holding the raw answer text; with several rounds, the last round's answer, as the
original's overwrite leaves it.

Circular accuracy (when the tsv has answers): an answer's letter is the text itself, or its
leading "X.", "X)", "(X)", "X:" or "X " letter, or the letter of the one option whose text it
equals (case and a final "." aside); the letter asked for in round r is the answer's option's
position after r rotations. A question counts as right when every round of it, and every row with
the same index modulo 1,000,000 (MMBench's own circular copies), is right. The official server
also reads free-form answers with ChatGPT; for answers that are letters the two agree.
Result: {"count", "accuracy" (circular, %), "rows", "row_accuracy" (%), "missing"}.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import re
import sys
from typing import Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, Layout, Log, join, register
from llava_jax.inference import answering

ALL_OPTIONS = ["A", "B", "C", "D"]
SUFFIX = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}
# pandas.read_table's default missing-value spellings: these cells are NaN for the original.
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
CIRCULAR_STRIDE = 1_000_000


def read_tsv(path: str) -> list[dict[str, str | None]]:
    """The rows of an MMBench tsv; missing cells (pandas' NA spellings) are None."""
    csv.field_size_limit(sys.maxsize)  # images are inline
    with io.StringIO(paths.read_bytes(path).decode("utf-8"), newline="") as f:  # csv: no newline translation
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        rows = []
        for values in reader:
            if not values:
                continue
            rows.append({k: (None if v in PANDAS_NA else v) for k, v in zip(header, values)})
    return rows


def is_none(value: str | None) -> bool:
    """The original's `is_none` on what pandas gives it."""
    return value is None or value.lower() in ("nan", "none")


def row_options(row: dict) -> list[str]:
    """Options A, B, ... up to the first missing one."""
    options = []
    for letter in ALL_OPTIONS:
        value = row.get(letter)
        if is_none(value):
            break
        options.append(value)
    return options


def row_index(row: dict) -> int | str:
    """The `index` column as the original writes it (an integer)."""
    value = row["index"]
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def mmbench_questions(path: str, single_pred_prompt: bool, all_rounds: bool, lang: str) -> list[answering.Question]:
    """The questions of an MMBench tsv, one per row (per option with all_rounds)."""
    out = []
    for row in read_tsv(path):
        options = row_options(row)
        letters = ALL_OPTIONS[: len(options)]
        image = base64.b64decode(row["image"] or "")
        for round_id in range(len(options) if all_rounds else 1):
            question = row["question"] or ""
            if not is_none(row.get("hint")):
                question = row["hint"] + "\n" + question
            for letter, option in zip(ALL_OPTIONS[: len(options)], options):
                question = question + "\n" + letter + ". " + option
            qs = "<image>\n" + question
            if single_pred_prompt:
                qs = qs + "\n" + SUFFIX["cn" if lang == "cn" else "en"]
            line = {"question_id": row_index(row), "round_id": round_id, "prompt": question, "text": None,
                    "options": list(options), "option_char": list(letters), "answer_id": None, "model_id": None,
                    "metadata": {}}
            out.append(answering.Question(qs, [image], line))
            options = options[1:] + options[:1]
            letters = letters[1:] + letters[:1]
    return out


_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.):]|\s|$)")


def parse_letter(text: str, options: list[str]) -> str | None:
    """The option letter an answer gives (module docstring), or None."""
    letters = ALL_OPTIONS[: len(options)]
    text = text.strip()
    if text.rstrip(".") in letters:
        return text.rstrip(".")
    m = _LEADING_LETTER.match(text)
    if m and m.group(1) in letters:
        return m.group(1)
    plain = text.rstrip(".").strip().lower()
    hits = [letter for letter, option in zip(letters, options) if option.strip().rstrip(".").lower() == plain]
    return hits[0] if len(hits) == 1 else None


def circular_accuracy(rows: list[dict], answers: list[dict]) -> dict[str, Any]:
    """Circular accuracy of answers (by question_id and round_id) on the tsv rows that have answers."""
    by_key = {(json.dumps(a["question_id"]), a.get("round_id") or 0): a for a in answers}
    all_rounds = any(r > 0 for _, r in by_key)
    groups: dict[Any, list[bool]] = {}
    missing = 0
    for row in rows:
        if is_none(row.get("answer")):
            continue
        options = row_options(row)
        truth = ALL_OPTIONS.index(row["answer"].strip())
        qid = row_index(row)
        group = groups.setdefault(qid % CIRCULAR_STRIDE if isinstance(qid, int) else qid, [])
        for r in range(len(options) if all_rounds else 1):
            answer = by_key.get((json.dumps(qid), r))
            if answer is None:
                missing += 1
                group.append(False)
                continue
            asked = options[r:] + options[:r]  # the options in the order that round showed them
            letter = parse_letter(answer["text"], asked)
            group.append(letter is not None and ALL_OPTIONS.index(letter) == (truth - r) % len(options))
    rows_right = [ok for oks in groups.values() for ok in oks]
    right = [all(oks) for oks in groups.values()]
    return {"count": len(right), "accuracy": 100.0 * sum(right) / len(right) if right else 0.0,
            "rows": len(rows_right), "row_accuracy": 100.0 * sum(rows_right) / len(rows_right) if rows_right else 0.0,
            "missing": missing}


def write_submission(path: str, rows: list[dict], answers: list[dict]) -> None:
    """The upload file: the tsv's columns minus DROPPED, `prediction` inserted at position 6."""
    prediction = {}
    for a in answers:  # later rounds overwrite earlier ones, as in the original
        prediction[json.dumps(a["question_id"])] = a["text"]
    columns = [c for c in rows[0] if c not in DROPPED] if rows else []
    columns.insert(6, "prediction")
    table = []
    for row in rows:
        values = dict(row, prediction=prediction.get(json.dumps(row_index(row))), index=row_index(row))
        table.append([values.get(c) for c in columns])
    paths.makedirs(os.path.dirname(paths.absolute(path)))
    if path.endswith(".xlsx"):
        write_xlsx(path, columns, table)
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(columns)
            writer.writerows(["" if v is None else v for v in values] for values in table)


# Why this writer is ours and not a library's: none is kept. The original's `DataFrame.to_excel`
# goes through pandas and openpyxl; neither (nor xlsxwriter) is in setup.py's install_requires or in
# the test environment, and one optional output file (one sheet of strings and integers, write-only)
# is 62 lines here (`_cell_ref` and `write_xlsx`), against a new runtime dependency.
# tests/test_eval_scorers.py reads the sheet back (cells, types, empty cells).
def _cell_ref(row: int, col: int) -> str:
    """A1-style reference of a 0-based cell (row 0, col 27 -> "AB1")."""
    letters = ""
    col += 1
    while col:
        col, rem = divmod(col - 1, 26)
        letters = chr(65 + rem) + letters
    return f"{letters}{row + 1}"


def write_xlsx(path: str, header: list[str], rows: list[list]) -> None:
    """A one-sheet .xlsx (as pandas' to_excel writes the original's upload), without openpyxl.

    Strings are inline strings, integers numbers, None an empty cell: what the MMBench server's
    `pandas.read_excel` reads back as the original's file.
    """
    import zipfile
    from xml.sax.saxutils import escape

    def cell(r: int, c: int, value) -> str:
        ref = _cell_ref(r, c)
        if value is None:
            return ""
        if isinstance(value, int) and not isinstance(value, bool):
            return f'<c r="{ref}"><v>{value}</v></c>'
        text = escape(str(value))
        return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'

    sheet_rows = []
    for r, values in enumerate([header, *rows]):
        sheet_rows.append(f'<row r="{r + 1}">' + "".join(cell(r, c, v) for c, v in enumerate(values)) + "</row>")
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    pkg = "http://schemas.openxmlformats.org/package/2006/relationships"
    files = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>'),
        "_rels/.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="{pkg}">'
            f'<Relationship Id="rId1" Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>'),
        "xl/workbook.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook xmlns="{main}" xmlns:r="{rel}">'
            '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="{pkg}">'
            f'<Relationship Id="rId1" Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'),
        "xl/worksheets/sheet1.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet xmlns="{main}"><sheetData>'
            + "".join(sheet_rows) + "</sheetData></worksheet>"),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    paths.atomic_write(path, buffer.getvalue())


def score_files(annotation_file: str, result_file: str, upload_file: str | None, log: Log = print) -> dict[str, Any]:
    """Write the submission (when `upload_file`) and the circular accuracy where the tsv has answers."""
    rows = read_tsv(annotation_file)
    answers = answering.read_jsonl(result_file)
    if upload_file:
        write_submission(upload_file, rows, answers)
        log(f"submission for the MMBench server: {upload_file}")
    result = circular_accuracy(rows, answers)
    if result["count"]:
        log(f"Circular accuracy: {result['accuracy']:.2f}% of {result['count']} questions "
            f"({result['row_accuracy']:.2f}% of {result['rows']} rows)")
    return result


@register
class MMBench(Benchmark):
    name = "mmbench"
    title = "MMBench"
    max_new_tokens = 1024
    metric = "accuracy"
    metric_label = "circular accuracy, dev (%)"
    paper = (64.3, 67.7)

    def add_run_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--single-pred-prompt", action=argparse.BooleanOptionalAction, default=True,
                       help="ask for the option's letter (the LLaVA-1.5 setting; default on)")
        p.add_argument("--all-rounds", action="store_true", help="ask once per option, rotating the options")
        p.add_argument("--lang", default="en", choices=["en", "cn"])

    def questions(self, question_file: str, args: argparse.Namespace) -> list[answering.Question]:
        return mmbench_questions(question_file, args.single_pred_prompt, args.all_rounds, args.lang)

    def add_score_flags(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--annotation-file", required=True, help="the MMBench tsv")
        p.add_argument("--result-file", default=None, help="answers (default: RESULT_DIR/EXPERIMENT.jsonl)")
        p.add_argument("--upload-file", default=None, help=".xlsx or .tsv (default: UPLOAD_DIR/EXPERIMENT.xlsx)")
        p.add_argument("--result-dir", default=None, help="the original's flags")
        p.add_argument("--upload-dir", default=None)
        p.add_argument("--experiment", default=None)

    def score(self, args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
        result_file = args.result_file
        if result_file is None:
            if not (args.result_dir and args.experiment):
                raise ValueError("give --result-file, or --result-dir and --experiment as the original takes them")
            result_file = os.path.join(args.result_dir, f"{args.experiment}.jsonl")
        upload = args.upload_file
        if upload is None and args.upload_dir and args.experiment:
            upload = os.path.join(args.upload_dir, f"{args.experiment}.xlsx")
        return score_files(args.annotation_file, result_file, upload, log)

    def layout(self, root: str) -> Layout:
        return Layout(join(root, "mmbench", "mmbench_dev_20230712.tsv"), join(root, "mmbench"))

    def suite_score_argv(self, root: str, answers_file: str, out_dir: str) -> list[str]:
        return ["--annotation-file", self.layout(root).question_file, "--result-file", answers_file,
                "--upload-file", join(out_dir, "mmbench_dev_20230712.tsv")]
