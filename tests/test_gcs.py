"""A Cloud TPU user's workdir on GCS, end to end, against a local GCS emulator (127.0.0.1 only).

`python -m llava_jax.train --workdir=gs://...` builds its data there, trains reading records,
images and the tokenizer from there, checkpoints there (Orbax, TensorStore), is killed with -9,
resumes from there, and writes model directories that load from there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "_train_config.py")
BUCKET = "llava-test"
# Three steps a stage, a checkpoint every step (global steps 1-3 stage 1, 4-6 stage 2), no eval set.
OVERRIDES = ["--config.max_steps=3", "--config.checkpoint_every=1", "--config.data.synthetic_args.num_train=16",
             "--config.data.synthetic_args.num_val=0", "--config.progress=True"]

@pytest.fixture(scope="module")
def gcs():
    """(env for clients, base URL) of a fresh in-memory emulator with one bucket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "tests._gcs_emulator", str(port), BUCKET], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no storage-layout API in the emulator
           # The runs share the test session's compilation cache (tests/conftest.py) through os.environ.
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    yield env, url
    proc.kill()
    proc.wait()


def _objects(url: str, prefix: str) -> list[str]:
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}") as r:
        return [item["name"] for item in json.load(r).get("items", [])]


def _read(url: str, name: str) -> bytes:
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media") as r:
        return r.read()


def _delete(url: str, prefix: str) -> None:
    for name in _objects(url, prefix):
        req = urllib.request.Request(f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}",
                                     method="DELETE")
        urllib.request.urlopen(req).close()


def _train(env, workdir, **kw):
    cmd = [sys.executable, "-m", "llava_jax.train", f"--config={CONFIG}", f"--workdir={workdir}", *OVERRIDES]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **kw)


@pytest.mark.slow(seconds=60)
def test_workdir_on_gcs_trains_checkpoints_is_killed_and_resumes(gcs, monkeypatch):
    env, url = gcs
    workdir = f"gs://{BUCKET}/run"
    first = _train(env, workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill -9 once stage 1 has committed its second mid-stage checkpoint (global step 2).
    deadline = time.time() + 600
    while not _objects(url, "run/checkpoints/2/commit_success"):
        if first.poll() is not None or time.time() > deadline:
            pytest.fail(f"the run ended before its step-2 checkpoint:\n{first.stderr.read()[-3000:]}")
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert {"data/manifest.json", "data/tokenizer.model", "data/images/train_00000.png"} <= {
        name[len("run/"):] for name in _objects(url, "run/data/")}
    # Rewind to checkpoint 1 (stage 1 step 1) so that the resumed run logs step 2 again.
    _delete(url, "run/checkpoints/2")
    _delete(url, "run/checkpoints/3")
    again = _train(env, workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resuming from checkpoint 1 (stage 1, step 1/3)" in err and "restored step 1 and the data position" in err
    # The output as a log file shows it: no progress bar off a terminal, no stray line on stdout.
    assert out == f"model: {workdir}/stage2_finetune\n", out
    assert "\r" not in err and "it/s" not in err, err[-2000:]
    # Metrics were kept up to the checkpoint the run was killed after; step 2 again gives the same loss.
    records = [json.loads(line) for line in _read(url, "run/metrics.jsonl").decode().splitlines()]
    losses: dict[int, list[float]] = {}
    for r in records:
        if "loss" in r:
            losses.setdefault(r["step"], []).append(r["loss"])
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and len(losses[2]) == 2, losses
    assert all(abs(v[0] - v[-1]) <= 1e-6 * abs(v[0]) for v in losses.values()), losses
    # The model directory and the final checkpoint load from GCS and hold the same parameters.
    import jax
    import numpy as np

    from llava_jax import load_pretrained
    from llava_jax.weights.converted import load_params

    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.setenv(key, env[key])
    model = load_pretrained(f"{workdir}/stage2_finetune")
    _, checkpoint = load_params(f"{workdir}/checkpoints/6")
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), model.params, checkpoint)
    assert all(jax.tree.leaves(same)) and model.config.num_image_tokens == 16
