"""Command-line flags shared by the CLIs that load a model (`generate`, `chat`, `eval`).

Spellings follow the original LLaVA scripts; their underscore forms (`--model_path`, `--top_p`)
are accepted too.
"""

from __future__ import annotations

import argparse

from llava_jax.data.image import ImageError
from llava_jax.data.video import VideoError
from llava_jax.data.templates import TEMPLATES
from llava_jax.inference.engine import InputError, tensor_parallel_mesh
from llava_jax.inference.pipeline import DEFAULT_CONV_MODE, Pipeline
from llava_jax.inference.sampling import SamplingParams
from llava_jax.parallel import compile_cache, xla_flags
from llava_jax.weights.safetensors_io import CheckpointError

# Errors whose message is the whole story for the user: printed as one line, exit status 2.
USER_ERRORS = (InputError, ImageError, VideoError, CheckpointError, OSError)
EXIT_BAD_INPUT = 2


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model directory, its dtype, template, image settings and context."""
    p.add_argument("--model-path", "--model_path", required=True, help="converted or HF LLaVA directory")
    p.add_argument("--lora", default=None, help="PEFT LoRA adapter directory to apply to the model, unmerged "
                                                "(ours, peft's, or the original LLaVA's LoRA output)")
    p.add_argument("--conv-mode", "--conv_mode", default=DEFAULT_CONV_MODE, choices=sorted(TEMPLATES))
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--image-aspect-ratio", choices=["pad", "square"], default=None, help="override the checkpoint's")
    p.add_argument("--max-context", type=int, default=None, help="longest prompt + answer (default: the model's)")
    p.add_argument("--unrolled-layers", action="store_true",
                   help="run the layers unrolled, not as one scan: faster decoding (2x on a CPU), slower to compile")
    p.add_argument("--tensor-parallel", "--tensor_parallel", type=int, default=1, metavar="N",
                   help="split the model over the first N devices (heads, MLP, vocab and KV cache; "
                        "parallel/rules.py), e.g. a 7B over chips too small to hold it")
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 language model (per output channel): half the weight bytes of "
                        "bf16 per token; greedy answers close to, not equal to, float's")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled from each video (default: the checkpoint's video settings, 32)")
    p.add_argument("--compilation-cache-dir", default=None,
                   help="keep compiled programs here and reuse them in later runs (JAX's persistent cache)")
    p.add_argument("--no-xla-flags", action="store_true",
                   help="do not add the GPU/TPU XLA flag presets (llava_jax/parallel/xla_flags.py)")


def add_sampling_flags(p: argparse.ArgumentParser, *, temperature: float = 0.2) -> None:
    """Temperature, top-p, top-k and the seed."""
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", "--top_p", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", type=int, default=0, help="0 = no limit")
    p.add_argument("--seed", type=int, default=0)


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    """The model directory of `--model-path`, with the template and image settings of the flags."""
    xla_flags.apply(not args.no_xla_flags)  # before JAX starts a backend
    compile_cache.enable(args.compilation_cache_dir)  # before anything compiles
    return Pipeline.from_pretrained(
        args.model_path,
        dtype=args.dtype,
        lora=args.lora,
        conv_mode=args.conv_mode,
        image_aspect_ratio=args.image_aspect_ratio,
        max_context=args.max_context,
        scan_layers=False if args.unrolled_layers else None,
        mesh=tensor_parallel_mesh(args.tensor_parallel) if args.tensor_parallel != 1 else None,
        int8=args.int8,
    )


def sampling_from_args(pipe: Pipeline, args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the flags, plus the template's stop strings."""
    return pipe.sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
