"""What a stage compiles: its optimizer, the sharded train state and the jitted step.

Built from shapes alone (real arrays or `jax.ShapeDtypeStruct`s), so that the training loop and the
compile-only mode (`train/aot.py`) build a stage's step with this one function: what compile-only
measures is what training runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.config import LlavaConfig
from llava_jax.parallel import rules as rules_lib
from llava_jax.parallel.partition import jit_sharded, state_shardings
from llava_jax.train.lora import ADAPTER_PATTERNS
from llava_jax.train.optimizer import (Params, learning_rate_groups, optimizer_from_hyper, schedule_hyper,
                                      split_params)
from llava_jax.train.step import TrainState, create_state, make_train_step


def compute_config(cfg: LlavaConfig, config: ml_collections.ConfigDict,
                   stage: ml_collections.ConfigDict | None = None) -> LlavaConfig:
    """The architecture `cfg` with the run's compute settings: dtype, remat, attention, scanned layers.

    Trained parameters keep float32 master copies; the compute (and frozen parameters) use
    `model.dtype`. A stage's `remat` (when set) overrides `model.remat`.
    """
    m = config.model
    remat = (stage.remat if stage is not None else "") or m.remat
    return cfg.replace(dtype=m.dtype, param_dtype="float32", remat=remat, attention=m.attention,
                       scan_layers=m.scan_layers)


def rules_from_config(config: ml_collections.ConfigDict) -> rules_lib.Rules:
    """The sharding rules of a run: `config.sharding_rules` (declared as the default table, train/defaults.py)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)


def _cast(x: Any, dtype) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)


@dataclasses.dataclass
class StageProgram:
    """A stage's optimizer, train-state shapes and shardings, and its compiled-on-first-call step.

    `step(state, batch)` takes the micro-batched global batch ([A, b, ...] leaves, see
    `parallel.partition.device_batch`) and returns (state, metrics); it donates the state and has
    `.lower(state, batch)` for ahead-of-time compilation from `jax.ShapeDtypeStruct`s.
    """

    cfg: LlavaConfig
    trainable: list[str]
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_abstract: TrainState  # of jax.ShapeDtypeStruct
    state_shardings: TrainState  # of NamedSharding
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]

    def split(self, params: Params) -> tuple[Params, Params]:
        """(trainable, frozen): trained parameters as given (float32), frozen ones in the compute dtype."""
        trainable, frozen = split_params(params, self.trainable)
        return trainable, jax.tree.map(lambda x: _cast(x, self.cfg.dtype), frozen)

    def init_state(self, params: Params) -> TrainState:
        """The stage's first train state, created directly in its shardings."""
        trainable, frozen = self.split(params)
        return jax.jit(lambda p, f: create_state(p, f, self.tx), out_shardings=self.state_shardings)(trainable, frozen)


def stage_program(
    cfg: LlavaConfig, stage: ml_collections.ConfigDict, mesh: Mesh, rules: rules_lib.Rules, total_steps: int,
    params: Params, *, seed: int = 0,
) -> StageProgram:
    """The program of one stage over `mesh`; `params` (arrays or shapes) only give shapes and dtypes.

    Args:
      cfg: the model config with compute settings (`compute_config`).
      stage: the stage's config (`trainable` patterns, learning rates, warmup, weight decay).
      total_steps: the stage's length, for the learning-rate schedule.
      params: with `cfg.lora`, the adapters too: they train with `stage.learning_rate`, and the
        stage's `trainable` patterns (e.g. the projector) with `stage.lora.non_lora_learning_rate`.
      seed: LoRA dropout's seed (the step and micro-batch are folded in).
    """
    lora = stage.lora if cfg.lora is not None else None
    trainable = list(stage.trainable) + (list(ADAPTER_PATTERNS) if cfg.lora is not None else [])
    other_learning_rate, other = learning_rate_groups(stage, lora.non_lora_learning_rate if lora else None)
    hyper = schedule_hyper(stage.learning_rate, total_steps, stage.warmup_ratio, weight_decay=stage.weight_decay,
                           other_learning_rate=other_learning_rate)
    tx, schedule = optimizer_from_hyper(hyper, other=other)
    program = StageProgram(cfg, trainable, tx, schedule, None, None, None)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state_abstract = jax.eval_shape(lambda p, f: create_state(p, f, tx), *program.split(shapes))
    shardings = state_shardings(state_abstract, cfg, mesh, rules, tx)
    repl = NamedSharding(mesh, PartitionSpec())

    def step_with(state, batch, hyper):
        # The optimizer rebuilt around the traced numbers: same state structure as `tx`'s.
        return make_train_step(cfg, *optimizer_from_hyper(hyper, other=other), seed=seed)(state, batch)

    jitted = jit_sharded(step_with, mesh, rules, (shardings, None, repl), (shardings, repl), donate_argnums=(0,))
    step = _WithHyper(jitted, hyper)
    return dataclasses.replace(program, state_abstract=state_abstract, state_shardings=shardings, step=step)


@dataclasses.dataclass(frozen=True)
class _WithHyper:
    """The jitted `step(state, batch, hyper)` as `step(state, batch)`, with `.lower` alike: the stage's
    schedule numbers go in as arrays, not as constants of the program (optimizer.schedule_hyper)."""

    jitted: Callable
    hyper: dict

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.jitted(state, batch, self.hyper)

    def lower(self, state: Any, batch: dict) -> Any:
        """The step lowered for these (abstract) arguments, for ahead-of-time compilation."""
        return self.jitted.lower(state, batch, self.hyper)
