"""The VRAM planner's arithmetic on the released 2B config (spec §10) and on the tiny config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from anima_core.errors import ModelFileError
from anima_core.models.dit import DiTConfig
from anima_core.models.tiny import TINY_DIT
from anima_core.training.planner import (
    GIB,
    Settings,
    dit_config_from_file,
    format_measured,
    format_plan,
    meta_dit,
    model_counts,
    network_parameter_count,
    plan,
)
from anima_plugins.lora import create_network

SD_SCRIPTS_LORA_16 = 1_433_600 * 16  # spec §7.3: 280 default DiT modules, per unit rank


def profile(memory=None, **tables):
    values = dict(
        memory=dict(
            gradient_checkpointing=False,
            cpu_offload_checkpointing=False,
            unsloth_offload_checkpointing=False,
            blocks_to_swap=0,
            fp8_base=False,
        ),
        model=dict(transformer_dtype=None, vae_dtype="float32"),
        training=dict(mixed_precision="bf16", full_bf16=False),
        dataset=dict(resolution=1024, train_batch_size=1, dataset_config=None),
        network=dict(
            module="lora_anima",
            dim=16,
            alpha=16.0,
            args={"target_preset": "sd-scripts"},
            weights=None,
            train_unet_only=True,
        ),
        caching=dict(cache_latents=True, cache_text_encoder_outputs=True),
        optimizer=dict(optimizer_type="AdamW"),
        sampling=dict(sample_prompts=None),
    )
    values["memory"].update(memory or {})
    for table, updates in tables.items():
        values[table].update(updates)
    return SimpleNamespace(**{k: SimpleNamespace(**v) for k, v in values.items()})


def training_peak(prof, config=None, **kwargs) -> float:
    p = plan(prof, config or DiTConfig(), lora_params=SD_SCRIPTS_LORA_16, **kwargs)
    return next(ph for ph in p.phases if ph.name == "training").peak / GIB


def test_2b_parameter_counts_equal_the_spec():
    counts = model_counts(profile(), DiTConfig(), lora_params=0)
    assert counts.block_params == 69_206_528
    assert counts.num_blocks * counts.block_params == 1_937_782_784
    assert counts.total_params == 2_091_068_928
    assert counts.other_params == 18_622_464 + 134_663_680  # DiT other + LLM adapter


def test_2b_weight_bytes_equal_the_spec():
    p = plan(profile(), DiTConfig(), lora_params=0)
    training = next(ph for ph in p.phases if ph.name == "training")
    weights = next(v for k, v in training.parts.items() if k.startswith("DiT weights"))
    assert weights == 2 * 2_091_068_928  # ≈ 4.18 GB in bf16


def test_block_swap_removes_exactly_the_swapped_blocks_weights():
    def weights(swap):
        p = plan(profile({"gradient_checkpointing": True, "blocks_to_swap": swap}), DiTConfig(), lora_params=0)
        training = next(ph for ph in p.phases if ph.name == "training")
        return next(v for k, v in training.parts.items() if k.startswith("DiT weights"))

    assert weights(0) - weights(18) == 18 * 69_206_528 * 2
    assert weights(0) - weights(26) == 26 * 69_206_528 * 2


def test_fp8_stores_one_byte_per_quantised_weight_plus_row_scales():
    counts = model_counts(profile(), DiTConfig(), lora_params=0)
    # Per block: attention and MLP Linears are quantised; AdaLN (6 291 456) and the 4 q/k norms (512) are not.
    assert counts.block_fp8_params == 69_206_528 - 6_291_456 - 512
    assert counts.block_fp8_rows == 4 * 2048 + 4 * 2048 + 8192 + 2048
    p = plan(profile({"fp8_base": True}), DiTConfig(), lora_params=0)
    training = next(ph for ph in p.phases if ph.name == "training")
    weights = next(v for k, v in training.parts.items() if k.startswith("DiT weights"))
    per_block = counts.block_fp8_params + 4 * counts.block_fp8_rows + 2 * (6_291_456 + 512)
    other = counts.other_fp8_params + 4 * counts.other_fp8_rows + 2 * (counts.other_params - counts.other_fp8_params)
    assert weights == 28 * per_block + other


def test_lora_size_comes_from_the_network_plugin():
    dit = meta_dit(DiTConfig())
    prof = profile()
    assert network_parameter_count(prof, dit, create=create_network) == SD_SCRIPTS_LORA_16
    prof.network.dim = 8
    assert network_parameter_count(prof, dit, create=create_network) == 1_433_600 * 8


@pytest.mark.parametrize(
    "memory,batch,measured,tolerance",
    [
        ({}, 1, 18.26, 0.02),
        ({"gradient_checkpointing": True}, 1, 5.33, 0.02),
        ({"unsloth_offload_checkpointing": True}, 1, 5.17, 0.06),  # in-flight offloads are not modelled
        ({"gradient_checkpointing": True, "blocks_to_swap": 18}, 1, 3.00, 0.02),
        ({"gradient_checkpointing": True, "blocks_to_swap": 26}, 1, 1.96, 0.02),
        ({"fp8_base": True}, 1, 16.53, 0.02),
        ({}, 4, 60.21, 0.02),
        ({"gradient_checkpointing": True}, 4, 8.61, 0.02),
    ],
)
def test_predictions_match_our_step_on_the_h200(memory, batch, measured, tolerance):
    """bench/RESULTS.md: bench_train.py on an H200, 1024², rank 16 on sd-scripts' 280 modules, AdamW, bf16, cached
    latents and text; peak allocated GiB, weights included."""
    prof = profile(memory, dataset={"train_batch_size": batch})
    assert training_peak(prof) == pytest.approx(measured, rel=tolerance)


@pytest.mark.parametrize(
    "memory,sd_scripts",
    [({}, 18.4), ({"gradient_checkpointing": True}, 5.6), ({"unsloth_offload_checkpointing": True}, 5.3),
     ({"gradient_checkpointing": True, "blocks_to_swap": 18}, 3.2),
     ({"gradient_checkpointing": True, "blocks_to_swap": 26}, 2.2)],
)
def test_predictions_stay_below_the_sd_scripts_anchors(memory, sd_scripts):
    """ANCHORS.md: sd-scripts' peak at the same setting; ours must never need more."""
    assert training_peak(profile(memory)) < sd_scripts


@pytest.mark.parametrize(
    "optimizer,memory,measured",
    [
        ("AdamW8bit", {"gradient_checkpointing": True}, 12.94),
        ("AdamW", {"gradient_checkpointing": True, "blocks_to_swap": 18}, 10.80),
    ],
)
def test_sampling_peak_matches_the_real_size_runs_on_the_h200(optimizer, memory, measured):
    """bench/RESULTS.md: `bench/real_size_run.py` on an H200 (1024² previews, LoRA 16 on the default targets);
    the run's peak is the preview's VAE decode beside everything training keeps resident."""
    prof = profile(memory, network={"args": {}}, optimizer={"optimizer_type": optimizer},
                   sampling={"sample_prompts": "p.txt"})
    lora_params = network_parameter_count(prof, meta_dit(DiTConfig()), create=create_network)
    phases = plan(prof, DiTConfig(), lora_params=lora_params).phases
    assert next(ph for ph in phases if ph.name == "sampling").peak / GIB == pytest.approx(measured, rel=0.10)


def test_activations_grow_with_batch_and_resolution():
    base = training_peak(profile())
    assert training_peak(profile(dataset={"train_batch_size": 2})) > base
    assert training_peak(profile(dataset={"resolution": [768, 512]})) < base
    # Checkpointing trades activations for time: monotone in the expected order.
    unsloth = training_peak(profile({"unsloth_offload_checkpointing": True}))
    assert unsloth < training_peak(profile({"gradient_checkpointing": True})) < base


def test_uncached_models_stay_on_the_gpu_while_training():
    cached = training_peak(profile())
    uncached = training_peak(profile(caching={"cache_latents": False, "cache_text_encoder_outputs": False}))
    assert uncached > cached + 1.0  # Qwen3 (1.19 GB) and the VAE


def test_caches_on_disk_free_the_models_as_caches_in_memory_do():
    """The run frees the VAE and moves Qwen3 off the GPU after caching either way (caching_phase.py): a profile with
    only the *_to_disk keys (profiles/anima-lora-8gb.toml) trains in the same memory and has both caching phases."""
    on_disk = profile(caching={"cache_latents": False, "cache_text_encoder_outputs": False,
                               "cache_latents_to_disk": True, "cache_text_encoder_outputs_to_disk": True})
    assert training_peak(on_disk) == training_peak(profile())
    assert [ph.name for ph in plan(on_disk, DiTConfig(), lora_params=0).phases] == ["caching latents", "caching text", "training"]


def test_phases_follow_the_profile():
    names = [ph.name for ph in plan(profile(), DiTConfig(), lora_params=0).phases]
    assert names == ["caching latents", "caching text", "training"]
    prof = profile(
        caching={"cache_latents": False, "cache_text_encoder_outputs": False}, sampling={"sample_prompts": "p.txt"}
    )
    assert [ph.name for ph in plan(prof, DiTConfig(), lora_params=0).phases] == ["training", "sampling"]


def test_cheapest_settings_that_fit():
    big = plan(profile(), DiTConfig(), vram_gib=80, lora_params=SD_SCRIPTS_LORA_16)
    assert big.fits and big.cheapest_fits[0].settings == Settings()
    assert "(the profile's settings)" in format_plan(big)

    p = plan(profile(), DiTConfig(), vram_gib=8, lora_params=SD_SCRIPTS_LORA_16)
    assert p.fits is False
    assert p.cheapest_fits[0].settings == Settings("unsloth")
    assert all(f.peak <= p.usable for f in p.cheapest_fits)

    small = plan(profile(), DiTConfig(), vram_gib=3.5, lora_params=SD_SCRIPTS_LORA_16)
    best = small.cheapest_fits[0].settings
    assert best.checkpointing != "none" and (best.blocks_to_swap > 0 or best.fp8_base)

    assert plan(profile(), DiTConfig(), vram_gib=1, lora_params=SD_SCRIPTS_LORA_16).cheapest_fits == []
    assert "caching latents alone may need" in format_plan(small)


# bench/RESULTS.md, H200, 1024², batch 1: median s/step of each setting over the plain step's 0.2466 s.
H200_STEP_S = {"plain": 0.2466, "gc": 0.5032, "unsloth": 0.3373, "swap18": 0.4930, "swap26": 0.4343, "fp8": 0.2998}


@pytest.mark.parametrize(
    "settings,measured",
    [
        (Settings("gradient"), "gc"),
        (Settings("unsloth"), "unsloth"),
        (Settings(fp8_base=True), "fp8"),
        (Settings("gradient", blocks_to_swap=18), "swap18"),
    ],
)
def test_step_time_ratios_that_rank_settings_are_the_h200s(settings, measured):
    assert settings.relative_time(28) == pytest.approx(H200_STEP_S[measured] / H200_STEP_S["plain"], rel=0.03)


def test_swapped_blocks_cost_no_step_time_so_the_fewest_swapped_rank_first():
    # swap26 measured faster than gc (0.434 against 0.503 s, within the steps' spread): no penalty, never a bonus
    assert Settings("gradient", blocks_to_swap=26).relative_time(28) == Settings("gradient").relative_time(28)


def test_a_gpu_plan_names_the_step_path_and_suggests_compiled_blocks_only_when_turned_off():
    def notes(vram_gib, **model):
        return plan(profile(model=model), DiTConfig(), vram_gib=vram_gib, lora_params=SD_SCRIPTS_LORA_16).notes

    assert "step path: compiled blocks (the default on CUDA)" in notes(80)
    assert "step path: compiled blocks" in notes(80, compile_blocks=True)
    assert "step path: compiled blocks (the default on CUDA), replayed as CUDA graphs (model.cuda_graphs)" in notes(80, cuda_graphs=True)
    off = notes(80, compile_blocks=False)
    assert "step path: eager (model.compile_blocks = false)" in off
    assert any(n.startswith("model.compile_blocks (the default on CUDA) makes steps faster") for n in off)
    assert not any("compile_blocks" in note for note in notes(80))
    assert not any("step path" in note or "compile_blocks" in note for note in notes(None))  # no card, no claim


def test_overrides_name_only_what_changes():
    current = Settings("gradient")
    assert Settings("unsloth", 4).overrides(current) == [
        "memory.gradient_checkpointing=false",
        "memory.unsloth_offload_checkpointing=true",
        "memory.blocks_to_swap=4",
    ]
    assert current.overrides(current) == []


def test_tiny_config_plan_and_report():
    prof = profile(dataset={"resolution": 64})
    p = plan(prof, TINY_DIT, vram_gib=1, lora_params=1000)
    counts = model_counts(prof, TINY_DIT, lora_params=1000)
    assert counts.num_blocks == 4 and counts.width == 64
    training = next(ph for ph in p.phases if ph.name == "training")
    assert 0 < training.peak < 0.01 * GIB
    assert p.cheapest_fits[0].settings == Settings()
    text = format_plan(p)
    assert "training" in text and "in 1.0 GiB" in text
    # The caching phases use the released VAE and Qwen3 sizes, which do not come from the DiT config.
    assert "(estimate, not calibrated)" in text and "caching latents alone may need" in text


def test_report_on_the_2b_model_names_the_settings_to_use():
    text = format_plan(plan(profile(), DiTConfig(), vram_gib=8, lora_params=SD_SCRIPTS_LORA_16))
    assert "does NOT fit in 8.0 GiB" in text
    assert "--set memory.unsloth_offload_checkpointing=true" in text


def test_measured_peak_line_compares_with_the_training_prediction():
    p = plan(profile({"gradient_checkpointing": True}), DiTConfig(), lora_params=SD_SCRIPTS_LORA_16)
    predicted = next(ph for ph in p.phases if ph.name == "training").peak
    line = format_measured(p, int(predicted * 1.1))
    expected = f"peak GPU memory {predicted * 1.1 / GIB:.2f} GiB measured, {predicted / GIB:.2f} GiB predicted (+10%)"
    assert line == expected


def test_config_comes_from_the_file_header(tiny_model, tmp_path):
    assert dit_config_from_file(tiny_model.dit) == TINY_DIT
    with pytest.raises(ModelFileError, match="model.dit"):
        dit_config_from_file(tmp_path / "missing.safetensors")


def test_plan_of_several_processes_names_the_global_batch():
    p = profile(training=dict(mixed_precision="bf16", full_bf16=False, num_processes=4, gradient_accumulation_steps=2))
    text = format_plan(plan(p, DiTConfig(), lora_params=SD_SCRIPTS_LORA_16))
    assert "each of the 4 processes trains batch 1; the global batch is 1 × 4 processes × 2 accumulation steps = 8" in text
