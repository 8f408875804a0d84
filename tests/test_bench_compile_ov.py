"""bench/compile.py's OneVision-7B cells (`ov-7b`): the config each cell compiles, checked without compiling."""

from __future__ import annotations

import pytest

from bench import compile as bench_compile


def test_ov_cells_compile_the_recipes_stages():
    """`si` / `ov` are configs/llava_onevision.py's stages with the cell's rows: everything trained (the tower at
    its own rate), 32768 tokens, the recipe's global batch; `stage1` the projector alone at 8192 tokens."""
    from llava_jax.config import PRESETS

    si = bench_compile._cell_config("ov-7b", "si", 4, 1, "full")
    s = si.stages[0]
    assert (s.name, s.max_length, s.micro_batch, s.global_batch) == ("si", 32768, 4, 256)
    assert "vision_tower/.*" in s.trainable and "language_model/.*" in s.trainable and s.vision_learning_rate == 2e-6
    assert si.model.preset == "llava-onevision-qwen2-7b" and si.model.init == "" and si.model.remat == "full"
    cfg = PRESETS[si.model.preset]  # the architecture the cell compiles (aot.model_config: no model.init here)
    assert (cfg.text.num_layers, cfg.text.hidden_size, cfg.vision.image_size) == (28, 3584, 384)
    assert cfg.geometry.max_patches == 37 and cfg.geometry.video == "bilinear"  # base + 6 x 6 tiles, video rows

    stage1 = bench_compile._cell_config("ov-7b", "stage1", 8, 2, "full").stages[0]
    assert (stage1.max_length, stage1.micro_batch, stage1.base_resolution) == (8192, 16, True)
    assert list(stage1.trainable) == ["projector/.*"]


def test_ov_si_and_ov_cells_are_one_program():
    """The two fine-tuning stages differ in their data file alone, so their cells compile the same step."""
    si = bench_compile._cell_config("ov-7b", "si", 8, 1, "full").to_dict()
    ov = bench_compile._cell_config("ov-7b", "ov", 8, 1, "full").to_dict()
    si_stage, ov_stage = si.pop("stages")[0], ov.pop("stages")[0]
    assert si == ov
    assert {k for k in si_stage if si_stage[k] != ov_stage[k]} == {"name", "data"}


def test_chips_and_rows_a_table_starts_from():
    assert [bench_compile._chips(t) for t in ("v5p-8", "v6e-8", "v6e-16", "v6e-32", "v5e-32", "8x80GB-GPU")] == \
        [4, 8, 16, 32, 32, 8]
    assert bench_compile._recipe_rows("ov-7b", "si") == 16  # the recipe's micro-batch of 128 over 8 devices
    assert bench_compile._recipe_rows("7b", 2) == 16  # LLaVA-1.5's, as before


@pytest.mark.parametrize("argv, message", [
    (["--cell", "ov-7b", "2", "v5p-8"], "stage 2 of ov-7b: expected one of stage1, si, ov"),
    (["--cell", "7b", "si", "v5p-8"], "stage 'si' of 7b: expected 1 or 2"),
    (["--table", "--sizes", "ov-7b", "--stages", "si", "--targets", "v6e-64"], "target 'v6e-64'"),
    (["--cell", "ov-7b", "ov", "v5p-8", "--lora"], "LLaVA-OneVision's stages have no LoRA recipe"),
])
def test_bad_cell_exits_2_before_compiling(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sys.argv", ["bench.compile", *argv])
    with pytest.raises(SystemExit) as e:
        bench_compile.main()
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_packed_cells_with_a_row_length_keep_the_recipes_tokens_a_step(tmp_path):
    """`7b:2:v5p-8:4:packed=8192`: packed rows of 8192 (samples still truncated at the recipe's 2048) in a quarter
    of the recipe's rows; fills by layout; a bad row length exits before compiling anything."""
    c = bench_compile._cell_config("7b", 2, 4, 4, "full", packed=True, row_length=8192)
    s = c.stages[0]
    assert c.data.packing and not c.data.group_by_modality_length
    assert (s.row_length, s.max_length, s.micro_batch, s.global_batch) == (8192, 2048, 16, 32)
    plain = bench_compile._cell_config("7b", 2, 4, 16, "full", packed=True).stages[0]
    assert (plain.row_length, plain.global_batch) == (0, 128)
    assert bench_compile._fills("packed=0.851,packed8192=0.972,bucketed=0.746") == {
        "packed": 0.851, "packed8192": 0.972, "bucketed": 0.746}
    with pytest.raises(SystemExit, match="--fill: 'packedx=0.9'"):
        bench_compile._fills("packedx=0.9")
    with pytest.raises(SystemExit, match="flags after ROWS are packed \\(or packed=ROW_LENGTH\\) and tower"):
        bench_compile.costs(str(tmp_path / "out.jsonl"), ["7b:2:v5p-8:4:packed=long"], "full", {})
