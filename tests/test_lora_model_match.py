"""A LoRA and its model (issue 31, part 3): a LoRA made for one DiT (Anima 2B, 28 blocks) used on another (Anima
2.9B, 40 blocks, the same width, so every 2B key also names a 2.9B layer) is named as such by `validate`, refused by
`run` (unless network.allow_other_model) and by `sample --lora` (unless --allow-other-model), and shown by
`lora-info`. The tiny models here have the two releases' block counts at the tiny width."""

from __future__ import annotations

import json

import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import tomli_w
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from training_helpers import make_run, tiny_profile_data, write_images

from anima_core.cli import main
from anima_core.config.schema import Profile
from anima_core.models.dit import DiTConfig
from anima_core.models.dit_loading import describe_dit, load_dit
from anima_core.models.tiny import TINY_DIT, make_tiny_model, write_random_dit
from anima_core.training import trainer as trainer_module
from anima_core.training.planner import GIB, Settings, plan
from anima_plugins.lora.model_match import (
    DIFFERENT,
    SAME,
    UNKNOWN,
    block_ranges,
    match_lora,
    read_lora_model,
    reached_blocks,
)

ANIMA_2B = DiTConfig()
ANIMA_29B = replace(ANIMA_2B, num_blocks=40)
FAST = "--w 64 --h 64 --s 1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny set whose DiT has 28 blocks (2B-shaped) and a second DiT file of 40 blocks (2.9B-shaped)."""
    root = tmp_path_factory.mktemp("match")
    paths = make_tiny_model(root)
    write_random_dit(paths.dit, config=replace(TINY_DIT, num_blocks=28))
    dit40 = write_random_dit(root / "dit40.safetensors", config=replace(TINY_DIT, num_blocks=40), seed=1)
    return paths, dit40


@pytest.fixture(scope="module")
def lora28(models, tmp_path_factory):
    """A LoRA trained (one step, the real run) on the 28-block DiT: its metadata names that model."""
    paths, _ = models
    result = make_run(tmp_path_factory.mktemp("lora28"), paths, training={"max_train_steps": 1}).run()
    assert result.status == "finished"
    return result.lora_path


def hand_made_lora(path, blocks, metadata=None, prefix="lora_unet_blocks_{}_self_attn_q_proj", width=8):
    tensors = {}
    for b in blocks:
        key = prefix.format(b)
        tensors |= {f"{key}.lora_down.weight": torch.zeros(2, width), f"{key}.lora_up.weight": torch.zeros(width, 2),
                    f"{key}.alpha": torch.tensor(2.0)}
    save_file(tensors, path, metadata=metadata)
    return path


def release_metadata(config: DiTConfig) -> dict[str, str]:
    return {"anima_dit": describe_dit(config), "anima_dit_blocks": str(config.num_blocks)}


def profile_file(root, paths, dit, weights, **network) -> str:
    write_images(root / "data")
    data = tiny_profile_data(root, paths, training={"max_train_steps": 1})
    data["model"]["dit"] = str(dit)
    data["network"].update(weights=str(weights), **network)
    (root / "p.toml").write_text(tomli_w.dumps(data))
    return str(root / "p.toml")


def problems_of(err: str) -> list[str]:
    return [line.strip()[2:] for line in err.splitlines() if line.strip().startswith("- ")]


# ---- the comparison --------------------------------------------------------------------------------------------

def test_a_2b_shaped_lora_on_a_29b_shaped_dit_names_both_models_and_the_blocks(models, lora28):
    paths, dit40 = models
    model = read_lora_model(lora28)
    assert model.recorded == "DiT of 28 blocks, width 64" and model.recorded_blocks == 28
    assert model.reached == tuple(range(28))
    match = match_lora(lora28, load_dit(dit40, device="meta"))  # the meta-device load validate uses
    assert match.verdict == DIFFERENT and match.missing == ()
    assert match.message == (
        f"{lora28.name} was made for DiT of 28 blocks, width 64, but this DiT is DiT of 40 blocks, width 64; its keys "
        "reach block(s) 0-27, which this DiT has too, but a block of the same number in another model is not the "
        "layer the LoRA was trained on; this DiT's block(s) 28-39 are not in its model.")
    same = match_lora(lora28, load_dit(paths.dit, device="meta"))
    assert same.verdict == SAME
    assert same.message == f"{lora28.name} was made for DiT of 28 blocks, width 64, the model of this DiT; its keys reach block(s) 0-27."


def test_the_releases_are_named_and_blocks_a_dit_lacks_are_listed(tmp_path):
    lora_2b = hand_made_lora(tmp_path / "2b.safetensors", range(28), release_metadata(ANIMA_2B))
    lora_29b = hand_made_lora(tmp_path / "29b.safetensors", range(40), release_metadata(ANIMA_29B))
    on_29b = match_lora(lora_2b, ANIMA_29B)
    assert on_29b.verdict == DIFFERENT
    assert "made for Anima 2B (28 blocks, width 2048), but this DiT is Anima 2.9B (40 blocks, width 2048)" in on_29b.message
    on_2b = match_lora(lora_29b, ANIMA_2B)
    assert on_2b.verdict == DIFFERENT and on_2b.missing == tuple(range(28, 40))
    assert on_2b.message.endswith("its keys reach block(s) 0-39; block(s) 28-39 do not exist on this DiT.")
    assert match_lora(lora_29b, ANIMA_29B).verdict == SAME
    # A LoRA on some blocks of 2.9B is still a 2.9B LoRA on the 2B model, though all its blocks exist there.
    partial = hand_made_lora(tmp_path / "part.safetensors", [0, 1, 2, 10], release_metadata(ANIMA_29B))
    assert match_lora(partial, ANIMA_2B).verdict == DIFFERENT
    # The same block count at another width is another model too.
    assert match_lora(lora_2b, replace(ANIMA_2B, model_channels=1280, num_heads=20)).verdict == DIFFERENT


def test_without_metadata_the_keys_alone_judge(tmp_path):
    shallow = hand_made_lora(tmp_path / "shallow.safetensors", range(28))
    deep = hand_made_lora(tmp_path / "deep.safetensors", range(40), prefix="diffusion_model.blocks.{}.self_attn.q_proj")
    unknown = match_lora(shallow, ANIMA_29B)
    assert unknown.verdict == UNKNOWN
    assert "does not record its model" in unknown.message and "all of which this DiT (Anima 2.9B" in unknown.message
    assert "probably made for Anima 2B" in unknown.message
    assert match_lora(shallow, ANIMA_2B).verdict == UNKNOWN and "probably" not in match_lora(shallow, ANIMA_2B).message
    beyond = match_lora(deep, ANIMA_2B)  # ComfyUI's key form counts the same
    assert beyond.verdict == DIFFERENT and beyond.missing == tuple(range(28, 40))
    assert "made for a model of at least 40 blocks (Anima 2.9B)" in beyond.message
    # Adapter blocks and text-encoder modules are not DiT blocks.
    assert reached_blocks(["lora_unet_llm_adapter_blocks_3_mlp_0.lora_down.weight",
                           "text_encoders.qwen3_06b.transformer.model.layers.30.mlp.up_proj.lora_A.weight",
                           "lora_unet_blocks_7_mlp_layer1.lora_down.weight"]) == (7,)
    assert block_ranges([39, 0, 1, 2, 3, 4, 5, 10, 20, 21]) == "0-5, 10, 20-21, 39"


# ---- validate and run --------------------------------------------------------------------------------------------

def test_validate_names_the_mismatch_and_run_refuses_before_caching(models, lora28, tmp_path, capsys, monkeypatch):
    paths, dit40 = models
    profile = profile_file(tmp_path, paths, dit40, lora28)
    assert main(["validate", profile, "--no-scan"]) == 2
    (problem,) = [p for p in problems_of(capsys.readouterr().err) if p.startswith("network.weights:")]
    assert "made for DiT of 28 blocks, width 64, but this DiT is DiT of 40 blocks, width 64" in problem
    assert "block(s) 0-27" in problem and "network.allow_other_model = true" in problem

    def no_trainer(*args, **kwargs):
        raise AssertionError("the run got past preflight: a Trainer was built")

    monkeypatch.setattr(trainer_module.Trainer, "__init__", no_trainer)
    assert main(["run", profile]) == 2
    err = capsys.readouterr().err
    assert "network.weights:" in err and "DiT of 40 blocks, width 64" in err
    assert not (tmp_path / "out").exists()  # no run directory, nothing cached


def test_run_continues_on_another_model_when_the_profile_allows_it(models, lora28, tmp_path, capsys):
    paths, dit40 = models
    profile = profile_file(tmp_path, paths, dit40, lora28, allow_other_model=True)
    # Allowed, but the default network selects all 40 blocks and the file has 28: said before caching, with the fix.
    assert main(["validate", profile, "--no-scan"]) == 2
    (problem,) = [p for p in problems_of(capsys.readouterr().err) if p.startswith("network.weights:")]
    assert "selects block(s) 0-39" in problem and 'network.args.train_block_indices = "0-27"' in problem
    # Another seed than the file's run: a fresh start would draw other down-projections.
    assert main(["run", profile, "--set", 'network.args={train_block_indices = "0-27"}', "--set", "training.seed=8"]) == 0
    err = capsys.readouterr().err
    assert "warning: network.weights:" in err and "Continued on this DiT anyway" in err
    (events,) = (tmp_path / "out" / "runs").glob("*/events.jsonl")  # the TUI sees it too
    warnings = [json.loads(line)["message"] for line in events.read_text().splitlines() if '"warning"' in line]
    assert any(w.startswith("network.weights:") and "Continued on this DiT anyway" in w for w in warnings)
    (lora,) = (tmp_path / "out").glob("lora.safetensors")
    with safe_open(str(lora), framework="pt") as f:
        assert f.metadata()["anima_dit"] == "DiT of 40 blocks, width 64"
        assert reached_blocks(f.keys()) == tuple(range(28))
        continued = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(lora28), framework="pt") as f:
        start = {k: f.get_tensor(k) for k in f.keys()}
    assert continued.keys() == start.keys()
    for key in start:  # one step of AdamW at 1e-3 from the file's weights (down-projections are ~0.1 in size)
        assert (continued[key].float() - start[key].float()).abs().max() < 3e-3, key
    assert max(start[k].abs().max() for k in start if k.endswith("lora_down.weight")) > 0.05


def test_the_same_model_is_continued_without_a_word(models, lora28, tmp_path, capsys):
    paths, _ = models
    assert main(["validate", profile_file(tmp_path, paths, paths.dit, lora28), "--no-scan"]) == 0
    assert "network.weights" not in capsys.readouterr().err


def test_a_lora_that_does_not_record_its_model_is_continued_with_a_warning(models, tmp_path, capsys):
    paths, _ = models
    sd_scripts_like = hand_made_lora(tmp_path / "no_metadata.safetensors", range(28), width=64)
    assert main(["validate", profile_file(tmp_path, paths, paths.dit, sd_scripts_like), "--no-scan"]) == 0
    err = capsys.readouterr().err
    assert "warning: network.weights: no_metadata.safetensors does not record its model" in err
    assert "Make sure it was made for this DiT." in err


# ---- lora-info and sample --lora ---------------------------------------------------------------------------------

def test_lora_info_prints_the_model_and_with_dit_whether_it_fits(models, lora28, tmp_path, capsys):
    paths, dit40 = models
    assert main(["lora-info", str(lora28)]) == 0
    out = capsys.readouterr().out
    assert "made for: DiT of 28 blocks, width 64" in out and "DiT blocks reached: 0-27" in out
    assert "this DiT:" not in out
    assert main(["lora-info", str(lora28), "--dit", str(dit40)]) == 0
    out = capsys.readouterr().out
    assert "this DiT: DiT of 40 blocks, width 64: NOT the model this LoRA was made for" in out
    assert "this DiT's block(s) 28-39 are not in its model" in out
    assert main(["lora-info", str(lora28), "--dit", str(paths.dit)]) == 0
    assert "this DiT: DiT of 28 blocks, width 64: the model this LoRA was made for" in capsys.readouterr().out
    # LyCORIS files say it too.
    full = tmp_path / "full.safetensors"
    save_file({f"lora_unet_blocks_{b}_self_attn_q_proj.diff": torch.zeros(64, 64) for b in (0, 39)}, full,
              metadata=release_metadata(ANIMA_29B))
    assert main(["lora-info", str(full), "--dit", str(paths.dit)]) == 0
    out = capsys.readouterr().out
    assert "LyCORIS modules" in out and "made for: Anima 2.9B (40 blocks, width 2048)" in out
    assert "DiT blocks reached: 0, 39" in out and "block(s) 39 do not exist on this DiT" in out


def test_sample_refuses_a_lora_of_another_model_unless_told(models, lora28, tmp_path, capsys, monkeypatch):
    paths, dit40 = models
    base = ["sample", "--dit", str(dit40), "--qwen3", str(paths.qwen3), "--vae", str(paths.vae), "--device", "cpu",
            "--prompt", f"a cat {FAST} --d 3", "--lora", str(lora28)]
    import anima_core.models as models_package

    real_text_encoder = models_package.load_text_encoder

    def refused_first(*args, **kwargs):
        raise AssertionError("the models were loaded before the LoRA was checked")

    monkeypatch.setattr(models_package, "load_text_encoder", refused_first)
    assert main([*base, "-o", str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err
    assert "made for DiT of 28 blocks, width 64, but this DiT is DiT of 40 blocks, width 64" in err
    assert "--allow-other-model" in err and not (tmp_path / "no.png").exists()
    monkeypatch.setattr(models_package, "load_text_encoder", real_text_encoder)

    assert main([*base, "--allow-other-model", "-o", str(tmp_path / "yes.png")]) == 0
    assert "warning: --lora" in capsys.readouterr().err and Image.open(tmp_path / "yes.png").size == (64, 64)
    # Keys on blocks this DiT lacks cannot be applied, whatever the flag says.
    deep = hand_made_lora(tmp_path / "deep.safetensors", range(40), width=64)
    assert main(["sample", "--dit", str(paths.dit), "--qwen3", str(paths.qwen3), "--vae", str(paths.vae),
                 "--device", "cpu", "--prompt", f"a cat {FAST}", "--lora", str(deep), "--allow-other-model",
                 "-o", str(tmp_path / "deep.png")]) == 2
    assert "block(s) 28-39 do not exist on this DiT" in capsys.readouterr().err


def test_the_tui_editor_offers_the_key_from_the_schema():
    from anima_tui.profile_draft import field_specs

    (spec,) = [s for s in field_specs("network") if s.name == "allow_other_model"]
    assert spec.kind == "bool" and spec.default is False and "network.weights" in spec.help


# ---- the low-memory 2.9B profile ---------------------------------------------------------------------------------

LOW_MEMORY_29B = Path(__file__).resolve().parents[1] / "profiles" / "anima-2.9b-lora-low-memory.toml"
PLAN_ROW = re.compile(r"#\s+(\d+) GiB\s+(.+?)\s+([\d.]+) GiB\s+(.+?)\s+([\d.]+) GiB\s*$")


def test_the_low_memory_29b_profile_states_what_plan_recommends_per_card():
    """The profile's table is plan's answer on a 2.9B-shaped (meta) DiT for 8, 12, 16 and 24 GiB, with and without
    previews, and the profile as written is the 8 GiB answer: a planner change that moves them fails here."""
    text = LOW_MEMORY_29B.read_text()
    rows = [PLAN_ROW.match(line) for line in text.splitlines()]
    rows = {int(m.group(1)): m.groups()[1:] for m in rows if m}
    assert sorted(rows) == [8, 12, 16, 24]
    data = tomllib.loads(text)
    profile = Profile.model_validate(data)
    with_previews = Profile.model_validate({**data, "sampling": {"sample_prompts": "prompts.txt"}})
    for vram, (settings, peak, settings_previews, peak_previews) in rows.items():
        for prof, expected, expected_peak in ((profile, settings, peak), (with_previews, settings_previews, peak_previews)):
            best = plan(prof, ANIMA_29B, vram_gib=vram).cheapest_fits[0]
            assert (best.settings.describe(), f"{best.peak / GIB:.2f}") == (expected, expected_peak), vram
    assert plan(profile, ANIMA_29B, vram_gib=8).cheapest_fits[0].settings == Settings.from_profile(profile)
    assert "--set memory.unsloth_offload_checkpointing=false --set memory.blocks_to_swap=21" in text
    assert " ".join(f"--set {o}" for o in plan(profile, ANIMA_29B, vram_gib=24).cheapest_fits[0].settings.overrides(
        Settings.from_profile(profile))) in text
