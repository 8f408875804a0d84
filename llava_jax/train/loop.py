"""The training loop: stages, sharded state, checkpoints and resumption, metrics, evaluation.

Side effects live here; the step (step.py) and the evaluation forward are pure functions that
the loop jit-compiles once per stage with explicit in/out shardings over the mesh.

    run                      the config checked (validate.py), where to start (the latest checkpoint),
                             every stage's data opened (check_stage_data), then each stage in turn
      _run_stage             one stage, top to bottom:
        _initial_model       the previous stage's model directory, config.model.init, or random
        _stage_data          the Grain pipeline (data/pipeline.py) and the stage's step count
        _initial_params      the weights, loaded or created straight into their shardings
        stage_program        optimizer, sharded train state and jitted step (program.py; what
                             compile-only compiles), the state created straight into its shardings
        _restore             a mid-stage checkpoint: state and data position
        _train               the steps (step.py, jit with parallel/partition.py shardings),
                             metrics (metrics.py), evaluations, checkpoints, SIGTERM
        _finish              evaluation, the stage's model directory, the end-of-stage checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from llava_jax import paths
from llava_jax import progress
from llava_jax.anyres import AnyresConfig
from llava_jax.config import CONFIG_FILE, LlavaConfig, text_config_from_hf, vision_config_from_hf
from llava_jax.data import image as image_lib
from llava_jax.data import pipeline
from llava_jax.data import sources as sources_lib
from llava_jax.data import synthetic
from llava_jax.data.tokenizer import Tokenizer
from llava_jax.models.llava import init_params
from llava_jax.parallel import compile_cache
from llava_jax.parallel.partition import device_batch, model_param_shardings
from llava_jax.parallel.mesh import make_mesh
from llava_jax.models import lora as lora_lib
from llava_jax.train import flops as flops_lib
from llava_jax.train import lora as lora_train
from llava_jax.train.checkpoint import Checkpointer, abstract_like
from llava_jax.train.evaluate import build_eval_set, eval_forward, evaluate
from llava_jax.train.metrics import MetricsWriter
from llava_jax.train.optimizer import merge_params, split_params
from llava_jax.train.program import compute_config, rules_from_config, stage_program
from llava_jax.train.step import TrainState, to_microbatches
from llava_jax.train.validate import ConfigError, validate
from llava_jax.weights import model_dir

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
    if d.synthetic:
        s = d.synthetic_args
        if s.task == "media":  # the many-image and video tasks
            return synthetic.build_media(os.path.join(workdir, "data"), num_train=s.num_train, num_val=s.num_val,
                                         image_size=s.image_size, num_frames=d.num_frames, seed=s.seed,
                                         vocab_size=s.vocab_size)
        return synthetic.build(os.path.join(workdir, "data"), num_train=s.num_train, num_val=s.num_val,
                               image_size=s.image_size, seed=s.seed, vocab_size=s.vocab_size, sizes=s.sizes)
    tokenizer = d.tokenizer or Tokenizer.file_in(config.model.init)  # validate: one of the two is set
    return {"image_folder": d.image_folder, "tokenizer": tokenizer, **({"val": d.val} if d.val else {})}


def _eval_root(config: ml_collections.ConfigDict, files: dict[str, str]) -> str:
    """Where the stages' eval_benchmarks find their data: `data.eval_root`, else the synthetic data folder."""
    return config.data.eval_root or files.get("out_dir", "")


class StageBenchmarks(Protocol):
    """What the loop needs to answer and score a stage's `eval_benchmarks` when the stage ends.

    Training sits below evaluation in the package's layers (evaluation answers with the inference
    engine), so the loop is handed a runner: `python -m llava_jax.train` passes
    `llava_jax.eval.suite.SuiteBenchmarks()`. A run without one refuses a stage that names benchmarks.
    """

    def question_file(self, name: str, data_root: str) -> str:
        """The benchmark's question file under `data_root` (KeyError, with the known names, if none)."""

    def run(self, model_dir: str, names: list[str], data_root: str, output_dir: str, batch_size: int,
            dtype: str) -> dict[str, float]:
        """Answers and scores `names` with the model in `model_dir`: {"bench/<name>": headline figure}."""


def _stage_benchmarks(config: ml_collections.ConfigDict, files: dict[str, str],
                      runner: StageBenchmarks | None) -> dict[str, list[str]]:
    """Each stage's `eval_benchmarks`, checked before training: an unknown name or a missing question
    file is a ConfigError now, not after the stage. Benchmarks that would read the synthetic data's
    held-out set are dropped (with a log line) when it has none (`synthetic_args.num_val=0`)."""
    root, out = _eval_root(config, files), {}
    no_val = config.data.synthetic and not config.data.eval_root and config.data.synthetic_args.num_val == 0
    for stage in config.stages:
        names = list(stage.eval_benchmarks)
        if names and no_val:
            log.info("stage %s: no held-out questions (synthetic_args.num_val=0): eval_benchmarks %s skipped",
                     stage.name, names)
            names = []
        if names and runner is None:
            raise ConfigError(f"stage {stage.name}: eval_benchmarks {names}, but this run has no benchmark runner "
                              "(python -m llava_jax.train has one; from Python pass loop.run(..., benchmarks=...))")
        for name in names:
            try:
                question_file = runner.question_file(name, root)
            except KeyError as e:
                raise ConfigError(f"stage {stage.name}: eval_benchmarks: {e.args[0]}") from None
            if not paths.exists(question_file):
                raise ConfigError(f"stage {stage.name}: eval_benchmarks {name}: {question_file} not found "
                                  "(config.data.eval_root holds the original's playground/data/eval layout)")
        out[stage.name] = names
    return out


def model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> LlavaConfig:
    """The architecture for a random initialisation (the tiny default), sized to the tokenizer."""
    m = config.model
    # + the image (and video) placeholders after the tokenizer's pieces, as llava-hf pads its vocabulary
    vocab = tokenizer.vocab_size + 1 + bool(m.video)
    vocab = -(-vocab // 8) * 8
    text = text_config_from_hf({**m.text.to_dict(), "vocab_size": vocab, "bos_token_id": tokenizer.bos_id,
                                "eos_token_id": tokenizer.eos_id, "pad_token_id": 0})
    vision = vision_config_from_hf(m.vision.to_dict())
    geometry = None
    if m.image_grid_pinpoints:  # LLaVA-NeXT: tiles of the tower's own size, its feature grid a side
        geometry = AnyresConfig(vision.image_size, vision.image_size // vision.patch_size,
                                tuple(tuple(p) for p in m.image_grid_pinpoints), max_tiles=m.max_tiles,
                                untiled_multi=m.untiled_multi, video=m.video)
    return LlavaConfig(
        vision=vision,
        anyres=geometry,
        text=text,
        projector_type=m.projector_type,
        vision_feature_layer=m.vision_feature_layer,
        vision_feature_select_strategy=m.vision_feature_select_strategy,
        image_token_index=tokenizer.vocab_size,
        video_token_index=tokenizer.vocab_size + 1 if m.video else None,
    )


def model_image_config(cfg: LlavaConfig, pad_to_square: bool) -> image_lib.ImageProcessorConfig:
    """The image settings of a model: its tower's size, and for an anyres (LLaVA-NeXT) model its pinpoints
    (`pad_to_square`, LLaVA-1.5's, does not apply to tiles)."""
    g = cfg.geometry
    if cfg.is_anyres:
        return image_lib.ImageProcessorConfig(size=g.tile_size, crop_size=g.tile_size, pad_to_square=False,
                                              grid_pinpoints=g.pinpoints, pinpoint_convention=g.convention,
                                              onevision=g.untiled_multi)
    return image_lib.ImageProcessorConfig(size=cfg.vision.image_size, crop_size=cfg.vision.image_size,
                                          pad_to_square=pad_to_square)


def stage_geometry(cfg: LlavaConfig, stage, image_cfg: image_lib.ImageProcessorConfig,
                   pad_to_square: bool) -> tuple[AnyresConfig, image_lib.ImageProcessorConfig]:
    """(geometry, image settings) a stage's data is cut with: the model's, or with `stage.base_resolution`
    one base tile an image (the anyres model's flat layout: its features in order, no newline)."""
    g = cfg.geometry
    if stage.base_resolution and cfg.is_anyres:
        flat = AnyresConfig.flat(g.tile_size, g.grid, g.extra_tokens)
        return flat, image_lib.ImageProcessorConfig(size=g.tile_size, crop_size=g.tile_size,
                                                    pad_to_square=pad_to_square)
    return g, image_cfg


def write_model_dir(directory: str, cfg: LlavaConfig, params: Any, tokenizer_file: str,
                    image_cfg: image_lib.ImageProcessorConfig) -> None:
    """A directory every command accepts (`generate --model-path`, the next stage), written atomically.

    Float32, with the inference defaults for the run's compute settings (no remat, attention by backend).
    """
    from llava_jax.weights.converted import save_converted

    cfg = cfg.replace(dtype="float32", param_dtype="float32", remat="none", attention="auto", lora=None)

    if paths.exists(directory):  # a stage re-run after a kill between this write and its checkpoint
        paths.rmtree(directory)
    save_converted(directory, cfg, [jax.device_get(params)], tokenizer_dir=os.path.dirname(tokenizer_file),
                   preprocessor=image_cfg)


# ---------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Run:
    """What every stage of a run shares."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    rules: tuple
    files: dict[str, str]  # data files, image folder, tokenizer (resolve_data)
    tokenizer: Tokenizer
    ckpt: Checkpointer
    metrics: MetricsWriter
    sigterm: bool = False  # set by the signal handler; the step loop saves and stops
    benchmarks: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # stage name -> eval_benchmarks
    runner: StageBenchmarks | None = None  # answers and scores them
    sources: dict[int, sources_lib.Source] = dataclasses.field(default_factory=dict)  # opened by check_stage_data

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class _Resume:
    """A mid-stage checkpoint to continue from."""

    step: int  # global step of the checkpoint
    meta: dict  # stage, stage_step, stage_steps, global_step
    data_state: dict  # the Grain iterator position


def run(config: ml_collections.ConfigDict, workdir: str,
        benchmarks: StageBenchmarks | None = None) -> dict[str, float]:
    """Train every stage of `config` in `workdir`, resuming from its checkpoints; returns final eval metrics.

    `benchmarks` answers and scores the stages' `eval_benchmarks` (see StageBenchmarks); without it a
    stage that names any is a ConfigError before training.
    """
    validate(config)  # before anything is written: a config error leaves the workdir as it was
    workdir = paths.absolute(workdir)
    paths.makedirs(workdir)
    compile_cache.enable(config.compilation_cache_dir)
    files = resolve_data(config, workdir)
    rules = rules_from_config(config)
    r = _Run(config=config, workdir=workdir, mesh=make_mesh(**config.mesh.to_dict()), rules=rules, files=files,
             tokenizer=Tokenizer(files["tokenizer"]),
             ckpt=Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                               async_save=config.async_checkpoints),
             metrics=MetricsWriter(workdir))
    r.runner = benchmarks
    r.benchmarks = _stage_benchmarks(config, files, benchmarks)  # before any training: a missing data file fails now
    old_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(r, "sigterm", True))
    start_stage, resume, offset = _where_to_start(r.ckpt)
    r.sources = check_stage_data(r, start_stage)  # every stage's data before the first step
    final: dict[str, float] = {}
    try:
        for index in range(start_stage, len(config.stages)):
            final = _run_stage(r, index, resume, offset)
            resume, offset = None, r.ckpt.latest_step() or 0
        if start_stage >= len(config.stages):
            log.info("all %d stages are already complete in %s", len(config.stages), workdir)
    finally:
        r.metrics.flush()
        r.ckpt.close()
        signal.signal(signal.SIGTERM, old_handler)
    return final


def _where_to_start(ckpt: Checkpointer) -> tuple[int, _Resume | None, int]:
    """(first stage to run, the mid-stage checkpoint to resume or None, global steps before that stage)."""
    latest = ckpt.latest_step()
    if latest is None:
        return 0, None, 0
    meta, data_state = ckpt.restore_meta(latest)
    log.info("resuming from checkpoint %d (stage %d, step %d/%d)", latest, meta["stage"] + 1,
             meta["stage_step"], meta["stage_steps"])
    if meta["stage_step"] >= meta["stage_steps"]:
        return meta["stage"] + 1, None, latest
    return meta["stage"], _Resume(latest, meta, data_state), latest - meta["stage_step"]


def _run_stage(run: _Run, index: int, resume: _Resume | None, offset: int) -> dict[str, float]:
    """One stage: weights in, data, state, the steps, evaluation, the model directory out.

    `offset` is the global step at which this stage started (metrics and checkpoints count globally).
    """
    stage = run.config.stages[index]
    source, cfg = _initial_model(run, index)
    image_cfg = model_image_config(cfg, run.config.data.pad_to_square)
    data = _stage_data(run, index, cfg, image_cfg)  # before the weights: a data error costs seconds, not a load
    params = _initial_params(run, source, cfg)
    # What every checkpoint of the stage records, so that it loads as a model on its own (convert --to hf).
    spec = lora_train.resolve_spec(stage.lora, cfg) if stage.lora else None
    model = model_dir.checkpoint_model_meta(cfg, run.workdir, _frozen_source(run, stage, source, cfg, params, image_cfg),
                                            run.files["tokenizer"], image_cfg.to_dict(), lora=spec)
    if spec is not None:  # fresh adapters on the frozen base (train/lora.py)
        cfg = cfg.replace(lora=spec)
        lora_train.check_rank_splits(cfg.lora, run.mesh, run.rules)
        shardings = model_param_shardings(cfg, run.mesh, run.rules)
        params = merge_params(params, lora_train.init_adapter(cfg, jax.random.key(run.config.seed + index), shardings))
    # The optimizer, the sharded state and the step, built as compile-only builds them (train/program.py).
    program = stage_program(cfg, stage, run.mesh, run.rules, data.total_steps, params, seed=run.config.seed + index)
    state = program.init_state(params)
    del params
    if resume is not None:
        state = _restore(run, stage, state, data.iterator, resume)
    train_step = program.step
    evaluator = _Evaluator(run, stage, cfg, image_cfg)
    if run.is_main:
        log.info("stage %d/%d %s: %d steps (%d per epoch), global batch %d in %d micro-batches, trainable %s, "
                 "remat %s", index + 1, len(run.config.stages), stage.name, data.total_steps, data.batches_per_epoch,
                 stage.global_batch, data.num_micro, list(stage.trainable), cfg.remat)
    state, last = _train(run, index, cfg, state, train_step, data, evaluator, offset, model)
    result = _finish(run, index, cfg, image_cfg, state, data, evaluator, offset, model)
    return {**last, **result}


def _initial_model(run: _Run, index: int) -> tuple[str | None, LlavaConfig]:
    """(where the stage's weights come from, its compute config).

    The previous stage's model directory, else `config.model.init`, else (None) a random
    initialisation of the config's architecture.
    """
    config = run.config
    source = _stage_dir(run.workdir, index - 1, config.stages[index - 1]) if index > 0 else config.model.init
    cfg = LlavaConfig.load(source) if source else model_config(config, run.tokenizer)
    return source or None, compute_config(cfg, config, config.stages[index])


def _initial_params(run: _Run, source: str | None, cfg: LlavaConfig) -> Any:
    """The stage's starting parameters (float32), created or loaded directly into their shardings."""
    from llava_jax.weights.converted import load_params

    shardings = model_param_shardings(cfg, run.mesh, run.rules)
    if source:
        params = load_params(source, "float32", shardings=shardings, scan_layers=cfg.scan_layers)[1]
        # A LoRA stage's output carries its adapter: the next stage starts from the merged weights.
        return lora_train.merge_stage_adapter(source, cfg, params, shardings)[1]
    # Created directly sharded: no host or device ever holds the whole model.
    return nn.unbox(init_params(cfg, jax.random.key(run.config.seed), shardings=shardings))


def _frozen_source(run: _Run, stage, source: str | None, cfg: LlavaConfig, params: Any,
                   image_cfg: image_lib.ImageProcessorConfig) -> str | None:
    """The model directory holding the parameters this stage freezes (checkpoints hold only the trained ones).

    None when the stage trains every parameter. A random initialisation that freezes some is
    written once to WORKDIR/init, so that its checkpoints stay loadable.
    """
    if not jax.tree.leaves(split_params(params, list(stage.trainable))[1]):
        return None
    if source:
        return source
    directory = os.path.join(run.workdir, "init")
    if run.is_main and not paths.exists(os.path.join(directory, CONFIG_FILE)):
        write_model_dir(directory, cfg, params, run.files["tokenizer"], image_cfg)
    return directory


@dataclasses.dataclass
class _StageData:
    """A stage's input pipeline and how many steps it runs."""

    iterator: pipeline.DataIterator
    batches_per_epoch: int
    total_steps: int
    num_micro: int  # micro-batches per global batch (gradient accumulation)


def _stage_data_path(run: _Run, index: int) -> str:
    """Where stage `index` reads its data: a synthetic build's file, or `stage.data` resolved."""
    stage = run.config.stages[index]
    return run.files.get(stage.data) or _data_file(stage.data, run.config.data)


def check_stage_data(run: _Run, first: int) -> dict[int, sources_lib.Source]:
    """Opens the data of every stage from `first` on, so that a missing file, JSON that does not parse or
    a truncated packed shard of stage 2 stops the run before stage 1 trains, not after.

    Returns {first: its opened source}, for the stage about to start; later stages' sources are
    dropped once checked and opened again when their stage starts (holding a 665K-record file in
    memory through stage 1 costs more than reading it twice).
    """
    opened = {}
    for index in range(first, len(run.config.stages)):
        source = sources_lib.open_source(_stage_data_path(run, index), run.files["image_folder"],
                                         tfds_data_dir=run.config.data.tfds_data_dir or None)
        if index == first:
            opened[index] = source
    return opened


def _stage_data(run: _Run, index: int, cfg: LlavaConfig, image_cfg: image_lib.ImageProcessorConfig) -> _StageData:
    """The stage's Grain pipeline over this process's share of each global batch."""
    config, stage = run.config, run.config.stages[index]
    nproc = jax.process_count()
    if stage.global_batch % nproc:  # by micro_batch: validate.py; the process count is known only here
        raise ConfigError(f"stage {stage.name}: global_batch {stage.global_batch} must divide by the {nproc} "
                          "processes")
    data = run.sources.pop(index, None) or _stage_data_path(run, index)  # opened by check_stage_data, or its path
    geometry, data_image_cfg = stage_geometry(cfg, stage, image_cfg, config.data.pad_to_square)
    ds = pipeline.make_dataset(
        data, run.files["image_folder"], run.tokenizer, stage.template, data_image_cfg,
        geometry=geometry, image_index=cfg.is_anyres, image_token_index=cfg.image_token_index,
        max_length=stage.max_length, batch_size=stage.global_batch // nproc, seed=config.seed + index,
        group_by_modality_length=config.data.group_by_modality_length,
        length_buckets=config.data.length_buckets or None, worker_count=config.data.worker_count,
        tfds_data_dir=config.data.tfds_data_dir or None, packing=config.data.packing,
        row_length=stage.row_length or None, max_images_per_row=config.data.max_images_per_row,
        max_images_per_sample=config.data.max_images_per_sample,
        # Video records (LLaVA-Video-178K): only for a model that pools frames (OneVision, NeXT-Video).
        num_frames=config.data.num_frames if geometry.video else 0, video_token_index=cfg.video_token_index,
    )
    return _StageData(iter(ds), ds.batches_per_epoch, _stage_steps(stage, ds.batches_per_epoch, config.max_steps),
                      stage.global_batch // stage.micro_batch)


def _restore(run: _Run, stage, state: TrainState, iterator: pipeline.DataIterator, resume: _Resume) -> TrainState:
    """The checkpoint's trained parameters, optimizer state and counters, restored into `state`'s shardings."""
    try:
        restored = run.ckpt.restore_state(resume.step, abstract_like(_checkpointed(state)))
    except ValueError as e:
        # Orbax's message lists every leaf that differs; the cause a user can act on is the stage's config.
        if "tree structures do not match" not in str(e):
            raise
        first = " ".join(str(e).splitlines()[1:2]).strip()
        raise ConfigError(
            f"stage {stage.name}: checkpoint {resume.step} in {run.ckpt.directory} holds other trained parameters or "
            "optimizer state than this stage builds (its trainable, vision_learning_rate or lora changed since it "
            f"was written; first difference: {first}): resume with the config that wrote it, or use a new "
            "workdir") from None
    iterator.set_state(resume.data_state)
    log.info("stage %s: restored step %d and the data position", stage.name, resume.meta["stage_step"])
    return state.replace(params=restored["params"], opt_state=restored["opt_state"], **restored["counters"])


def _train(run: _Run, index: int, cfg: LlavaConfig, state: TrainState, train_step, data: _StageData,
           evaluator: "_Evaluator", offset: int, model: dict) -> tuple[TrainState, dict[str, float]]:
    """The stage's steps from `state.step` on: metrics, periodic evaluation and checkpoints, SIGTERM."""
    config, stage = run.config, run.config.stages[index]
    logger = _StepLogger(run, stage, cfg, data, offset, start=int(state.step))
    for step in range(int(state.step) + 1, data.total_steps + 1):
        batch = next(data.iterator)
        t0 = time.time()
        state, m = train_step(state, device_batch(to_microbatches(batch, data.num_micro), run.mesh))
        logger.after_step(step, batch, m, t0)
        if config.eval_every and step % config.eval_every == 0 and step < data.total_steps:
            run.metrics.write({"step": offset + step, "stage": stage.name, **evaluator(state)})
        if step < data.total_steps and (step % config.checkpoint_every == 0 or run.sigterm):
            _save(run, offset + step, state, index, step, data, model)
            if run.sigterm:
                run.ckpt.wait()
                raise Preempted(f"SIGTERM: saved checkpoint {offset + step}; start again to resume")
    logger.close()
    return state, logger.last


def _finish(run: _Run, index: int, cfg: LlavaConfig, image_cfg: image_lib.ImageProcessorConfig, state: TrainState,
            data: _StageData, evaluator: "_Evaluator", offset: int, model: dict) -> dict[str, float]:
    """End of stage: evaluate, write the model directory, then mark the stage done with a checkpoint."""
    stage = run.config.stages[index]
    result = evaluator(state)
    if result:
        run.metrics.write({"step": offset + data.total_steps, "stage": stage.name, **result})
        if run.is_main:
            log.info("stage %s eval: %s", stage.name, json.dumps({k: round(v, 4) for k, v in result.items()}))
            eval_template = run.config.data.eval_template
            if stage.template != eval_template:
                log.info("stage %s eval: the held-out questions are asked in %s, which this stage (%s) does not "
                         "train; low accuracy here is expected, the next stage teaches the answers",
                         stage.name, eval_template, stage.template)
    adapter, params = lora_lib.split(merge_params(state.params, jax.tree.map(lambda x: x.astype(jnp.float32), state.frozen)))
    out_dir = _stage_dir(run.workdir, index, stage)
    if run.is_main:
        write_model_dir(out_dir, cfg, params, run.files["tokenizer"], image_cfg)
        if adapter:  # before the end-of-stage checkpoint: a kill in between re-runs the whole write
            lora_train.save_stage_adapter(out_dir, cfg, adapter)
        log.info("stage %s: model written to %s", stage.name, out_dir)
    _save(run, offset + data.total_steps, state, index, data.total_steps, data, model)
    run.ckpt.wait()
    benchmarks = run.benchmarks.get(stage.name, [])
    if run.is_main and benchmarks:  # generated answers, scored as the original scores them
        bench = run.runner.run(out_dir, benchmarks, _eval_root(run.config, run.files),
                               os.path.join(run.workdir, "eval", os.path.basename(out_dir)),
                               run.config.data.eval_batch_size, run.config.model.dtype)
        run.metrics.write({"step": offset + data.total_steps, "stage": stage.name, **bench})
        result = {**result, **bench}
    stats = getattr(data.iterator, "stats", None)
    if stats is not None and run.is_main:
        log.info("stage %s data: %s", stage.name, stats.summary())
    return result


class _StepLogger:
    """Per-step bookkeeping: metrics records every `log_every` steps, the progress bar, non-finite steps.

    Device values are read only where a record is written, and the non-finite check reads each
    step's flags one step late, so that the host never waits on the step it just dispatched.
    """

    def __init__(self, run: _Run, stage, cfg: LlavaConfig, data: _StageData, offset: int, start: int):
        self.run, self.stage, self.cfg, self.data, self.offset = run, stage, cfg, data, offset
        self.peak = flops_lib.peak_tflops(jax.devices()[0].device_kind)
        self.train_vision = any("vision_tower" in p for p in stage.trainable)
        self.train_text = any("language_model" in p for p in stage.trainable)
        # Drawn only on a terminal (llava_jax/progress.py); log records go through it while it is.
        self.bar = progress.bar(data.total_steps, desc=stage.name, initial=start,
                                enabled=run.is_main and run.config.progress)
        self._logging = progress.logging_through(self.bar)
        self._logging.__enter__()
        self.t_last, self.logged_at, self.compiled = time.time(), start, False
        self.pending: tuple[int, dict] | None = None  # the previous step's metrics, checked one step late
        self.last: dict[str, float] = {}

    def after_step(self, step: int, batch: dict, m: dict, t0: float) -> None:
        if not self.compiled:
            m = jax.device_get(m)
            if self.run.is_main:
                log.info("stage %s: first step (compile + run) took %.1f s", self.stage.name, time.time() - t0)
            self.compiled, self.t_last, self.logged_at = True, time.time(), step
        if self.pending is not None:
            self._check_finite(*self.pending)
        self.pending = (step, m)
        if step % self.run.config.log_every == 0 or step == self.data.total_steps:
            self._record(step, batch, jax.device_get(m))
        self.bar.update(1)

    def close(self) -> None:
        if self.pending is not None:
            self._check_finite(*self.pending)
        self.bar.close()
        self._logging.__exit__(None, None, None)

    def _record(self, step: int, batch: dict, m: dict) -> None:
        rec = {"step": self.offset + step, "stage": self.stage.name, "stage_step": step,
               "loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
               "grad_norm": float(m["grad_norm"]), "nonfinite_total": int(m["nonfinite_total"])}
        now = time.time()
        if step > self.logged_at:  # timings over the steps since the last record (none for the compiling step)
            dt = (now - self.t_last) / (step - self.logged_at)
            nproc = jax.process_count()
            rows, seq = batch["input_ids"].shape
            n_tiles = int(batch["image_mask"].sum()) if "image_mask" in batch else 0  # real tiles (1.5: images)
            fl = flops_lib.train_step_flops(self.cfg, tokens=rows * seq * nproc, seq_len=seq, tiles=n_tiles * nproc,
                                            train_vision=self.train_vision, train_text=self.train_text)
            rec.update(step_time=dt, tokens_per_s=float(m["tokens"]) / dt,
                       tflops_per_device=fl / dt / 1e12 / jax.device_count())
            if self.peak:
                rec["mfu"] = rec["tflops_per_device"] / self.peak
        self.t_last, self.logged_at = now, step
        stats = getattr(self.data.iterator, "stats", None)
        if stats is not None:
            rec.update(stats.metrics())
        self.run.metrics.write(rec)
        self.last = rec
        if not self.bar.disable:
            timing = {"step_s": f"{rec['step_time']:.2f}", "tok_s": f"{rec['tokens_per_s']:.0f}"} if "step_time" in rec else {}
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['learning_rate']:.2e}", **timing)

    def _check_finite(self, step: int, m: dict) -> None:
        """Count and log a skipped step; stop after too many in a row."""
        if not int(m["nonfinite"]):
            return
        streak = int(m["nonfinite_streak"])
        self.run.metrics.write({"step": self.offset + step, "stage": self.stage.name, "nonfinite": 1,
                                "nonfinite_streak": streak, "nonfinite_total": int(m["nonfinite_total"])})
        log.warning("stage %s step %d: non-finite loss or gradient, update skipped (%d in a row)", self.stage.name,
                    step, streak)
        if streak >= self.run.config.max_nonfinite_steps:
            ckpt = self.run.ckpt
            raise NonFiniteError(
                f"stage {self.stage.name}: {streak} consecutive steps with a non-finite loss or gradient "
                f"(last at step {self.offset + step}); stopped. The last good checkpoint "
                f"{ckpt.latest_step()} in {ckpt.directory} is intact."
            )


def _stage_steps(stage, batches_per_epoch: int, max_steps: int) -> int:
    steps = int(math.ceil(stage.epochs * batches_per_epoch))
    return min(steps, max_steps) if max_steps and max_steps > 0 else steps


def _data_file(name: str, data_cfg) -> str:
    """A stage's data (a file, a packed directory, tfds:NAME): as given, or relative to data.data_dir."""
    if name.startswith("tfds:") or paths.is_remote(name) or os.path.isabs(name) or paths.exists(name):
        return name
    base = data_cfg.data_dir or data_cfg.image_folder
    candidate = os.path.join(base, name)
    if not paths.exists(candidate):
        raise FileNotFoundError(f"stage data {name!r} not found as given nor in {base!r} (set config.data.data_dir "
                                f"or give the stage an absolute path)")
    return candidate


def _stage_dir(workdir: str, index: int, stage) -> str:
    return os.path.join(workdir, f"stage{index + 1}_{stage.name}")


def _checkpointed(state: TrainState) -> dict:
    """What a checkpoint holds of the state (frozen parameters come from the stage's initial weights)."""
    return {"params": state.params, "opt_state": state.opt_state,
            "counters": {"step": state.step, "nonfinite_streak": state.nonfinite_streak,
                         "nonfinite_total": state.nonfinite_total}}


def _save(run: _Run, global_step: int, state: TrainState, index: int, step: int, data: _StageData,
          model: dict) -> None:
    meta = {"stage": index, "stage_step": step, "stage_steps": data.total_steps, "global_step": global_step,
            "model": model}
    run.metrics.flush()  # the metrics cover every step the checkpoint does
    run.ckpt.save(global_step, _checkpointed(state), meta, data.iterator.get_state())


class _Evaluator:
    """Held-out evaluation for a stage (nothing when the config names no validation data)."""

    def __init__(self, run: _Run, stage, cfg: LlavaConfig, image_cfg: image_lib.ImageProcessorConfig):
        self.samples = None
        data_cfg = run.config.data
        val = run.files.get("val") or data_cfg.val
        if not val:
            return
        self.samples = build_eval_set(val, run.files["image_folder"], run.tokenizer,
                                      data_cfg.eval_template, image_cfg, cfg, data_cfg.eval_max_length,
                                      num_frames=data_cfg.num_frames)
        self.forward = jax.jit(eval_forward(cfg))
        self.batch_size = data_cfg.eval_batch_size
        self.crop = image_cfg.crop_size
        self.cfg = cfg

    def __call__(self, state: TrainState) -> dict[str, float]:
        if not self.samples:
            return {}
        params = merge_params(state.params, state.frozen)
        return evaluate(self.forward, params, self.samples, batch_size=self.batch_size, crop=self.crop, cfg=self.cfg)
