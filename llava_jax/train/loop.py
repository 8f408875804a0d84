"""The training loop: stages, sharded state, checkpoints and resumption, metrics, evaluation.

Side effects live here; the step (step.py) and the evaluation forward are pure functions that
the loop jit-compiles once per stage with explicit in/out shardings over the mesh.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax.config import LlavaConfig, text_config_from_hf, vision_config_from_hf
from llava_jax.data import image as image_lib
from llava_jax.data import pipeline
from llava_jax.data import synthetic
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.models.llava import init_params
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.partition import device_batch, jit_sharded, model_param_shardings, state_shardings
from llava_jax.parallel.mesh import make_mesh
from llava_jax.train import flops as flops_lib
from llava_jax.train.checkpoint import Checkpointer, abstract_like
from llava_jax.train.evaluate import build_eval_set, eval_forward, evaluate
from llava_jax.train.optimizer import make_optimizer, merge_params, split_params
from llava_jax.train.step import TrainState, create_state, make_train_step

log = logging.getLogger("llava_jax.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops, the last good checkpoint intact."""


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run stopped."""


# ---------------------------------------------------------------------------------------------
# Assets: data paths, tokenizer, model config and initial parameters.


def resolve_data(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Data files of the run: built once into workdir/data for the synthetic default."""
    d = config.data
    if d.get("synthetic", False):
        s = d.synthetic_args
        return synthetic.build(os.path.join(workdir, "data"), num_train=s.num_train, num_val=s.num_val,
                               image_size=s.image_size, seed=s.seed, vocab_size=s.vocab_size)
    tokenizer = d.tokenizer or (os.path.join(config.model.init, "tokenizer.model") if config.model.get("init") else "")
    if not tokenizer:
        raise ValueError("config.data.tokenizer is empty and config.model.init names no directory holding tokenizer.model")
    return {"image_folder": d.image_folder, "tokenizer": tokenizer, **{k: d[k] for k in ("val",) if d.get(k)}}


def model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> LlavaConfig:
    """The architecture for a random initialisation (the tiny default), sized to the tokenizer."""
    m = config.model
    vocab = tokenizer.vocab_size + 1  # + the image placeholder, as llava-hf pads its vocabulary
    vocab = -(-vocab // 8) * 8
    text = text_config_from_hf({**m.text.to_dict(), "vocab_size": vocab, "bos_token_id": tokenizer.bos_id,
                                "eos_token_id": tokenizer.eos_id, "pad_token_id": 0})
    return LlavaConfig(
        vision=vision_config_from_hf(m.vision.to_dict()),
        text=text,
        projector_type=m.projector_type,
        vision_feature_layer=m.vision_feature_layer,
        vision_feature_select_strategy=m.vision_feature_select_strategy,
        image_token_index=tokenizer.vocab_size,
    )


def _compute(cfg: LlavaConfig, config) -> LlavaConfig:
    m = config.model
    return cfg.replace(dtype=m.dtype, param_dtype="float32", remat=m.remat)


def write_model_dir(directory: str, cfg: LlavaConfig, params: Any, tokenizer_file: str,
                    image_cfg: image_lib.ImageProcessorConfig) -> None:
    """A directory every command accepts (`generate --model-path`, the next stage), written atomically."""
    from llava_jax.weights.converted import save_converted

    if os.path.exists(directory):  # a stage re-run after a kill between this write and its checkpoint
        shutil.rmtree(directory)
    save_converted(directory, cfg, [jax.device_get(params)], tokenizer_dir=os.path.dirname(tokenizer_file),
                   preprocessor=image_cfg)


# ---------------------------------------------------------------------------------------------
# Metrics.


class MetricsWriter:
    """One JSON object per logged step in workdir/metrics.jsonl (process 0), TensorBoard if installed."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter  # type: ignore  # optional: pip install tensorboardX
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()


# ---------------------------------------------------------------------------------------------
# The run.


def _stage_steps(stage, batches_per_epoch: int, max_steps: int) -> int:
    steps = int(math.ceil(stage.epochs * batches_per_epoch))
    return min(steps, max_steps) if max_steps and max_steps > 0 else steps


def _data_file(name: str, data_cfg) -> str:
    """A stage's data file: as given, or relative to data.data_dir (default: the image folder)."""
    if os.path.isabs(name) or os.path.exists(name):
        return name
    base = data_cfg.get("data_dir") or data_cfg.get("image_folder") or ""
    candidate = os.path.join(base, name)
    if not os.path.exists(candidate):
        raise FileNotFoundError(f"stage data {name!r} not found as given nor in {base!r} (set config.data.data_dir "
                                f"or give the stage an absolute path)")
    return candidate


def _stage_dir(workdir: str, index: int, stage) -> str:
    return os.path.join(workdir, f"stage{index + 1}_{stage.name}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train every stage of `config` in `workdir`, resuming from its checkpoints; returns final eval metrics."""
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(**config.mesh.to_dict())
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.get("sharding_rules", rules_lib.DEFAULT_RULES))
    paths = resolve_data(config, workdir)
    tokenizer_file = paths["tokenizer"]
    tokenizer = Tokenizer(tokenizer_file)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                        async_save=config.async_checkpoints)
    metrics = MetricsWriter(workdir)
    stop = {"sigterm": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))

    # Where to start: the latest checkpoint says which stage and how far.
    start_stage, resume = 0, None
    latest = ckpt.latest_step()
    if latest is not None:
        meta, data_state = ckpt.restore_meta(latest)
        if meta["stage_step"] >= meta["stage_steps"]:
            start_stage = meta["stage"] + 1
        else:
            start_stage, resume = meta["stage"], (latest, meta, data_state)
        log.info("resuming from checkpoint %d (stage %d, step %d/%d)", latest, meta["stage"] + 1,
                 meta["stage_step"], meta["stage_steps"])
    final: dict[str, float] = {}
    global_offset = 0 if latest is None else latest - (resume[1]["stage_step"] if resume else 0)
    try:
        for index in range(start_stage, len(config.stages)):
            stage = config.stages[index]
            final = _run_stage(config, workdir, index, stage, mesh, rules, paths, tokenizer, tokenizer_file,
                               ckpt, metrics, stop, resume, global_offset)
            resume = None
            global_offset = ckpt.latest_step() or 0
        if start_stage >= len(config.stages):
            log.info("all %d stages are already complete in %s", len(config.stages), workdir)
    finally:
        ckpt.close()
        signal.signal(signal.SIGTERM, old_handler)
    return final


def _initial_params(config, workdir, index, stage, cfg_random: LlavaConfig, mesh, rules):
    """(cfg, params as a sharded tree) at the start of a stage: previous stage's output or the init."""
    from llava_jax.weights.converted import load_params

    source = _stage_dir(workdir, index - 1, config.stages[index - 1]) if index > 0 else config.model.get("init")
    if source:
        cfg = LlavaConfig.load(source)
        cfg, params = load_params(source, "float32", shardings=model_param_shardings(cfg, mesh, rules))
    else:
        cfg = cfg_random
        # Created directly sharded: no host or device ever holds the whole model.
        init = jax.jit(lambda k: nn.unbox(init_params(cfg, k)), out_shardings=model_param_shardings(cfg, mesh, rules))
        params = init(jax.random.key(config.seed))
    return _compute(cfg, config), params


def _run_stage(config, workdir, index, stage, mesh, rules, paths, tokenizer, tokenizer_file, ckpt, metrics,
               stop, resume, global_offset) -> dict[str, float]:
    is_main = jax.process_index() == 0
    cfg_random = model_config(config, tokenizer) if not config.model.get("init") else None
    cfg, params = _initial_params(config, workdir, index, stage, cfg_random, mesh, rules)
    image_cfg = image_lib.ImageProcessorConfig(size=cfg.vision.image_size, crop_size=cfg.vision.image_size,
                                               pad_to_square=config.data.get("pad_to_square", True))
    # Data.
    nproc = jax.process_count()
    if stage.global_batch % (stage.micro_batch) or stage.global_batch % nproc:
        raise ValueError(f"stage {stage.name}: global_batch {stage.global_batch} must divide by micro_batch "
                         f"{stage.micro_batch} and by the {nproc} processes")
    num_micro = stage.global_batch // stage.micro_batch
    data_path = paths.get(stage.data) or _data_file(stage.data, config.data)
    ds = pipeline.make_dataset(
        data_path, paths["image_folder"], tokenizer, stage.template, image_cfg,
        num_image_tokens=cfg.num_image_tokens, image_token_index=cfg.image_token_index,
        max_length=stage.max_length, batch_size=stage.global_batch // nproc, seed=config.seed + index,
        group_by_modality_length=config.data.get("group_by_modality_length", False),
        length_buckets=config.data.get("length_buckets") or None, worker_count=config.data.get("worker_count", 0),
    )
    total = _stage_steps(stage, ds.batches_per_epoch, config.max_steps)
    it = iter(ds)
    # Optimizer and state.
    tx, schedule = make_optimizer(learning_rate=stage.learning_rate, total_steps=total,
                                  warmup_ratio=stage.warmup_ratio, weight_decay=stage.weight_decay)
    trainable, frozen = split_params(params, list(stage.trainable))
    frozen = jax.tree.map(lambda x: x.astype(cfg.dtype), frozen)
    state_abs = jax.eval_shape(lambda p, f: create_state(p, f, tx), trainable, frozen)
    shardings = state_shardings(state_abs, cfg, mesh, rules, tx)
    state = jax.jit(lambda p, f: create_state(p, f, tx), out_shardings=shardings)(trainable, frozen)
    del params, trainable
    if resume is not None:
        step0, meta, data_state = resume
        restored = ckpt.restore_state(step0, abstract_like({"params": state.params, "opt_state": state.opt_state,
                                                            "counters": _counters(state)}))
        state = state.replace(params=restored["params"], opt_state=restored["opt_state"], **restored["counters"])
        it.set_state(data_state)
        log.info("stage %s: restored step %d and the data position", stage.name, meta["stage_step"])
    # Compiled functions.
    repl = NamedSharding(mesh, PartitionSpec())
    train_step = jit_sharded(make_train_step(cfg, tx, schedule), mesh, rules, (shardings, None), (shardings, repl),
                             donate_argnums=(0,))
    evaluator = _Evaluator(config, paths, tokenizer, stage, cfg, image_cfg, mesh)
    train_vision = any("vision_tower" in p for p in stage.trainable)
    train_text = any("language_model" in p for p in stage.trainable)
    peak = flops_lib.peak_tflops(jax.devices()[0].device_kind)
    start = int(state.step)
    if is_main:
        log.info("stage %d/%d %s: %d steps (%d per epoch), global batch %d in %d micro-batches, trainable %s",
                 index + 1, len(config.stages), stage.name, total, ds.batches_per_epoch, stage.global_batch,
                 num_micro, list(stage.trainable))
    bar = _progress(total, start, stage.name) if is_main and config.get("progress", True) else None
    t_last, logged_at, compile_logged = time.time(), start, False
    last: dict[str, float] = {}

    def check_finite(done_step: int, mm: dict) -> None:
        """Count and log a skipped step; stop after too many in a row (read one step late: no stall)."""
        if not int(mm["nonfinite"]):
            return
        streak = int(mm["nonfinite_streak"])
        metrics.write({"step": global_offset + done_step, "stage": stage.name, "nonfinite": 1,
                       "nonfinite_streak": streak, "nonfinite_total": int(mm["nonfinite_total"])})
        log.warning("stage %s step %d: non-finite loss or gradient, update skipped (%d in a row)", stage.name,
                    done_step, streak)
        if streak >= config.max_nonfinite_steps:
            raise NonFiniteError(
                f"stage {stage.name}: {streak} consecutive steps with a non-finite loss or gradient "
                f"(last at step {global_offset + done_step}); stopped. The last good checkpoint "
                f"{ckpt.latest_step()} in {ckpt.directory} is intact."
            )

    previous = None
    for k in range(start, total):
        batch = next(it)
        n_images = int(batch["image_mask"].sum()) if "image_mask" in batch else 0
        t0 = time.time()
        state, m = train_step(state, device_batch(batch, num_micro, mesh))
        step = k + 1
        if not compile_logged:
            m = jax.device_get(m)
            if is_main:
                log.info("stage %s: first step (compile + run) took %.1f s", stage.name, time.time() - t0)
            compile_logged, t_last, logged_at = True, time.time(), step
        if previous is not None:
            check_finite(*previous)
        previous = (step, m)
        if step % config.log_every == 0 or step == total:
            m = jax.device_get(m)
            now = time.time()
            dt = (now - t_last) / max(1, step - logged_at)
            t_last, logged_at = now, step
            rows, seq = batch["input_ids"].shape
            fl = flops_lib.train_step_flops(cfg, tokens=rows * seq * nproc, seq_len=seq, images=n_images * nproc,
                                            train_vision=train_vision, train_text=train_text)
            rec = {"step": global_offset + step, "stage": stage.name, "stage_step": step,
                   "loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                   "grad_norm": float(m["grad_norm"]), "step_time": dt, "tokens_per_s": float(m["tokens"]) / dt,
                   "tflops_per_device": fl / dt / 1e12 / jax.device_count(), "nonfinite_total": int(m["nonfinite_total"])}
            if peak:
                rec["mfu"] = rec["tflops_per_device"] / peak
            stats = getattr(it, "stats", None)
            if stats is not None:
                rec.update(stats.metrics())
            metrics.write(rec)
            last = rec
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['learning_rate']:.2e}",
                                step_s=f"{dt:.2f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if config.eval_every and step % config.eval_every == 0 and step < total:
            metrics.write({"step": global_offset + step, "stage": stage.name, **evaluator(state)})
        if step < total and (step % config.checkpoint_every == 0 or stop["sigterm"]):
            _save(ckpt, global_offset + step, state, index, step, total, it)
            if stop["sigterm"]:
                ckpt.wait()
                raise Preempted(f"SIGTERM: saved checkpoint {global_offset + step}; start again to resume")
    if previous is not None:
        check_finite(*previous)
    if bar is not None:
        bar.close()
    # End of stage: evaluate, write the model directory, then mark the stage done.
    result = evaluator(state)
    if result:
        metrics.write({"step": global_offset + total, "stage": stage.name, **result})
        if is_main:
            log.info("stage %s eval: %s", stage.name, json.dumps({k: round(v, 4) for k, v in result.items()}))
    params = merge_params(state.params, jax.tree.map(lambda x: x.astype(jnp.float32), state.frozen))
    out_dir = _stage_dir(workdir, index, stage)
    if is_main:
        write_model_dir(out_dir, cfg.replace(dtype="float32", param_dtype="float32", remat="none"), params,
                        tokenizer_file, image_cfg)
        log.info("stage %s: model written to %s", stage.name, out_dir)
    _save(ckpt, global_offset + total, state, index, total, total, it)
    ckpt.wait()
    stats = getattr(it, "stats", None)
    if stats is not None and is_main:
        log.info("stage %s data: %s", stage.name, stats.summary())
    return {**last, **result}


def _counters(state: TrainState) -> dict:
    return {"step": state.step, "nonfinite_streak": state.nonfinite_streak, "nonfinite_total": state.nonfinite_total}


def _save(ckpt: Checkpointer, global_step: int, state: TrainState, index: int, step: int, total: int, it) -> None:
    meta = {"stage": index, "stage_step": step, "stage_steps": total, "global_step": global_step}
    ckpt.save(global_step, {"params": state.params, "opt_state": state.opt_state, "counters": _counters(state)},
              meta, it.get_state())


def _progress(total: int, start: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)


class _Evaluator:
    """Held-out evaluation for a stage (nothing when the config names no validation data)."""

    def __init__(self, config, paths, tokenizer, stage, cfg, image_cfg, mesh):
        self.samples = None
        val = paths.get("val") or config.data.get("val")
        if not val:
            return
        self.samples = build_eval_set(val, paths["image_folder"], tokenizer, config.data.get("eval_template", "vicuna_v1"),
                                      image_cfg, cfg, config.data.get("eval_max_length", 512))
        self.forward = jax.jit(eval_forward(cfg))
        self.batch_size = config.data.get("eval_batch_size", 32)
        self.crop = image_cfg.crop_size
        self.mesh = mesh

    def __call__(self, state: TrainState) -> dict[str, float]:
        if not self.samples:
            return {}
        params = merge_params(state.params, state.frozen)
        return evaluate(self.forward, params, self.samples, batch_size=self.batch_size, crop=self.crop)
