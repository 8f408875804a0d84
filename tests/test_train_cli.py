"""`python -m llava_jax.train` as a user types it: config overrides, --help, errors as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from llava_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_config_overrides_apply_with_and_without_config():
    """`--config.KEY=VALUE` on the embedded default (no --config) and on a config file alike."""
    code = ("import sys; from absl import flags; from llava_jax.train import __main__ as m; "
            "flags.FLAGS(sys.argv); c = m._CONFIG.value; "
            "print(c.max_steps, c.stages[1].learning_rate, c.data.synthetic_args.num_train)")
    plain = _run("-c", code, "--config.max_steps=5", "--config.stages[1].learning_rate=0.5",
                 "--config.data.synthetic_args.num_train=7")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.split() == ["5", "0.5", "7"]
    with_file = _run("-c", code, "--config=configs/tiny.py:smoke", "--config.max_steps=3")
    assert with_file.returncode == 0, with_file.stderr[-2000:]
    assert with_file.stdout.split() == ["3", "0.002", "2000"]


def test_help_lists_the_embedded_default_one_field_a_line():
    r = _run("-m", "llava_jax.train", "--help")  # absl exits 1 after --help
    for line in ("  max_steps = -1", "  stages[0].name = 'pretrain'", "  data.synthetic_args.num_train = 2000",
                 "  model.text.hidden_size = 128"):
        assert line + "\n" in r.stdout, r.stdout
    assert "_locked" not in r.stdout and "!!python" not in r.stdout


def test_malformed_training_record_is_one_line_with_exit_2(tmp_path):
    paths = synthetic.build(tmp_path / "syn", num_train=4, num_val=2, image_size=28)
    good = json.loads(open(paths["stage1"]).read())[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n\n" + json.dumps({"id": "broken", "conversations": []}) + "\n")
    r = _run("-m", "llava_jax.train", f"--workdir={tmp_path / 'w'}", "--config.data.synthetic=False",
             f"--config.data.tokenizer={paths['tokenizer']}", f"--config.data.image_folder={paths['image_folder']}",
             f"--config.stages[0].data={bad}", "--config.data.val=", "--config.progress=False",
             "--config.stages[1].eval_benchmarks=()")  # the default's shapes benchmark reads synthetic data
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert errors == [f"llava_jax.train: error: {bad}: record 1 (line 3, id 'broken'): field 'conversations' must be a "
                      "non-empty list of {'from', 'value'} turns (--debug shows the traceback)"], r.stderr[-3000:]


def test_log_lines_are_not_glued_to_the_progress_bar(monkeypatch):
    """On a terminal, log records go through the bar: each starts its own line, the bar is redrawn below."""
    import io
    import logging

    from tqdm import tqdm

    from llava_jax.train.loop import _logging_through

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    bar = tqdm(total=3, file=out, desc="pretrain", mininterval=0)
    bar.update(1)
    with _logging_through(bar):
        logging.getLogger("llava_jax.train").warning("hello")
        bar.update(1)
    bar.close()
    lines = [segment.split("\r")[-1] for segment in out.getvalue().split("\n")]
    assert "LOG hello" in lines, out.getvalue()


def test_data_summary_says_what_empty_rows_are():
    from llava_jax.data.pipeline import DataStats

    stats = DataStats()
    stats.add_batch(6, 8)
    assert stats.summary() == ("6 samples in 1 batches, 2 rows left empty (the loss ignores them: each epoch's last "
                               "batch is filled up to the batch size, and a skipped sample leaves its row empty); "
                               "skipped 0")
