"""Anima 2.9B (the 2B model's 28 blocks expanded to 40, width 2048) is a known release: detected without a
warning, named in logs, metadata, `lora-info` and `plan`, and everything that counts blocks follows the file."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import make_run, read_events

from anima_core.errors import ModelFileError
from anima_core.models.dit import AnimaDiT, DiTConfig
from anima_core.models.dit_loading import describe_dit, detect_dit_config, load_dit
from anima_core.models.tiny import TINY_DIT, make_tiny_model, write_random_dit
from anima_core.training import planner
from anima_core.training.flops import step_tflop

ANIMA_2B = DiTConfig()
ANIMA_29B = replace(ANIMA_2B, num_blocks=40)
TINY_40 = replace(TINY_DIT, num_blocks=40)


def meta_shapes(config: DiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return AnimaDiT(config).state_dict()


def test_a_40_block_2048_wide_file_is_anima_29b_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        config = detect_dit_config(meta_shapes(ANIMA_29B), "anima-2.9b.safetensors")
    assert config.num_blocks == 40 and config.model_channels == 2048 and config.num_heads == 16
    assert not caplog.records
    assert describe_dit(config) == "Anima 2.9B (40 blocks, width 2048)"
    assert describe_dit(detect_dit_config(meta_shapes(ANIMA_2B))) == "Anima 2B (28 blocks, width 2048)"


def test_an_unknown_block_count_at_width_2048_names_both_releases(caplog):
    with caplog.at_level(logging.WARNING):
        config = detect_dit_config(meta_shapes(replace(ANIMA_2B, num_blocks=33)), "odd.safetensors")
    assert config.num_blocks == 33
    (record,) = caplog.records
    assert "28 blocks / 16 heads (Anima 2B)" in record.getMessage()
    assert "40 blocks / 16 heads (Anima 2.9B)" in record.getMessage()
    assert describe_dit(config) == "DiT of 33 blocks, width 2048"


def test_rope_buffers_saved_by_sd_scripts_models_are_dropped_and_other_extras_still_refused(tmp_path):
    # sd-scripts' DiT registers its RoPE buffers as persistent (spec §1.3): files written by it carry them.
    path = write_random_dit(tmp_path / "dit.safetensors")
    tensors = load_file(path)
    with_buffers = {**tensors, "net.pos_embedder.seq": torch.arange(256.0),
                    "net.pos_embedder.dim_spatial_range": torch.arange(21.0),
                    "net.pos_embedder.dim_temporal_range": torch.arange(22.0)}
    save_file(with_buffers, tmp_path / "buffers.safetensors", metadata={"format": "pt"})
    dit = load_dit(tmp_path / "buffers.safetensors", dtype=torch.float32)
    reference = load_dit(path, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), reference.state_dict().values()))

    save_file({**tensors, "net.pos_embedder.learned": torch.zeros(3)}, tmp_path / "extra.safetensors")
    with pytest.raises(ModelFileError, match="pos_embedder.learned"):
        load_dit(tmp_path / "extra.safetensors")


def test_plan_and_flops_follow_the_block_count():
    profile = types.SimpleNamespace()
    plan_2b = planner.plan(profile, ANIMA_2B, vram_gib=24, lora_params=0)
    plan_29b = planner.plan(profile, ANIMA_29B, vram_gib=24, lora_params=0)
    assert plan_29b.summary.startswith("Anima 2.9B (40 blocks, width 2048): 2.9")  # the adapter included
    assert plan_2b.summary.startswith("Anima 2B (28 blocks, width 2048): 2.0")
    assert plan_29b.peak > plan_2b.peak
    counts = planner.model_counts(profile, ANIMA_29B, lora_params=0)
    assert counts.num_blocks == 40
    # 12 more blocks of the same size: the weights grow by exactly 12 blocks.
    assert counts.total_params - planner.model_counts(profile, ANIMA_2B, lora_params=0).total_params == 12 * counts.block_params
    swaps = {s.blocks_to_swap for s in planner.candidate_settings(40)}
    assert max(swaps) == 38  # block swap keeps at least two blocks resident, of 40
    flops = [step_tflop(c, latent_hw=(128, 128), text_tokens=512, batch=1, checkpointing=False) for c in (ANIMA_2B, ANIMA_29B)]
    assert 1.35 < flops[1] / flops[0] < 40 / 28


@pytest.fixture(scope="module")
def tiny_40(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny40")
    paths = make_tiny_model(root)
    write_random_dit(paths.dit, config=TINY_40)
    return paths


def test_a_40_block_model_trains_and_its_lora_names_the_model(tmp_path, tiny_40, capsys):
    from anima_core.cli import main

    result = make_run(tmp_path, tiny_40, training={"max_train_steps": 2},
                      network={"args": {"train_block_indices": "20-39"}}, memory={"blocks_to_swap": 38}).run()
    assert result.status == "finished"
    logs = [e["message"] for e in read_events(result.run_dir) if e["type"] == "log"]
    assert "DiT: DiT of 40 blocks, width 64" in logs
    lora = load_file(result.lora_path)
    blocks = {int(k.split("_")[3]) for k in lora if k.startswith("lora_unet_blocks_")}
    assert blocks == set(range(20, 40))
    main(["lora-info", str(result.lora_path)])
    out = capsys.readouterr().out
    assert "made for: DiT of 40 blocks, width 64" in out and "anima_dit_blocks = 40" in out


def test_block_options_beyond_the_40_blocks_are_refused(tmp_path, tiny_40):
    with pytest.raises(Exception, match="40 blocks"):
        make_run(tmp_path / "swap", tiny_40, memory={"blocks_to_swap": 39}).run()
    with pytest.raises(Exception, match="train_block_indices"):
        make_run(tmp_path / "indices", tiny_40, network={"args": {"train_block_indices": "0-40"}}).run()


def test_lora_info_tells_2b_from_29b_loras_by_their_block_keys(tmp_path, capsys):
    from anima_core.cli import main

    def lora_with_blocks(name, blocks):
        tensors = {}
        for b in blocks:
            key = f"lora_unet_blocks_{b}_self_attn_q_proj"
            tensors |= {f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(2048, 4),
                        f"{key}.alpha": torch.tensor(4.0)}
        save_file(tensors, tmp_path / name)
        return tmp_path / name

    main(["lora-info", str(lora_with_blocks("deep.safetensors", [0, 39]))])
    assert "made for: blocks up to 39: Anima 2.9B" in capsys.readouterr().out
    main(["lora-info", str(lora_with_blocks("shallow.safetensors", [0, 27]))])
    assert "made for: blocks up to 27: Anima 2B or Anima 2.9B" in capsys.readouterr().out


def test_bench_has_a_29b_setting(monkeypatch, capsys):
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    assert bench.MODELS["2.9b"] == ANIMA_29B
    rows = bench.main(["--tiny", "--model", "2.9b", "--settings", "plain,swap18", "--steps", "1"])
    assert "tiny config of Anima 2.9B (11 blocks)" in capsys.readouterr().out
    assert [r.setting for r in rows] == ["plain", "swap18"]
    assert all(r.sd_scripts_s is None for r in rows)  # the sd-scripts anchors are for the 2B model
    full = bench.Bench(tiny=False, device=torch.device("meta"), steps=1, warmup=0, model="2.9b")
    assert full.config.num_blocks == 40
    assert full.floor_tflop(bench.Setting()) > bench.FLOOR_TFLOP[False] * 1.35


def test_a_40_block_model_full_fine_tunes_with_block_swap_into_a_40_block_file(tmp_path, tiny_40):
    """Full fine-tuning of the 2.9B layout (40 blocks), 30 of them swapped, Adafactor's fused backward pass: the
    saved file is the released 40-block layout, loads strictly, and its blocks past the 2B's 28 were trained."""
    result = make_run(tmp_path, tiny_40, training={"max_train_steps": 2},
                      network={"module": "full", "dim": None, "alpha": None}, memory={"blocks_to_swap": 30},
                      optimizer={"optimizer_type": "Adafactor", "learning_rate": 1e-3, "fused_backward_pass": True,
                                 "max_grad_norm": 0.0, "optimizer_args": {"relative_step": False}}).run()
    assert result.status == "finished"
    tuned = load_dit(result.lora_path, dtype=torch.float32)
    assert tuned.config.num_blocks == 40
    base, saved = load_file(tiny_40.dit), load_file(result.lora_path)
    assert not torch.equal(saved["net.blocks.39.mlp.layer1.weight"].float(), base["net.blocks.39.mlp.layer1.weight"].float())
