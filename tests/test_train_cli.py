"""`python -m llava_jax.train` as a user types it: config overrides, --help, errors as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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

    from llava_jax.progress import logging_through as _logging_through

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


def test_every_config_field_read_in_train_is_declared_and_read_by_attribute():
    """No `.get(key, default)` on a config in llava_jax/train (a second default drifts from the declared one,
    as eval_max_length's 512 did from 2048), and every `config.A.B` / `stage.A` read names a declared field."""
    import ast
    import glob

    import ml_collections

    from llava_jax.train import defaults

    base = defaults.base_config()
    template = defaults.stage("s", data="d", template="plain", trainable=[], learning_rate=1.0, global_batch=1,
                              micro_batch=1)
    roots = {"config": base, "stage": template, "m": base.model, "d": base.data, "data_cfg": base.data}
    ALIASES = ("m", "d", "data_cfg")  # the loop's and aot's short names for config.model / config.data
    problems = []
    for path in sorted(glob.glob(os.path.join(ROOT, "llava_jax", "train", "*.py"))):
        tree = ast.parse(open(path).read())
        inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or id(node) in inner:
                continue  # only whole chains: config.data.eval_max_length, not its config.data part
            chain, base_node = [], node
            while isinstance(base_node, ast.Attribute):
                chain.insert(0, base_node.attr)
                base_node = base_node.value
            name = base_node.id if isinstance(base_node, ast.Name) else None
            if name in ("run", "self") and chain[:1] == ["config"]:  # run.config.X
                name, chain = "config", chain[1:]
            if name not in roots:
                continue
            if name in ALIASES and chain[0] != "get" and chain[0] not in roots[name]:
                continue  # `m` or `d` holding something else (a regex match) in this function
            value, where = roots[name], f"{os.path.basename(path)}:{node.lineno} {name}.{'.'.join(chain)}"
            for attr in chain:
                if not isinstance(value, ml_collections.ConfigDict):
                    break  # a value's own attribute, or a field declared None (stage.lora)
                if attr == "get":
                    problems.append(f"{where}: .get() instead of a declared field")
                    break
                if attr in value:
                    value = value[attr]
                elif hasattr(value, attr):
                    break  # a ConfigDict method (to_dict, ...)
                else:
                    problems.append(f"{where}: {attr!r} is not declared")
                    break
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config_file,arg", [("llava_jax/train/defaults.py", ""), ("configs/tiny.py", "smoke"),
                                             ("configs/tiny.py", "lora"), ("configs/tiny.py", "media"),
                                             ("configs/llava15.py", "7b_lora"),
                                             ("configs/llava_v1.py", "13b"), ("tests/_train_config.py", "lora"),
                                             ("configs/llava_onevision.py", "qwen2_7b"),
                                             ("configs/llava_onevision.py", "qwen2_05b_ov")])
def test_recipes_set_declared_fields_only(config_file, arg):
    """Recipes build on base_config and set values: none adds a field the base (or the stage template) lacks."""
    import importlib.util
    import re

    from llava_jax.train import defaults

    spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, config_file))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config(arg)
    declared = {line.split(" = ")[0] for line in defaults.describe(defaults.base_config())}
    for lora in (None, defaults.lora()):  # a stage without LoRA, and one with
        template = defaults.stage("s", data="d", template="plain", trainable=[], learning_rate=1.0, global_batch=1,
                                  micro_batch=1, lora=lora)
        declared |= {f"stages[N].{line.split(' = ')[0]}" for line in defaults.describe(template)}
    found = {re.sub(r"^stages\[\d+\]", "stages[N]", line.split(" = ")[0]) for line in defaults.describe(config)}
    assert found - declared == set()


@pytest.mark.slow(seconds=10)
def test_onevision_recipe_is_the_scripts_and_validates_through_the_cli():
    """configs/llava_onevision.py as `python -m llava_jax.train` reads and checks it (validate, with the eval
    registry), holding the numbers of LLaVA-NeXT's pretrain_siglip.sh / finetune_si.sh / finetune_ov.sh; each
    variant validates; an unknown variant is one line and exit status 2."""
    import importlib.util

    from llava_jax.train.validate import validate

    fields = ("name", "template", "trainable", "learning_rate", "vision_learning_rate", "global_batch", "micro_batch",
              "max_length", "epochs", "warmup_ratio", "weight_decay", "base_resolution")
    code = ("import sys, json; from absl import flags; from llava_jax.train import __main__ as m; "
            "from llava_jax.train.validate import validate; from llava_jax.eval.benchmark import BENCHMARKS; "
            "flags.FLAGS(sys.argv); c = m._CONFIG.value; validate(c, BENCHMARKS); "
            "print(json.dumps([c.model.preset, c.data.eval_template, "
            f"[[s[k] for k in {fields!r}] for s in c.stages]]))")
    r = _run("-c", code, "--config=configs/llava_onevision.py:qwen2_7b", "--config.model.init=/ckpt/onevision")
    assert r.returncode == 0, r.stderr[-2000:]
    everything = ["projector/.*", "language_model/.*", "image_newline", "vision_tower/.*"]
    tuned = ["qwen_1_5", everything, 1e-5, 2e-6, 256, 128, 32768, 1.0, 0.03, 0.0, False]
    assert json.loads(r.stdout) == ["llava-onevision-qwen2-7b", "qwen_1_5", [
        ["pretrain", "plain", ["projector/.*"], 1e-3, 0.0, 256, 256, 8192, 1.0, 0.03, 0.0, True],
        ["si", *tuned], ["ov", *tuned]]]

    spec = importlib.util.spec_from_file_location("onevision_recipe", os.path.join(ROOT, "configs/llava_onevision.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    for llm in ("qwen2_7b", "qwen2_05b"):
        for only in ("", "_stage1", "_si", "_ov"):
            config = recipe.get_config(llm + only)
            config.model.init = "/ckpt/onevision"
            validate(config)
            assert [s.name for s in config.stages] == ({"_stage1": ["pretrain"], "_si": ["si"], "_ov": ["ov"]}
                                                       .get(only, ["pretrain", "si", "ov"]))
    assert recipe.get_config("qwen2_05b").model.preset == "llava-onevision-qwen2-0.5b"
    bad = _run("-m", "llava_jax.train", "--config=configs/llava_onevision.py:qwen3_7b")
    assert bad.returncode == 2 and "qwen3_7b" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_sharding_rules_override_is_accepted_and_used():
    code = ("import sys; from absl import flags; from llava_jax.train import __main__ as m; "
            "from llava_jax.train.program import rules_from_config; "
            "flags.FLAGS(sys.argv); print(dict(rules_from_config(m._CONFIG.value))['vocab'])")
    rules = ("(('activation_batch', ('data', 'fsdp')), ('activation_length', None), ('vocab', 'tensor'))")
    r = _run("-c", code, f"--config.sharding_rules={rules}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["tensor"]


def test_help_lists_every_declared_field():
    from llava_jax.train import defaults

    r = _run("-m", "llava_jax.train", "--help")
    listed = {line.strip().split(" = ")[0] for line in r.stdout.splitlines() if " = " in line}
    declared = {line.split(" = ")[0] for line in defaults.describe(defaults.base_config())} - {"stages"}
    template = defaults.stage("s", data="d", template="plain", trainable=[], learning_rate=1.0, global_batch=1,
                              micro_batch=1)
    declared |= {f"stages[0].{line.split(' = ')[0]}" for line in defaults.describe(template)}
    assert "sharding_rules" in declared and declared - listed == set(), r.stdout


@pytest.mark.parametrize("override,expected", [
    ("--config.max_stepz=5",
     "--config.max_stepz: no such field 'max_stepz' in the config; Did you mean \"max_steps\" instead of \"max_stepz\"?"),
    ("--config.stages[5].epochs=1", "--config.stages[5].epochs: a list index past the end of the config's list"),
    ("--config.model.dtype=float33",
     "config.model.dtype: 'float33'; expected one of float32, bfloat16, float16 (--debug shows the traceback)"),
    ("--config.stages[1].remat=fulll", "config.stages[1].remat: 'fulll'; expected one of "),
    ("--config.max_steps=five", "flag --config.max_steps=five: invalid literal for int() with base 10: 'five'"),
])
def test_config_errors_are_one_line_with_exit_2_before_any_work(tmp_path, override, expected):
    workdir = tmp_path / "w"
    r = _run("-m", "llava_jax.train", f"--workdir={workdir}", override, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"llava_jax.train: error: {expected}"), r.stderr[-3000:]
    assert not workdir.exists()  # no synthetic data generated, no checkpoints/ created


def test_a_flag_that_does_not_fit_is_answered_before_jax_is_imported():
    """absl parses `--config.KEY=VALUE` as the flag is defined: an unknown field is answered before jax and
    flax load (about 1.5 CPU-s of every start), so a typo costs a fraction of a second."""
    code = ("import runpy, sys\n"
            "sys.argv = ['llava_jax.train', '--config.max_stepz=5']\n"
            "try:\n"
            "    runpy.run_module('llava_jax.train', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted({'jax', 'flax'} & set(sys.modules)))\n")
    r = _run("-c", code)
    assert r.stdout.strip() == "2 []", (r.stdout, r.stderr[-3000:])
    assert "no such field 'max_stepz'" in r.stderr, r.stderr[-3000:]


def _json_data_run(tmp_path, *overrides):
    built = synthetic.build(tmp_path / "syn", num_train=8, num_val=2, image_size=28)
    return built, _run("-m", "llava_jax.train", f"--workdir={tmp_path / 'w'}", "--config=tests/_train_config.py",
                       "--config.data.synthetic=False", f"--config.data.tokenizer={built['tokenizer']}",
                       f"--config.data.image_folder={built['image_folder']}", f"--config.stages[0].data={built['stage1']}",
                       "--config.data.val=", *overrides)


def test_stage_2_data_that_is_not_json_stops_the_run_before_stage_1_trains(tmp_path):
    bad = tmp_path / "stage2.json"
    bad.write_text('[{"id": "a", "conversations": []}\n{"id": "b"}]')
    _, r = _json_data_run(tmp_path, f"--config.stages[1].data={bad}")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert errors == [f"llava_jax.train: error: {bad}: not valid JSON: Expecting ',' delimiter: line 2 column 1 "
                      "(char 34) (--debug shows the traceback)"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "stage1_pretrain").exists() and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_truncated_packed_shard_of_stage_2_stops_the_run_before_stage_1_trains(tmp_path):
    from llava_jax.data import pack

    built = synthetic.build(tmp_path / "syn", num_train=8, num_val=2, image_size=28)
    packed = tmp_path / "packed"
    manifest = pack.pack(built["stage2"], built["image_folder"], str(packed), num_shards=1)
    shard = packed / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    _, r = _json_data_run(tmp_path, f"--config.stages[1].data={packed}")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"llava_jax.train: error: {shard}: ") and "truncated" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "stage1_pretrain").exists() and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_progress_bar_writes_no_frames_when_stderr_is_a_file(tmp_path):
    """`2>file`: no carriage-return frames for an error line to be glued onto; the line arrives alone."""
    code = ("import sys, logging; from llava_jax import progress; logging.basicConfig(format='%(message)s'); "
            "bar = progress.bar(5, desc='answering', unit='q')\n"
            "with progress.logging_through(bar):\n"
            "    bar.update(3); logging.getLogger('x').warning('a log line'); bar.write('error: a line', file=sys.stderr)\n"
            "bar.update(2); bar.close()")
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=f,
                           timeout=60)
    assert r.returncode == 0, err.read_text()
    assert err.read_text() == "a log line\nerror: a line\n"
