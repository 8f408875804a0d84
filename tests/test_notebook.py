"""The Colab notebook runs top to bottom on a CPU runtime without network (quick mode), as a user runs it."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu_demo.ipynb")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow(seconds=150)
def test_smoke_colab_notebook_runs_on_cpu_and_skips_what_needs_a_tpu(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)  # cell ids included (nbformat 4.5)
    assert len({c.id for c in nb.cells}) == len(nb.cells)
    for key, value in {"LLAVA_JAX_NOTEBOOK_QUICK": "1", "LLAVA_JAX_DEMO_WORKDIR": str(tmp_path / "demo"),
                       "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}.items():
        monkeypatch.setenv(key, value)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    out = {c.id: _text(c) for c in nb.cells if c.cell_type == "code"}
    assert f"llava_jax is installed from {ROOT}" in out["install"], out["install"]
    assert out["train"].endswith(f"model: {tmp_path / 'demo'}/stage2_finetune\n"), out["train"][-3000:]
    assert any(o.get("output_type") == "display_data" for o in nb.cells[[c.id for c in nb.cells].index("generate")].outputs)
    assert "--max-new-tokens 16" in out["generate"], out["generate"]
    assert "the answer's first token" in out["python-api"], out["python-api"]
    assert out["tpu-train"].startswith("Skipped: this runtime has no TPU")
    assert out["7b-check"].startswith("Skipped: section 4 needs a TPU runtime")
    assert all(out[k] == "" for k in ("7b-convert", "7b-generate", "7b-batch"))
    assert "Accuracy: " in out["eval"] and "questions (" in out["eval"], out["eval"][-3000:]
    assert f"model: {tmp_path / 'demo'}-lora/stage2_finetune_lora\n" in out["lora"], out["lora"][-3000:]
    assert out["lora"].endswith("['adapter_config.json', 'adapter_model.safetensors']\n"), out["lora"][-3000:]
