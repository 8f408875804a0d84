"""launch/: usage text, and --dry-run's commands parsed back into the arguments the user typed."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("gpu_single_node.sh", "slurm_gpu.sbatch", "tpu_pod.sh")
TRICKY = "--config.data.image_folder=/data/my images/$HOME;x"  # a space, a $ and a ; that must arrive as typed


def _run(script, *args, cwd=ROOT):
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_is_the_comment_block(script):
    r = _run(script)
    assert r.returncode == 2
    assert r.stdout.splitlines()[0].startswith(("Train on one machine", "Train on a GPU cluster", "Train on a Cloud TPU"))
    assert "set -euo" not in r.stdout and "SBATCH" not in r.stdout and "#" not in r.stdout, r.stdout
    assert "--dry-run" in r.stdout


def test_gpu_single_node_resolves_paths_where_it_is_run(tmp_path):
    (tmp_path / "mine.py").write_text("")
    r = _run("gpu_single_node.sh", "--dry-run", "mine.py:7b", "runs/a", TRICKY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cd, cmd = r.stdout.splitlines()
    assert shlex.split(cd) == ["cd", ROOT]
    assert shlex.split(cmd) == ["python", "-m", "llava_jax.train", f"--config={tmp_path}/mine.py:7b",
                                f"--workdir={tmp_path}/runs/a", TRICKY]
    r = _run("gpu_single_node.sh", "--dry-run", "configs/llava15.py:7b", "gs://b/run", cwd=tmp_path)
    assert shlex.split(r.stdout.splitlines()[1])[3:] == ["--config=configs/llava15.py:7b", "--workdir=gs://b/run"]


def test_slurm_prints_sbatch_and_srun():
    r = _run("slurm_gpu.sbatch", "--dry-run", "configs/llava15.py:7b", "/shared/run", TRICKY)
    assert r.returncode == 0, r.stderr
    sbatch, note, srun = r.stdout.splitlines()
    assert shlex.split(sbatch)[2:] == ["configs/llava15.py:7b", "/shared/run", TRICKY]
    assert note.startswith("# in the job")
    assert shlex.split(srun) == ["srun", "--kill-on-bad-exit=1", "python", "-m", "llava_jax.train",
                                 "--config=configs/llava15.py:7b", "--workdir=/shared/run", TRICKY]


def test_tpu_pod_passes_arguments_to_every_host_as_typed():
    r = _run("tpu_pod.sh", "--dry-run", "my-tpu", "us-east5-a", "configs/llava15.py:7b", "gs://b/run", TRICKY)
    assert r.returncode == 0, r.stderr
    tar, scp, ssh = r.stdout.splitlines()
    assert shlex.split(tar)[:3] == ["tar", "-C", ROOT]
    assert shlex.split(scp)[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "my-tpu:~/" in shlex.split(scp)
    argv = shlex.split(ssh)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in argv
    remote = argv[argv.index("--command") + 1]
    # What the remote shell runs last: the training command, its arguments intact.
    train = shlex.split(remote.split("; ")[-1])
    assert train == ["python", "-m", "llava_jax.train", "--config=configs/llava15.py:7b", "--workdir=gs://b/run", TRICKY]
    assert "pip install -q -e '.[gcs]'" in remote


@pytest.mark.parametrize("config,extra", [("configs/tiny.py", []), ("mine.py:7b", ["mine.py"])])
def test_tpu_pod_ships_the_package_not_local_outputs(tmp_path, config, extra):
    """The tar of --dry-run, run on a checkout holding what the README's LoRA and export commands leave."""
    import tarfile  # pylint: disable=g-import-not-at-top

    repo = tmp_path / "repo"
    for name in ("llava_jax/__init__.py", "llava_jax/__pycache__/x.cpython-311.pyc", "configs/tiny.py", "setup.py",
                 "mine.py", "README.md", "workdir/ckpt", "workdir-lora/ckpt", "lora-hf/adapter.safetensors",
                 "merged-hf/model.safetensors", ".venv/bin/python", ".git/HEAD", "notes.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(name)
    (repo / "launch").mkdir()
    for script in SCRIPTS:
        with open(os.path.join(ROOT, "launch", script)) as f:
            (repo / "launch" / script).write_text(f.read())
    r = subprocess.run(["bash", str(repo / "launch" / "tpu_pod.sh"), "--dry-run", "tpu", "zone", config, "gs://b/r"],
                       cwd=repo, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    tar = shlex.split(r.stdout.splitlines()[0])
    archive = tmp_path / "ship.tgz"
    tar[tar.index("-czf") + 1] = str(archive)
    subprocess.run(tar, check=True, timeout=60)
    with tarfile.open(archive) as t:
        files = sorted(m.name for m in t.getmembers() if m.isfile())
    assert files == sorted(["llava_jax/__init__.py", "configs/tiny.py", "setup.py", *extra,
                            *(f"launch/{s}" for s in SCRIPTS)])
