"""The embedded default run: a tiny LLaVA trained from scratch on the synthetic shapes data.

    python -m llava_jax.train                     # this config, in ./workdir
    python -m llava_jax.train --config=configs/tiny.py --workdir=/tmp/tiny --config.max_steps=20

No download: the data and its tokenizer are generated into WORKDIR/data. There are no
pretrained towers to start from, so unlike the real recipes stage 1 trains every parameter, the
vision tower included; stage 2 trains the projector and the LLM, as LLaVA's does.
"""

from __future__ import annotations

import ml_collections

from llava_jax.parallel import rules as rules_lib


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, each declared once here; recipes (configs/*.py) set values, never add fields.

    Stages are the one exception to a fixed shape: `stages` is a list of `stage(...)` entries, each
    with the fields `stage` declares. `--config.KEY=VALUE` can only set fields declared here, so a
    misspelt key is an error, and `python -m llava_jax.train --help` lists them all.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.max_steps = -1  # cap on each stage's steps (-1: the stage's epochs decide)
    c.log_every = 10
    c.eval_every = 0  # 0: evaluate at the end of each stage only
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.max_nonfinite_steps = 10
    c.progress = True
    c.compilation_cache_dir = ""  # keep compiled programs here for the next start (llava_jax.parallel.compile_cache)
    # Compile-only (llava_jax/train/aot.py): compile each stage's step from shapes, print time and memory, exit.
    c.compile_only = False
    c.compile_topology = ""  # with compile_only: a TPU topology (v5e:2x4, v5p:2x2x1, v6e:2x4, ...) via libtpu
    c.compile_chip_memory_gib = 0.0  # the memory to compare against (0: the device kind's, when known)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Logical axis name -> mesh axes, the one table that shards every parameter and activation
    # (llava_jax/parallel/rules.py); a run may replace it whole, e.g. to shard vocab over `tensor`.
    c.sharding_rules = rules_lib.DEFAULT_RULES
    c.model = ml_collections.ConfigDict()
    c.model.init = ""  # a converted checkpoint directory; empty: random init from the fields below
    c.model.dtype = "bfloat16"
    c.model.remat = "none"
    c.model.scan_layers = True  # nn.scan over each tower's layers (compile time independent of depth)
    c.model.attention = "auto"  # auto | xla | cudnn | splash (llava_jax/models/attention.py)
    c.model.preset = ""  # compile-only: a named architecture (train/aot.py PRESETS) when model.init is not here
    # A random initialisation (no model.init) builds this architecture; HF config names, 0: not given.
    c.model.projector_type = "mlp2x_gelu"
    c.model.vision_feature_layer = -2
    c.model.vision_feature_select_strategy = "default"
    c.model.vision = ml_collections.ConfigDict(dict(
        hidden_size=0, intermediate_size=0, num_hidden_layers=0, num_attention_heads=0, image_size=0, patch_size=0,
        hidden_act="quick_gelu"))
    # (height, width) pixel pairs, multiples of vision.image_size: a random LLaVA-NeXT (anyres) model; empty: LLaVA-1.5.
    c.model.image_grid_pinpoints = ()
    # LLaVA-OneVision's geometry for a random anyres model (llava_jax/anyres.py AnyresConfig): anyres_max_N's N
    # (0: none); an image sharing its prompt with others as its base tile alone; how a video's frames become
    # tokens ("" none, "bilinear" OneVision, "average" LLaVA-NeXT-Video; a video placeholder joins the vocabulary).
    c.model.max_tiles = 0
    c.model.untiled_multi = False
    c.model.video = ""
    c.model.text = ml_collections.ConfigDict(dict(
        hidden_size=0, intermediate_size=0, num_hidden_layers=0, num_attention_heads=0, num_key_value_heads=0,
        max_position_embeddings=0, rms_norm_eps=1e-5, rope_theta=10000.0))
    c.data = ml_collections.ConfigDict()
    c.data.synthetic = False  # generate the coloured-shapes data into WORKDIR/data (data/synthetic.py)
    # sizes: (height, width) pairs to draw images at (the LLaVA-NeXT variant); empty: image_size square.
    # task: "shapes" (synthetic.build: one image a record, stage1 / stage2 / val) or "media" (synthetic.build_media:
    # several images or a video of data.num_frames frames a record, train / val).
    c.data.synthetic_args = ml_collections.ConfigDict(dict(num_train=2000, num_val=200, image_size=56, seed=0,
                                                           vocab_size=1024, sizes=(), task="shapes"))
    c.data.image_folder = ""
    c.data.data_dir = ""  # where relative stage data files are looked up (default: image_folder)
    c.data.tfds_data_dir = ""  # TFDS data_dir for stages whose data is "tfds:NAME" (default: TFDS's own)
    c.data.tokenizer = ""
    c.data.val = ""
    c.data.pad_to_square = True
    c.data.group_by_modality_length = False
    c.data.length_buckets = ()
    # Several samples a row (data/pipeline.py, "Packing"): rows of the stage's max_length with segment_ids and
    # positions; the loss is that of the same samples unpacked. Not with group_by_modality_length.
    c.data.packing = False
    c.data.max_images_per_row = 0  # packed rows' image slots; 0: as many images as max_length tokens hold
    c.data.max_images_per_sample = 1  # unpacked rows' images at most (records with more are skipped and counted)
    # Frames sampled uniformly from each record's `video` (a model with video pooling only: OneVision, NeXT-Video);
    # each is one tile slot of a row.
    c.data.num_frames = 32
    c.data.worker_count = 0
    c.data.eval_template = "vicuna_v1"
    c.data.eval_batch_size = 32
    c.data.eval_max_length = 2048
    # Benchmarks a stage names in eval_benchmarks read their data here, in the original's
    # playground/data/eval layout (`python -m llava_jax.eval suite --data-root`); empty: the
    # synthetic build's folder.
    c.data.eval_root = ""
    c.stages = []
    return c


def stage(name: str, *, data: str, template: str, trainable: list[str], learning_rate: float, global_batch: int,
          micro_batch: int, epochs: float = 1.0, max_length: int = 2048, warmup_ratio: float = 0.03,
          weight_decay: float = 0.0, eval_benchmarks: tuple[str, ...] = (), remat: str = "",
          lora: ml_collections.ConfigDict | None = None, vision_learning_rate: float = 0.0,
          base_resolution: bool = False, row_length: int = 0) -> ml_collections.ConfigDict:
    """One training stage: which data, which template, which parameters train, and how.

    `eval_benchmarks` names benchmarks of `llava_jax.eval` to answer and score with the stage's
    model when the stage ends (data under config.data.eval_root), logged as `bench/<name>`.
    `remat` overrides `model.remat` for this stage (empty: the model's); the policy that pays
    depends on the stage's micro-batch, so recipes set the two together.
    With `lora` (see `lora()`) the stage trains LoRA adapters at `learning_rate` plus the parameters
    `trainable` names (e.g. the projector) at `lora.non_lora_learning_rate`; everything else is frozen.
    `vision_learning_rate` > 0 trains the vision tower's parameters (when `trainable` names them) at that
    peak instead of `learning_rate` (LLaVA-NeXT stage 2: the tower at 2e-6); 0: one rate for all.
    `base_resolution` feeds an anyres (LLaVA-NeXT) model each image as its base tile only (no grid, no
    newline; LLaVA-NeXT's stage 1); a LLaVA-1.5 model always sees one tile.
    `row_length` > 0 (with data.packing): packed rows of that many tokens, each sample still truncated at
    `max_length` (0: rows of max_length); rows of 4 x 2048 pack LLaVA-1.5's mix 97% full against 85%.
    """
    return ml_collections.ConfigDict(dict(
        name=name, data=data, template=template, trainable=list(trainable), learning_rate=float(learning_rate),
        global_batch=global_batch, micro_batch=micro_batch, epochs=float(epochs), max_length=max_length,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay, eval_benchmarks=tuple(eval_benchmarks), remat=remat,
        lora=lora, vision_learning_rate=float(vision_learning_rate), base_resolution=bool(base_resolution),
        row_length=row_length,
    ))


# The original's `find_all_linear_names`: every Linear of the language model, not lm_head, the
# projector or the vision tower; here: every kernel inside the decoder layers.
LORA_TARGETS = ("language_model/layers.*/kernel",)


def lora(rank: int = 128, alpha: float = 256.0, dropout: float = 0.05, targets=LORA_TARGETS,
         non_lora_learning_rate: float | None = 2e-5) -> ml_collections.ConfigDict:
    """A stage's LoRA settings; defaults are LLaVA-1.5's `finetune_lora.sh` (r 128, alpha 256, dropout
    0.05, projector at `--mm_projector_lr 2e-5`). `targets` are regular expressions over our
    parameter paths (kernels of the decoder layers' Linear layers); `non_lora_learning_rate` None
    trains the non-LoRA trainables at the stage's learning rate."""
    return ml_collections.ConfigDict(dict(
        rank=rank, alpha=float(alpha), dropout=float(dropout), targets=list(targets),
        non_lora_learning_rate=None if non_lora_learning_rate is None else float(non_lora_learning_rate),
    ))


def tiny_config() -> ml_collections.ConfigDict:
    """The embedded default (see the module docstring).

    About 4 minutes on an idle 2-core CPU for 0.95-1.0 held-out accuracy, every question type above
    chance (blind ~0.25). What makes a tower from scratch learn: stage 1 (captions, ~30 tokens, so
    cheap) runs many small-batch epochs and is where the vision tower learns colour, shape, count and
    where objects are; stage 2 asks every image where its objects are (the template moves the image
    away from the start of the sequence, where stage 1 learned to read position) and freezes the tower, as
    LLaVA does, so that its first large gradients (the new template) cannot wipe those features out (trained
    too, shape accuracy fell to chance for some seeds).
    """
    c = base_config()
    c.log_every = 20
    c.checkpoint_every = 500
    c.async_checkpoints = False
    c.model.dtype = "float32"  # bf16 is slow on CPU; the real recipes use bf16
    c.model.vision_feature_layer = -1
    c.model.vision.update(dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
        patch_size=14, hidden_act="quick_gelu"))
    c.model.text.update(dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0))
    c.data.synthetic = True
    c.data.synthetic_args.update(dict(num_train=2000, num_val=200, image_size=56, seed=0, vocab_size=1024))
    # Steps are compute-bound in T: captions are <= 38 tokens (16 of them image tokens), Q/A 43-120.
    c.data.length_buckets = (32, 40, 48, 64, 80, 96, 112)
    c.data.eval_max_length = 128
    c.stages = [
        stage("pretrain", data="stage1", template="plain", trainable=[".*"], learning_rate=2e-3,
              global_batch=16, micro_batch=16, epochs=16, max_length=40, warmup_ratio=0.05),
        stage("finetune", data="stage2", template="vicuna_v1", trainable=["projector/.*", "language_model/.*"],
              learning_rate=2e-3, global_batch=16, micro_batch=16, epochs=3, max_length=128, warmup_ratio=0.05,
              eval_benchmarks=["shapes"]),
    ]
    return c


def media_config() -> ml_collections.ConfigDict:
    """A tiny LLaVA-OneVision trained from scratch on the synthetic many-image and video tasks (`tiny.py:media`).

    synthetic.build_media's records: a video of 4 frames asking which frame shows the red square, and three
    images asking how many show a red shape, each with a "describe each frame / image" record (what a tower
    trained from scratch learns colour from). The geometry is OneVision's (anyres_max_1, several images of a
    prompt untiled, frames pooled bilinearly) at 28-pixel tiles of 2 x 2 patches: 5 tokens an image, 1 a frame
    plus a newline, so that a row is at most 61 tokens (a description of three images) and a step costs little.
    One stage trains every parameter. Counting learns first (~200 steps); which frame, read off where the red
    frame's one token sits before the answer, takes longer, and more so with a narrower LLM: at hidden size 64
    it was at 0.74 after 600 steps (seed 1), at 128 at 0.98 after 400. When the model leaves the blind plateau
    is seed luck: one (init, data) seed pair in six tried never did in 450 steps (BENCHMARKS.md), so the test
    runs this config's seeds (0.96 on both types).
    """
    c = base_config()
    c.log_every = 50
    c.checkpoint_every = 1000
    c.async_checkpoints = False
    c.model.dtype = "float32"  # bf16 is slow on CPU
    c.model.vision_feature_layer = -1
    c.model.vision.update(dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=14, hidden_act="quick_gelu"))
    c.model.image_grid_pinpoints = ((28, 28), (28, 56), (56, 28), (56, 56))
    c.model.max_tiles = 1
    c.model.untiled_multi = True
    c.model.video = "bilinear"
    c.model.text.update(dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0))
    c.data.synthetic = True
    c.data.synthetic_args.update(dict(task="media", num_train=600, num_val=100, image_size=28, seed=0,
                                      vocab_size=640))
    c.data.num_frames = 4
    c.data.max_images_per_sample = 3
    c.data.eval_template = "mistral_instruct"  # synthetic.MEDIA_TEMPLATE: no system prompt, rows mostly media
    c.data.eval_max_length = 64
    c.data.eval_batch_size = 50
    c.stages = [
        stage("media", data="train", template="mistral_instruct", trainable=[".*"], learning_rate=2e-3,
              global_batch=16, micro_batch=16, epochs=6, max_length=64, warmup_ratio=0.05),
    ]
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The embedded default as a config file: what `--config` names when it is not given."""
    if arg:
        raise ValueError(f"the embedded default takes no argument; found {arg!r}")
    return tiny_config()


def describe(config: ml_collections.ConfigDict) -> list[str]:
    """`key = value` for every leaf, the keys as `--config.KEY=VALUE` names them (`stages[0].name`)."""
    lines = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, ml_collections.ConfigDict):
            for k in sorted(value.keys()):
                walk(f"{prefix}.{k}" if prefix else k, value[k])
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, ml_collections.ConfigDict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            lines.append(f"{prefix} = {value!r}")

    walk("", config)
    return lines
