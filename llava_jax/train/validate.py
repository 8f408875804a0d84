"""A whole training config checked before any work: no workdir written, no data generated, no weights loaded.

Each problem is a `ConfigError` whose message names the field as `--config.KEY=VALUE` names it
(`model.dtype`, `stages[1].remat`) and what it accepts, so that a typo costs a second, not a
stage of training. What needs the data itself (files exist, JSON parses) is checked by the loop
once the data is resolved, still before the first step (`loop.check_stage_data`).
"""

from __future__ import annotations

import re
from collections.abc import Collection

import ml_collections

# The float dtypes the models compute in (LlavaConfig.dtype).
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
    """A config that cannot run as written (names the field to change)."""


def has_architecture(model: ml_collections.ConfigDict) -> bool:
    """True if `model.vision` and `model.text` describe an architecture to initialise at random."""
    return model.vision.hidden_size > 0 and model.text.hidden_size > 0


def validate(config: ml_collections.ConfigDict, benchmarks: Collection[str] | None = None) -> None:
    """Raises ConfigError for the first field of `config` that cannot run; returns None if all can.

    `benchmarks`: the benchmark names a stage's `eval_benchmarks` may use (the train CLI passes the
    eval registry's; training sits below evaluation, so it does not import it). None: not checked here
    (`loop.run` checks them with its benchmark runner, still before training).
    """
    from llava_jax.anyres import VIDEO_POOLS
    from llava_jax.data.templates import TEMPLATES
    from llava_jax.models.attention import ATTENTION_IMPLS
    from llava_jax.models.remat import REMAT_POLICIES

    _one_of("model.dtype", config.model.dtype, DTYPES)
    _one_of("model.remat", config.model.remat, REMAT_POLICIES)
    _one_of("model.attention", config.model.attention, ATTENTION_IMPLS)
    _one_of("data.eval_template", config.data.eval_template, tuple(TEMPLATES))
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps", "data.eval_batch_size",
                "data.eval_max_length"):
        _positive(key, _lookup(config, key))
    _at_least("eval_every", config.eval_every, 0)
    _at_least("data.worker_count", config.data.worker_count, 0)
    _at_least("data.num_frames", config.data.num_frames, 1)
    _at_least("data.max_images_per_sample", config.data.max_images_per_sample, 1)
    _one_of("data.synthetic_args.task", config.data.synthetic_args.task, ("shapes", "media"))
    _one_of("model.video", config.model.video, VIDEO_POOLS)
    _at_least("model.max_tiles", config.model.max_tiles, 0)
    if not isinstance(config.data.max_images_per_row, int) or config.data.max_images_per_row < 0:
        raise ConfigError(f"config.data.max_images_per_row: {config.data.max_images_per_row!r}; expected an integer "
                          ">= 0 (0: as many images as a row's tokens hold)")
    if config.data.packing and config.data.group_by_modality_length:
        raise ConfigError("config.data.packing: True with data.group_by_modality_length=True; packed rows are full "
                          "whatever their samples' lengths: set --config.data.group_by_modality_length=False")
    for axis in MESH_AXES:
        size = config.mesh[axis]
        if not isinstance(size, int) or (size != -1 and size < 1):
            raise ConfigError(f"config.mesh.{axis}: {size!r}; expected a device count >= 1 or -1 (the rest)")
    if sorted(config.mesh.keys()) != sorted(MESH_AXES):
        raise ConfigError(f"config.mesh: axes {sorted(config.mesh.keys())}; expected {list(MESH_AXES)}")
    _check_rules(config.sharding_rules)
    m = config.model
    if m.image_grid_pinpoints and has_architecture(m):
        from llava_jax.anyres import AnyresConfig

        try:
            AnyresConfig(m.vision.image_size, 1, tuple(m.image_grid_pinpoints))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model.image_grid_pinpoints: {tuple(m.image_grid_pinpoints)!r}; expected "
                              f"(height, width) pairs, multiples of model.vision.image_size ({e})") from None
        if m.vision_feature_select_strategy in ("full", "cls_patch"):
            raise ConfigError(f"config.model.vision_feature_select_strategy: {m.vision_feature_select_strategy!r} "
                              "keeps the CLS token, which an anyres model (model.image_grid_pinpoints) cannot tile; "
                              "expected default")
    onevision = [k for k in ("max_tiles", "untiled_multi", "video") if m[k]]
    if onevision and not m.image_grid_pinpoints and has_architecture(m):
        raise ConfigError(f"config.model.{onevision[0]}: {m[onevision[0]]!r} needs an anyres model: set "
                          "model.image_grid_pinpoints (OneVision's geometry is anyres with these fields)")
    if not config.compile_only and not m.init and not has_architecture(m):
        raise ConfigError("config.model.init is empty and model.vision / model.text give no architecture "
                          "(hidden_size 0): name a converted checkpoint directory in model.init")
    if not config.compile_only and not config.data.synthetic and not config.data.tokenizer and not m.init:
        raise ConfigError("config.data.tokenizer is empty and config.model.init names no directory holding "
                          "tokenizer.model or tokenizer.json")
    if not config.stages:
        raise ConfigError("config.stages is empty: a run needs at least one stage")
    names = [s.name for s in config.stages]
    for index, stage in enumerate(config.stages):
        _check_stage(f"stages[{index}]", stage, TEMPLATES, REMAT_POLICIES, config.compile_only, benchmarks,
                     config.data.packing)
        if names.count(stage.name) > 1:
            raise ConfigError(f"config.stages[{index}].name: {stage.name!r} names two stages; each writes "
                              "WORKDIR/stageN_NAME and needs its own name")


def _check_stage(key: str, stage: ml_collections.ConfigDict, templates, remat_policies, compile_only: bool,
                 benchmarks: Collection[str] | None, packing: bool = False) -> None:
    if not stage.name or not re.fullmatch(r"[\w.-]+", stage.name):
        raise ConfigError(f"config.{key}.name: {stage.name!r}; expected letters, digits, '_', '-' or '.'")
    if not stage.data and not compile_only:
        raise ConfigError(f"config.{key}.data is empty: name the stage's data file, packed directory or tfds:NAME")
    _one_of(f"{key}.template", stage.template, tuple(templates))
    if stage.remat:
        _one_of(f"{key}.remat", stage.remat, remat_policies)
    for pattern in stage.trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.{key}.trainable: {pattern!r} is not a regular expression ({e})") from None
    for field in ("global_batch", "micro_batch", "max_length"):
        _positive(f"{key}.{field}", stage[field])
    if stage.global_batch % stage.micro_batch:
        raise ConfigError(f"config.{key}: global_batch {stage.global_batch} must divide by micro_batch "
                          f"{stage.micro_batch}")
    if not stage.epochs > 0:
        raise ConfigError(f"config.{key}.epochs: {stage.epochs!r}; expected a number > 0")
    _at_least(f"{key}.learning_rate", stage.learning_rate, 0)
    _at_least(f"{key}.vision_learning_rate", stage.vision_learning_rate, 0)
    if stage.vision_learning_rate and stage.lora is not None:
        raise ConfigError(f"config.{key}.vision_learning_rate: {stage.vision_learning_rate!r} with lora; a LoRA stage "
                          "has one rate for its adapters and one (lora.non_lora_learning_rate) for the rest")
    row_length = stage.row_length
    if not isinstance(row_length, int) or (row_length and row_length < stage.max_length):
        raise ConfigError(f"config.{key}.row_length: {row_length!r}; expected 0 (rows of max_length) or a packed "
                          f"row's tokens >= max_length {stage.max_length}")
    if row_length and not packing:
        raise ConfigError(f"config.{key}.row_length: {row_length} without data.packing; set "
                          "--config.data.packing=True (rows longer than a sample hold several samples)")
    if not isinstance(stage.base_resolution, bool):
        raise ConfigError(f"config.{key}.base_resolution: {stage.base_resolution!r}; expected True or False")
    _at_least(f"{key}.weight_decay", stage.weight_decay, 0)
    if not 0 <= stage.warmup_ratio < 1:
        raise ConfigError(f"config.{key}.warmup_ratio: {stage.warmup_ratio!r}; expected a fraction in [0, 1)")
    for name in stage.eval_benchmarks if benchmarks is not None else ():
        _one_of(f"{key}.eval_benchmarks", name, tuple(benchmarks))
    if stage.lora is not None:
        _positive(f"{key}.lora.rank", stage.lora.rank)
        if not 0 <= stage.lora.dropout < 1:
            raise ConfigError(f"config.{key}.lora.dropout: {stage.lora.dropout!r}; expected a fraction in [0, 1)")


def _check_rules(rules) -> None:
    for i, rule in enumerate(rules):
        ok = isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
        if ok:
            axes = rule[1]
            named = [] if axes is None else [axes] if isinstance(axes, str) else axes
            ok = isinstance(named, (list, tuple)) and all(a in MESH_AXES for a in named)
        if not ok:
            raise ConfigError(f"config.sharding_rules[{i}]: {rule!r}; expected (logical name, mesh axis or "
                              f"axes or None) with mesh axes from {list(MESH_AXES)}")


def _lookup(config: ml_collections.ConfigDict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _one_of(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config.{key}: {value!r}; expected one of {', '.join(map(str, allowed))}")


def _positive(key: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.{key}: {value!r}; expected an integer >= 1")


def _at_least(key: str, value, low: float) -> None:
    if not isinstance(value, (int, float)) or value < low:
        raise ConfigError(f"config.{key}: {value!r}; expected a number >= {low}")
