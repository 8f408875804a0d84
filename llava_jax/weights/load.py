"""`load_pretrained`: a LLaVA from any model directory the project reads, with its adapter applied.

The entry point above the format readers: ours / stage outputs / training checkpoints
(converted.py), HF (hf.py), and PEFT adapters (peft.py).
"""

from __future__ import annotations

from llava_jax import paths
from llava_jax.models.llava import LlavaModel
from llava_jax.weights import model_dir, peft
from llava_jax.weights.converted import load_converted
from llava_jax.weights.hf import load_hf
from llava_jax.weights.safetensors_io import CheckpointError


def load_pretrained(path: str, dtype: str | None = None, lora: str | None = None, *,
                    scan_layers: bool | None = None) -> LlavaModel:
    """Load a LLaVA from a directory (local or gs://): ours, a stage output, a training checkpoint or HF.

    Args:
      path: our `llava_jax_config.json` + Orbax checkpoint (`python -m llava_jax.convert`, a
        training stage's WORKDIR/stageN_NAME), a training checkpoint WORKDIR/checkpoints/STEP, or
        HF's `config.json` + `*.safetensors` (see weights/model_dir.py). A directory that holds
        model directories (a workdir) gives an error listing them. An `adapter/` inside it (a LoRA
        stage's output, an export) is applied.
      dtype: parameter and compute dtype ("float32", "bfloat16", ...); default: the checkpoint's.
      lora: a PEFT LoRA adapter directory to apply instead (ours, peft's, or the original LLaVA's
        with its `non_lora_trainables.bin`); not merged into the weights.
      scan_layers: run each tower's layers as one scan over stacked parameters (the default: compile
        time independent of depth) or unrolled (False: decoding ran 2x faster unrolled on a CPU,
        BENCHMARKS.md, at a compile time that grows with depth).
    """
    if lora is not None and not paths.isdir(lora):
        raise CheckpointError(f"{lora}: not a directory (expected a PEFT adapter with {peft.ADAPTER_CONFIG})")
    if model_dir.require(path) in (model_dir.OURS, model_dir.CHECKPOINT):
        model = load_converted(path, dtype, scan_layers=scan_layers)
    else:
        model = load_hf(path, dtype, scan_layers=scan_layers)
    adapter = lora or peft.find_adapter(path)
    if adapter is None:
        return model
    return LlavaModel(*peft.apply_adapter(model.config, model.params, adapter))
