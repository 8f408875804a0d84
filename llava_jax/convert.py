"""Convert PyTorch LLaVA checkpoints to ours (Orbax) and back to Hugging Face.

  # HF LLaVA (llava-hf/llava-1.5-7b-hf), either key layout, safetensors or .bin:
  python -m llava_jax.convert --src llava-1.5-7b-hf --dst llava-1.5-7b
  # original LLaVA (liuhaotian/llava-v1.5-7b) with its CLIP tower as a local directory:
  python -m llava_jax.convert --src llava-v1.5-7b --vision-tower clip-vit-large-patch14-336 --dst llava-v1.5-7b-jax
  # stage-1 start from parts (projector fresh, or --projector mm_projector.bin):
  python -m llava_jax.convert --vision-tower clip-vit-large-patch14-336 --llm vicuna-7b-v1.5 --dst init
  # ours -> HF: a converted directory, a training stage's output, or a training checkpoint:
  python -m llava_jax.convert --src workdir/stage2_finetune --dst llava-hf-out --to hf
  python -m llava_jax.convert --src workdir/checkpoints/2414 --dst llava-hf-step2414 --to hf
  # a LoRA stage -> HF base + trained projector + OUT/adapter/ (PEFT), or one merged model:
  python -m llava_jax.convert --src workdir/stage2_finetune_lora --dst out --to hf [--merge-lora]
  # the original LLaVA's LoRA output (adapter + non_lora_trainables.bin) on its base:
  python -m llava_jax.convert --vision-tower clip-vit-large-patch14-336 --llm vicuna-13b-v1.5 \
      --lora llava-v1.5-13b-lora --dst llava-v1.5-13b-lora-jax [--merge-lora]

Errors a user can act on (unknown format, missing/unexpected tensors, shapes that disagree with the
config, truncated files, configs that are not LLaVA/CLIP/LLaMA, pickles that hold code) exit with
code 2 and leave nothing at --dst.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

from llava_jax import paths
from llava_jax.weights import mapping, parts, peft, stores
from llava_jax.weights.converted import save_converted
from llava_jax.weights.export import SHARD_BYTES, export_hf
from llava_jax.weights.safetensors_io import CheckpointError

DTYPES = ("bfloat16", "float32", "float16")
BATCH_BYTES = 512 << 20  # parameters held in memory per Orbax write


def make_plan(
    src: str | None,
    *,
    fmt: str | None = None,
    vision_tower: str | None = None,
    llm: str | None = None,
    projector: str | None = None,
    projector_type: str | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    image_aspect_ratio: str | None = None,
    image_token_index: int | None = None,
    seed: int = 0,
) -> parts.Plan:
    """The conversion plan for a source, its format detected from the directory unless `fmt` says."""
    if fmt is None:
        fmt = "parts" if src is None else parts.detect_format(src)
    if fmt == "parts":
        if not (vision_tower and llm):
            raise CheckpointError("building from parts needs --vision-tower DIR (CLIP) and --llm DIR (LLaMA/Vicuna)")
        return parts.plan_parts(
            vision_tower,
            llm,
            projector=projector,
            projector_type=projector_type,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_aspect_ratio=image_aspect_ratio,
            image_token_index=image_token_index,
            seed=seed,
        )
    if src is None:
        raise CheckpointError(f"--format {fmt} needs --src DIR")
    if fmt == "hf":
        if image_token_index is not None:
            raise CheckpointError(f"{src}: a HF LLaVA config sets image_token_index itself; drop --image-token-index")
        return parts.plan_hf(src, image_aspect_ratio=image_aspect_ratio)
    if fmt == "original":
        return parts.plan_original(
            src, vision_tower=vision_tower, image_aspect_ratio=image_aspect_ratio, image_token_index=image_token_index
        )
    raise CheckpointError(f"unknown format {fmt!r}; expected one of {parts.FORMATS}")


def convert(
    src: str | None,
    dst: str,
    *,
    dtype: str | None = None,
    batch_bytes: int = BATCH_BYTES,
    log: Callable[[str], None] = print,
    lora: str | None = None,
    merge_lora: bool = False,
    **plan_kw,
) -> str:
    """Convert a PyTorch checkpoint (see `make_plan`) into our directory at `dst`; returns its path.

    `lora`: a PEFT LoRA adapter directory for that base (ours, peft's, or the original LLaVA's LoRA
    output, whose `non_lora_trainables.bin` replaces the base's projector); it goes to `dst/adapter/`
    (applied whenever `dst` is loaded), or into the weights with `merge_lora`.
    """
    if paths.exists(dst):
        raise FileExistsError(f"{dst} already exists; remove it or choose another --dst")
    if src and paths.isfile(os.path.join(src, peft.ADAPTER_CONFIG)):
        raise CheckpointError(f"{src} is a LoRA adapter ({peft.ADAPTER_CONFIG}), not a model: give its base model as "
                              f"--src (or --vision-tower and --llm) and the adapter as --lora {src}")
    if merge_lora and not lora:
        raise CheckpointError("--merge-lora needs --lora DIR (or, with --to hf, a source holding adapter/)")
    non_lora = os.path.join(lora, peft.NON_LORA_FILE) if lora else None
    non_lora = non_lora if non_lora and paths.isfile(non_lora) else None
    if non_lora and src is None and not plan_kw.get("projector_type") and not plan_kw.get("projector"):
        keys = stores.BinStore([non_lora], non_lora).keys()
        plan_kw["projector_type"] = parts.projector_type_of(keys, mapping.PEFT_PREFIX + "model.mm_projector.")
    plan = make_plan(src, **plan_kw)
    if non_lora:
        peft.use_non_lora_trainables(plan, non_lora)
    plan.validate()
    source_dtype = plan.source_dtype if plan.source_dtype in DTYPES else "float32"
    dtype = dtype or source_dtype
    cfg = plan.cfg.replace(dtype=dtype, param_dtype=dtype)
    batches, write_more = plan.batches(dtype, batch_bytes), None
    if lora:
        spec, adapter = peft.read_adapter(lora, plan.cfg)
        desc = (f"LoRA adapter {lora} (r={spec.rank}, alpha={spec.alpha:g}, {len(spec.targets)} Linear layers per "
                "decoder layer)")
        if merge_lora:
            per_layer = peft.read_adapter(lora, plan.cfg, stacked=False)  # the batches' layout
            batches = peft.merged_batches(batches, peft.AdapterDeltas(*per_layer))
            plan.notes.append(f"{desc} merged into the weights")
        else:
            def write_more(tmp: str) -> None:
                peft.save_adapter(os.path.join(tmp, peft.ADAPTER_DIR), cfg.replace(lora=spec), adapter)

            plan.notes.append(f"{desc} written to {os.path.join(dst, peft.ADAPTER_DIR)}; "
                              f"applied whenever {dst} is loaded")
    for note in plan.notes:
        log(f"note: {note}")
    out = save_converted(
        dst,
        cfg,
        batches,
        extras=lambda: plan.extras(dtype),
        tokenizer_dir=plan.tokenizer_dir,
        preprocessor=plan.preprocessor,
        video=plan.video,
        write_more=write_more,
    )
    n = len(mapping.entries(cfg))
    log(f"wrote {out}: {n} parameters as {dtype} (source {plan.source_dtype}); load it with llava_jax.load_pretrained")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="source directory (HF or original LLaVA; with --to hf: ours, a stage output "
                   "WORKDIR/stageN_NAME or a training checkpoint WORKDIR/checkpoints/STEP)")
    p.add_argument("--dst", required=True, help="output directory (must not exist)")
    p.add_argument("--to", choices=["ours", "hf"], default="ours", help="hf: export ours to a llava-hf directory")
    p.add_argument("--dtype", choices=DTYPES, help="stored dtype (default: the source's)")
    p.add_argument("--format", choices=parts.FORMATS, help="source format (default: detected)")
    p.add_argument("--vision-tower", help="local CLIP directory (original LLaVA, or parts)")
    p.add_argument("--llm", help="local LLaMA/Vicuna directory (parts)")
    p.add_argument("--projector", help="mm_projector.bin / .safetensors from stage 1 (parts; default: fresh)")
    p.add_argument("--projector-type", help="linear, mlp2x_gelu, ... (parts; default: the file's, else mlp2x_gelu)")
    p.add_argument("--vision-feature-layer", type=int, default=-2, help="parts: CLIP hidden state LLaVA takes")
    p.add_argument("--vision-feature-select-strategy", choices=["default", "full"], default="default")
    p.add_argument("--image-aspect-ratio", choices=["pad", "square"], help="override the image padding setting")
    p.add_argument("--image-token-index", type=int, help="id of <image> (default: the source's, else the vocab size)")
    p.add_argument("--seed", type=int, default=0, help="seed of a fresh projector")
    p.add_argument("--shard-size-gb", type=float, default=SHARD_BYTES / 1e9, help="--to hf: shard size")
    p.add_argument("--lora", help="PEFT LoRA adapter directory for the base (ours, peft's, or the original LLaVA's "
                                  "LoRA output with non_lora_trainables.bin): written to DST/adapter/")
    p.add_argument("--merge-lora", action="store_true", help="fold the adapter (--lora, or --to hf: SRC/adapter/) into "
                                                             "the weights: one model of the base's size and dtype")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2 for any problem with the inputs)."""
    args = _parser().parse_args(argv)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every write at INFO/WARNING
    except ImportError:
        pass
    start = time.time()
    try:
        if args.to == "hf":
            if not args.src:
                raise CheckpointError("--to hf needs --src DIR (our converted directory or a training checkpoint)")
            if args.lora:
                raise CheckpointError("--lora is for conversion into ours; convert with --lora first, then export "
                                      "that directory (its adapter/ comes along, or is merged with --merge-lora)")
            export_hf(args.src, args.dst, dtype=args.dtype, max_shard_bytes=int(args.shard_size_gb * 1e9),
                      merge_lora=args.merge_lora)
        else:
            convert(
                args.src,
                args.dst,
                dtype=args.dtype,
                fmt=args.format,
                vision_tower=args.vision_tower,
                llm=args.llm,
                projector=args.projector,
                projector_type=args.projector_type,
                vision_feature_layer=args.vision_feature_layer,
                vision_feature_select_strategy=args.vision_feature_select_strategy,
                image_aspect_ratio=args.image_aspect_ratio,
                image_token_index=args.image_token_index,
                seed=args.seed,
                lora=args.lora,
                merge_lora=args.merge_lora,
            )
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
