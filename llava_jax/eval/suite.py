"""Several benchmarks in one go: answer, score, and one results table beside the paper's figures.

`run_suite` answers each benchmark from the original's data layout under a data root
(`playground/data/eval`: `pope/`, `scienceqa/`, `textvqa/`, `gqa/`, `vqav2/`, `vizwiz/`, `MME/`,
`mmbench/`, `seed_bench/`; see each benchmark's `layout`), scores it with the same code as `eval
score`, and writes
`results.json` and `results.md` into the output folder, with the answers under `answers/` and each
scorer's printout as `<name>_score.txt`. `evaluate_stage` is the same for the training loop: the
stage's model directory, the stage's `eval_benchmarks`, metrics named `bench/<name>`.

The data root, the model and the output folder may each be local or `gs://` (`llava_jax.paths`).
Answers are appended line by line (resumable), which GCS cannot do: for a `gs://` output folder the
suite works in a local folder, starting from the answers already there, and copies the folder out
after each benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from llava_jax import paths
from llava_jax.eval.benchmark import Benchmark, get_benchmark
from llava_jax.eval.harness import quiet_log, run_benchmark, score_benchmark

if TYPE_CHECKING:
    from llava_jax.inference.pipeline import Pipeline

log = logging.getLogger("llava_jax.eval")
PAPER_MODELS = ("LLaVA-1.5-7B", "LLaVA-1.5-13B")


@dataclasses.dataclass
class Row:
    """One benchmark's line of the results table."""

    name: str
    ours: float | None  # the headline figure, None when a server scores it
    result: dict[str, Any]  # everything `eval score` returned
    answered: int = 0
    failed: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        bench = get_benchmark(self.name)
        paper = dict(zip(PAPER_MODELS, bench.paper)) if bench.paper else {}
        return {"benchmark": bench.title, "metric": bench.metric_label, "ours": self.ours, "paper": paper,
                "answered": self.answered, "failed": self.failed, "note": self.note, "result": self.result}


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def results_table(rows: list[Row]) -> str:
    """A markdown table: benchmark, metric, ours, the paper's LLaVA-1.5-7B and -13B."""
    lines = ["| benchmark | metric | ours | " + " | ".join(PAPER_MODELS) + " |", "|---|---|---|---|---|"]
    for row in rows:
        bench = get_benchmark(row.name)
        paper = bench.paper or (None, None)
        ours = _fmt(row.ours) + (f" ({row.note})" if row.note else "")
        lines.append(f"| {bench.title} | {bench.metric_label} | {ours} | {_fmt(paper[0])} | {_fmt(paper[1])} |")
    return "\n".join(lines) + "\n"


def table_from_metrics(metrics: dict[str, Any]) -> str:
    """The results table of `bench/<name>` metrics (what the training loop logs); "" if none."""
    rows = [Row(k.split("/", 1)[1], v, {}) for k, v in metrics.items() if k.startswith("bench/") and k.count("/") == 1]
    return results_table(rows) if rows else ""


def write_results(rows: list[Row], output_dir: str) -> tuple[str, str]:
    """results.json and results.md in `output_dir` (local or `gs://`); returns their paths."""
    paths.makedirs(output_dir)
    json_path, md_path = os.path.join(output_dir, "results.json"), os.path.join(output_dir, "results.md")
    paths.write_text(json_path, json.dumps({row.name: row.as_dict() for row in rows}, indent=1, default=float))
    paths.write_text(md_path, results_table(rows))
    return json_path, md_path


def run_suite(
    pipe: "Pipeline",
    data_root: str,
    names: list[str],
    output_dir: str,
    *,
    batch_size: int = 16,
    strict: bool = False,
    progress: bool = True,
    model_id: str | None = None,
) -> list[Row]:
    """Answer and score each named benchmark from `data_root`; writes results.json and results.md.

    `data_root` and `output_dir` may be local or `gs://` (see the module docstring).
    """
    benches = [get_benchmark(n) for n in names]  # unknown names fail before any work
    for bench in benches:  # missing data fails before any work too
        layout = bench.layout(data_root)
        for path in (layout.question_file, layout.image_folder):
            if not paths.exists(path):
                raise FileNotFoundError(f"{bench.name}: {path} not found (the original's layout under --data-root)")
    # Answers files are appended to: on GCS, answer into a local copy of the output folder.
    work_dir = tempfile.mkdtemp(prefix="llava_jax_suite_") if paths.is_remote(output_dir) else output_dir
    try:
        rows = []
        for bench in benches:
            rows.append(_answer_and_score(bench, pipe, data_root, output_dir, work_dir, batch_size=batch_size,
                                          strict=strict, progress=progress, model_id=model_id))
        write_results(rows, output_dir)
    finally:
        if work_dir != output_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return rows


def _answer_and_score(bench: Benchmark, pipe: "Pipeline", data_root: str, output_dir: str, work_dir: str,
                      **kwargs) -> Row:
    """One benchmark of `run_suite`, answered and scored in `work_dir`, which is then copied to `output_dir`."""
    layout = bench.layout(data_root)
    answers_file = os.path.join(work_dir, "answers", f"{bench.name}.jsonl")
    remote_answers = os.path.join(output_dir, "answers", f"{bench.name}.jsonl")
    if work_dir != output_dir and paths.exists(remote_answers):  # resume from the answers already on GCS
        os.makedirs(os.path.dirname(answers_file), exist_ok=True)
        paths.copy(remote_answers, answers_file)
    log.info("%s: answering %s", bench.name, layout.question_file)
    try:
        report = run_benchmark(bench, pipe, layout.question_file, layout.image_folder, answers_file,
                               on_error=lambda m: log.warning("%s", m), **kwargs)
    except BaseException:  # what was answered is kept on GCS, also when answering ends in an error
        if work_dir != output_dir and os.path.exists(answers_file):
            paths.copy(answers_file, remote_answers)
        raise
    collect, printout = quiet_log()
    result = score_benchmark(bench, bench.suite_score_argv(data_root, answers_file, work_dir), collect)
    with open(os.path.join(work_dir, f"{bench.name}_score.txt"), "w") as f:
        f.write(printout.getvalue())
    if work_dir != output_dir:  # the answers, the score printout and what the scorer wrote, uploaded once
        paths.copytree(work_dir, output_dir)
    note = "" if bench.metric is not None else "submit to the server"
    row = Row(bench.name, bench.headline(result), result, report.answered + report.skipped, len(report.failed), note)
    log.info("%s: %s = %s", bench.name, bench.metric_label, _fmt(row.ours))
    return row


def evaluate_stage(model_dir: str, names: list[str], data_root: str, output_dir: str, batch_size: int = 32,
                   dtype: str | None = None) -> dict[str, float]:
    """The training loop's end-of-stage benchmarks: {"bench/<name>": headline figure} (none for servers).

    The stage's model directory is loaded in `dtype` (the run's compute dtype) on this process's
    devices; answers, results.md and results.json go to `output_dir`.
    """
    from llava_jax.inference.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_dir, dtype=dtype)
    rows = run_suite(pipe, data_root, list(names), output_dir, batch_size=batch_size, progress=False)
    return {f"bench/{row.name}": float(row.ours) for row in rows if row.ours is not None}


class SuiteBenchmarks:
    """The training loop's end-of-stage benchmarks (`train.loop.StageBenchmarks`), by registry name.

    `python -m llava_jax.train` hands one to `loop.run`: training sits below evaluation in the
    package's layers, so the loop never imports this module itself.
    """

    def question_file(self, name: str, data_root: str) -> str:
        """The benchmark's question file under `data_root`; KeyError (with the known names) for an unknown one."""
        return get_benchmark(name).layout(data_root).question_file

    def run(self, model_dir: str, names: list[str], data_root: str, output_dir: str, batch_size: int,
            dtype: str) -> dict[str, float]:
        """Answers and scores `names` with the stage's model: {"bench/<name>": headline figure}."""
        return evaluate_stage(model_dir, names, data_root, output_dir, batch_size, dtype)
