"""Slider LoRAs (Concept Sliders): the targets are the base model's velocities combined as
v(neutral) ± η·(v(positive) − v(negative)) (anima_core/training/slider.py), the LoRA is trained at +1 toward one
and at -1 toward the other, and a trained slider's ±1 outputs move the other way from the base each.

Hand computations use a second DiT loaded from the same file with no LoRA on it, one prompt at a time, so the
network at multiplier 0, the stacking of the prompts and the η of each pair are all checked against it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from training_helpers import read_events, tiny_profile_data

from anima_core.config import profile_from_dict
from anima_core.config.schema import SliderTable
from anima_core.data.slider_data import build_slider_data
from anima_core.errors import AnimaError, ProfileError
from anima_core.models import load_dit, load_text_encoder
from anima_core.plugins import build_plugins
from anima_core.training.executors import EagerStep
from anima_core.training.network import applied_at
from anima_core.training.slider import (base_targets, draws, noised_state, slider_inputs, slider_micro_step,
                                        slider_targets)
from anima_core.training.step import sample_generators
from anima_core.training.trainer import Trainer
from anima_plugins.memory import BlockSwap, GradientCheckpointing

PAIRS = [
    {"target": "1girl, portrait", "positive": "1girl, portrait, old wrinkled grandmother",
     "negative": "1girl, portrait, tiny baby toddler"},
    {"target": "1boy", "neutral": "1boy, standing", "positive": "1boy, red", "negative": "", "guidance_scale": 3.0,
     "weight": 0.25},
]
TOKENS = 16  # the tiny profile's qwen3/t5 max token length


def slider_data_dict(root: Path, tiny_model, **slider) -> dict:
    data = tiny_profile_data(root, tiny_model)
    data["dataset"] = {"train_batch_size": 2}
    data["slider"] = {"pairs": PAIRS, "guidance_scale": 2.0, "resolution": [64, 32], **slider}
    return data


def slider_profile(root: Path, tiny_model, **slider):
    return profile_from_dict(slider_data_dict(root, tiny_model, **slider), plugins=build_plugins(entry_points=False))


def build_models(tiny_model, *, checkpointing: bool = False, blocks_to_swap: int = 0):
    """The DiT that gets the LoRA (random, non-zero adapters, so multiplier 0 and ±1 all differ; its blocks
    recomputed in backward with ``checkpointing``, 2 of its 4 blocks swapped with ``blocks_to_swap``), a second
    copy with none, and the text encoder."""
    dit = load_dit(tiny_model.dit, dtype=torch.float32).requires_grad_(False)
    if blocks_to_swap:
        BlockSwap(SimpleNamespace(memory=SimpleNamespace(blocks_to_swap=blocks_to_swap))).apply(dit, device="cpu")
    if checkpointing:
        GradientCheckpointing(SimpleNamespace()).apply(dit, device="cpu")
    base = load_dit(tiny_model.dit, dtype=torch.float32).requires_grad_(False)
    te = load_text_encoder(tiny_model.qwen3, t5_tokenizer_path=tiny_model.t5_tokenizer, dtype=torch.float32)
    plugins = build_plugins(entry_points=False)
    cfg = SimpleNamespace(dim=4, alpha=4.0, dropout=None, args={}, weights=None)
    network = plugins.registry("register_networks").get("lora_anima")(cfg, dit=dit, text_encoder=None,
                                                                      train_text_encoder=False)
    network.apply_to()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return SimpleNamespace(dit=dit, base=base, te=te, network=network, plugins=plugins, checkpointing=checkpointing)


@pytest.fixture(scope="module")
def models(tiny_model):
    return build_models(tiny_model)


@pytest.fixture(scope="module")
def checkpointed(tiny_model):
    return build_models(tiny_model, checkpointing=True)


@pytest.fixture(scope="module")
def swapped(tiny_model):
    return build_models(tiny_model, checkpointing=True, blocks_to_swap=2)


def encoded(te, prompt: str):
    return te.encode([prompt], TOKENS, TOKENS)


def base_velocity(models, x, sigma, prompt):
    """The LoRA-free DiT on one sample and one prompt."""
    q, qm, ids, m = encoded(models.te, prompt)
    with torch.no_grad():
        return models.base(x.unsqueeze(0).unsqueeze(2), sigma.view(1), q, target_input_ids=ids,
                           target_attention_mask=m, source_attention_mask=qm).squeeze(2)[0]


def lora_velocity(models, x, sigma, prompt, strength=None):
    """The DiT with the LoRA, at ``strength`` (None: at whatever multiplier is set)."""
    q, qm, ids, m = encoded(models.te, prompt)
    with applied_at(models.network, strength) if strength is not None else contextlib.nullcontext():
        return models.dit(x.unsqueeze(0).unsqueeze(2), sigma.view(1), q, target_input_ids=ids,
                          target_attention_mask=m, source_attention_mask=qm).squeeze(2)[0]


def test_the_target_arithmetic_on_plain_numbers():
    neutral, positive, negative = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]), torch.tensor([2.0, 1.0])
    plus, minus = slider_targets(neutral, positive, negative, torch.tensor([2.0, 4.0]))
    # v_n ± η (v_p − v_m): 1 ± 2·1 and −2 ± 4·(−0.5)
    assert plus.tolist() == [3.0, -4.0] and minus.tolist() == [-1.0, 0.0]


def test_targets_are_the_base_models_velocities_combined_as_by_hand(tmp_path, tiny_model, models):
    """Pair 0 takes slider.guidance_scale (2) and its target as neutral, pair 1 its own η (3) and neutral."""
    profile = slider_profile(tmp_path, tiny_model)
    data = build_slider_data(profile)
    data.cache_text(models.te, qwen_max_length=TOKENS, t5_max_length=TOKENS)
    inputs = slider_inputs(data.batch([0, 1]), "cpu")
    sampler = models.plugins.registry("register_timestep_samplers").get(profile.training.timestep_sampling)
    sigmas, noise, x0 = draws(inputs, sampler=sampler, cfg=profile.training, generators=sample_generators(7, 0, [0, 1]))
    assert x0.shape == (2, 16, 4, 8)  # slider.resolution [64, 32]: width 64, height 32, latents /8
    at = functools.partial(applied_at, models.network)
    x = noised_state(models.dit, at, inputs, sigmas, noise, x0, denoise_steps=0)
    torch.testing.assert_close(x, (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise)
    plus, minus = base_targets(models.dit, at, inputs, x, sigmas)
    for i, (eta, neutral) in enumerate([(2.0, PAIRS[0]["target"]), (3.0, PAIRS[1]["neutral"])]):
        v_n = base_velocity(models, x[i], sigmas[i], neutral)
        d = base_velocity(models, x[i], sigmas[i], PAIRS[i]["positive"]) - base_velocity(
            models, x[i], sigmas[i], PAIRS[i]["negative"])
        assert d.norm() > 1e-3 * v_n.norm()
        torch.testing.assert_close(plus[i], v_n + eta * d, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(minus[i], v_n - eta * d, rtol=1e-5, atol=1e-5)
    # the LoRA was off for them (it is not for the same call at 1), and it is back at 1 after
    assert (lora_velocity(models, x[0], sigmas[0], neutral, 1.0) - base_velocity(models, x[0], sigmas[0], neutral)
            ).norm() > 1e-2
    assert {m.multiplier for m in models.network.loras.values()} == {1.0}


def hand_state(models, prompt, sigma, noise, steps):
    """``steps`` Euler steps of the LoRA-free DiT from the noise at σ = 1 down to σ."""
    x = noise
    for i in range(steps):
        s, s_next = 1 - (1 - sigma) * i / steps, 1 - (1 - sigma) * (i + 1) / steps
        x = x + (s_next - s) * base_velocity(models, x, s, prompt)
    return x


@pytest.mark.parametrize("denoise_steps", [0, 2])
def test_the_step_trains_plus_one_toward_v_plus_and_minus_one_toward_v_minus(tmp_path, tiny_model, models,
                                                                             denoise_steps):
    """slider_micro_step's loss and LoRA gradients equal the hand-made loss: the pair-weighted mean over the
    samples of MSE(LoRA at +1 on the target, v₊) and MSE(LoRA at -1, v₋), halved, with x_σ from random latents
    or from ``slider.denoise_steps`` Euler steps of the base model on the target prompt."""
    check_step_by_hand(tmp_path, tiny_model, models, denoise_steps)


def test_with_gradient_checkpointing_backward_recomputes_each_pass_at_its_strength(tmp_path, tiny_model, checkpointed):
    """The blocks run again in backward: the -1 pass's gradients are still those of the LoRA at -1."""
    check_step_by_hand(tmp_path, tiny_model, checkpointed, 0)


def test_with_block_swap_the_base_forwards_and_both_passes_keep_the_layout(tmp_path, tiny_model, swapped):
    """Block swap (2 of 4 blocks, with checkpointing): the forwards without grad slide their window, the trained
    passes swap in forward and backward; the step still gives the hand-made loss and gradients, twice in a row."""
    check_step_by_hand(tmp_path, tiny_model, swapped, 2)
    check_step_by_hand(tmp_path, tiny_model, swapped, 0)


def check_step_by_hand(tmp_path, tiny_model, models, denoise_steps):
    profile = slider_profile(tmp_path, tiny_model, denoise_steps=denoise_steps)
    data = build_slider_data(profile)
    data.cache_text(models.te, qwen_max_length=TOKENS, t5_max_length=TOKENS)
    batch = data.batch([1, 0], positions=[0, 1])
    network = models.network
    sampler = models.plugins.registry("register_timestep_samplers").get(profile.training.timestep_sampling)
    trainer = SimpleNamespace(
        profile=profile, device=torch.device("cpu"), dit=models.dit, sampler=sampler, weighting=torch.ones_like,
        target=SimpleNamespace(module=network, batch_multiplier=functools.partial(applied_at, network)),
        accelerator=SimpleNamespace(autocast=contextlib.nullcontext, backward=lambda loss: loss.backward()),
        executor=EagerStep("test"), params=network.trainable_parameters(), checkpointing=models.checkpointing,
        tflop_done=0.0, plugins=models.plugins)
    for p in trainer.params:
        p.grad = None
    loss, drawn = slider_micro_step(trainer, batch, step=3, micro=0, first_place=0, planned=2)
    grads = [p.grad.clone() for p in trainer.params]
    assert trainer.tflop_done > 0 and [label for label, _ in drawn] == batch.labels

    generators = sample_generators(profile.training.seed, 3, [0, 1])
    h, w = 4, 8
    total = 0.0
    for p in trainer.params:
        p.grad = None
    for i, (pair, g) in enumerate(zip([PAIRS[1], PAIRS[0]], generators)):
        sigma = sampler(1, profile.training, g, (h, w)).float().reshape(())
        noise, x0 = torch.randn((16, h, w), generator=g), torch.randn((16, h, w), generator=g)
        assert abs(drawn[i][1] - float(sigma)) < 1e-6
        x = (1 - sigma) * x0 + sigma * noise if denoise_steps == 0 else hand_state(
            models, pair["target"], sigma, noise, denoise_steps)
        v_n = base_velocity(models, x, sigma, pair.get("neutral", pair["target"]))
        d = base_velocity(models, x, sigma, pair["positive"]) - base_velocity(models, x, sigma, pair["negative"])
        eta, weight = pair.get("guidance_scale", 2.0), pair.get("weight", 1.0)
        for strength, target in [(1.0, v_n + eta * d), (-1.0, v_n - eta * d)]:
            with applied_at(models.network, strength):  # backward too: checkpointing recomputes the forward
                pred = lora_velocity(models, x, sigma, pair["target"])
                part = weight * ((pred - target) ** 2).mean() / 2 / 2  # half per direction, mean over 2 samples
                part.backward()
            total += float(part.detach())
    assert float(loss) == pytest.approx(total, rel=1e-5)
    for mine, hand in zip(grads, (p.grad for p in trainer.params)):
        torch.testing.assert_close(mine, hand, rtol=1e-4, atol=1e-7)


# ---- a tiny slider trained end to end ---------------------------------------------------------------------

PROMPT_FILE = "1girl, portrait --w 64 --h 64 --s 3 --d 11\n1boy --w 64 --h 64 --s 3\n"
STRENGTHS = [-1.0, 0.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("slider_run")
    (root / "prompts.txt").write_text(PROMPT_FILE)
    data = slider_data_dict(root, tiny_model, guidance_scale=20.0, preview_strengths=STRENGTHS)
    data["training"]["max_train_steps"] = 24
    data["optimizer"] = {"learning_rate": 3e-3}
    data["sampling"] = {"sample_prompts": str(root / "prompts.txt"), "sample_every_n_steps": 12}
    plugins = build_plugins(entry_points=False)
    profile = profile_from_dict(data, plugins=plugins)
    result = Trainer(profile, plugins).run()
    assert result.status == "finished"
    return SimpleNamespace(root=root, result=result, profile=profile)


def test_a_trained_slider_moves_plus_and_minus_one_in_opposite_directions(trained, tiny_model, models):
    """On states it never saw, (out(+1) − base) points along v(positive) − v(negative) and (out(−1) − base)
    against it, for both pairs."""
    plugins = build_plugins(entry_points=False)
    dit = load_dit(tiny_model.dit, dtype=torch.float32).requires_grad_(False)
    network = plugins.registry("register_networks").get("lora_anima")(trained.profile.network, dit=dit,
                                                                      text_encoder=None, train_text_encoder=False)
    network.apply_to()
    network.load_weights(trained.result.lora_path)
    slider = SimpleNamespace(dit=dit, network=network, te=models.te, base=models.base)
    generator = torch.Generator().manual_seed(123)
    for pair in PAIRS:
        plus_along, minus_along = [], []
        for sigma in (0.3, 0.5, 0.7, 0.9):
            sigma = torch.tensor(sigma)
            x = (1 - sigma) * torch.randn((16, 4, 8), generator=generator) + sigma * torch.randn((16, 4, 8),
                                                                                             generator=generator)
            base = base_velocity(models, x, sigma, pair["target"])
            d = base_velocity(models, x, sigma, pair["positive"]) - base_velocity(models, x, sigma, pair["negative"])
            with torch.no_grad():
                plus_along.append(float(((lora_velocity(slider, x, sigma, pair["target"], 1.0) - base) * d).sum()))
                minus_along.append(float(((lora_velocity(slider, x, sigma, pair["target"], -1.0) - base) * d).sum()))
        assert all(p > 0 for p in plus_along), plus_along
        assert all(m < 0 for m in minus_along), minus_along


def test_the_run_reports_its_pairs_and_the_file_records_them(trained):
    events = read_events(trained.result.run_dir)
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any(m.startswith("slider: 2 prompt pair(s) at 64x32, batch 2") for m in logs)
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 24 and all(loss > 0 for loss in losses)
    with safe_open(str(trained.result.lora_path), "pt") as f:
        recorded = json.loads(f.metadata()["anima_slider"])
    assert recorded["resolution"] == [64, 32]
    assert [p["guidance_scale"] for p in recorded["pairs"]] == [20.0, 3.0]
    assert recorded["pairs"][1]["neutral"] == "1boy, standing" and recorded["pairs"][1]["weight"] == 0.25


def test_previews_render_each_prompt_at_every_strength_with_one_seed(trained, tiny_model, models):
    """Every prompt at each of slider.preview_strengths, saved one by one and side by side (the `sample`
    event's image), the render's sheet prompts down and strengths across; strength 0 is the base model."""
    from anima_core.sampling.prompts import SamplePrompt
    from anima_core.sampling.sampler import TextConditioning, render_prompt
    from anima_core.models import load_vae

    samples = trained.result.run_dir / "samples"
    events = [e for e in read_events(trained.result.run_dir) if e["type"] == "sample"]
    assert [(e["step"], Path(e["path"]).name) for e in events] == [
        (12, "lora_000012_00_11.png"), (12, "lora_000012_01_8.png"), (24, "lora_000024_00_11.png"),
        (24, "lora_000024_01_8.png")]  # unseeded prompt 1: the training seed 7 + its index
    images = {m: Image.open(samples / f"lora_000024_00_11_strength{m:+g}.png") for m in STRENGTHS}
    pixels = {m: torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)) for m, img in images.items()}
    for a, b in [(-1.0, 0.0), (0.0, 1.0), (1.0, 2.0)]:
        assert (pixels[a] - pixels[b]).abs().mean() > 0.5, (a, b)
    side_by_side = Image.open(samples / "lora_000024_00_11.png")
    assert side_by_side.width >= 4 * 64 and side_by_side.height > 64
    sheet = Image.open(samples / "lora_000024_sheet.png")
    assert sheet.width > 4 * 256 and 2 * 256 < sheet.height < 3 * 256  # 4 strengths across, 2 prompts down

    # strength 0 renders what the DiT without a LoRA renders
    vae = load_vae(tiny_model.vae, dtype=torch.float32)

    def encode(text):
        return TextConditioning(*encoded(models.te, text))

    prompt = SamplePrompt("1girl, portrait", width=64, height=64, sample_steps=3, seed=11)
    base_image = render_prompt(models.base, vae, encode, prompt, seed=11, device=torch.device("cpu"))
    base_pixels = torch.from_numpy(np.asarray(base_image.convert("RGB"), dtype=np.float32))
    assert (base_pixels - pixels[0.0]).abs().max() <= 1


def test_the_tui_gallery_shows_the_sliders_previews_and_sheet(trained, monkeypatch):
    from anima_tui.app import WatchApp
    from anima_tui.gallery import ViewerScreen
    from anima_tui.system_stats import SystemReading

    monkeypatch.setenv("ANIMA_TRAIN_IMAGES", "halfblock")
    run_dir = trained.result.run_dir
    sheet = Image.open(run_dir / "samples" / "lora_000024_sheet.png")

    async def settle(pilot):
        for _ in range(3):
            await pilot.pause()
            with contextlib.suppress(Exception):
                await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    async def check():
        app = WatchApp(run_dir, probe=lambda: SystemReading(ram_used=None, ram_total=None, gpus=[]))
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(pilot)
            await pilot.press("g")
            await settle(pilot)
            await pilot.press("end")
            await pilot.press("c")
            await settle(pilot)
            assert isinstance(app.screen, ViewerScreen)
            assert "contact sheet · step 24" in str(app.screen.query_one("#viewer-title").render())
            shown = app.screen.query_one("#large").loaded.image
            # the trainer's sheet (4 strengths × 2 prompts), not a row of the prompts' images made up by the TUI
            assert shown.width / shown.height == pytest.approx(sheet.width / sheet.height, rel=0.05)

    asyncio.run(check())


# ---- the profile section ------------------------------------------------------------------------------------

def test_slider_defaults():
    table = SliderTable()
    assert table.pairs == [] and table.guidance_scale == 1.0 and table.resolution == 1024
    assert table.denoise_steps == 0 and table.preview_strengths == [-1.0, 0.0, 1.0]


def test_a_bad_slider_section_is_reported_whole_naming_each_key(tmp_path, tiny_model):
    data = slider_data_dict(tmp_path, tiny_model, resolution=100, guidance_scale=-1.0, preview_strengths=[],
                            pairs=[{"target": "a", "negative": "b"},  # 0: no positive
                                   {"target": "a", "positive": "same", "negative": "same"},
                                   {"target": " ", "positive": "p", "negative": "n", "weight": -1},
                                   {"target": "a", "positive": "p", "negative": "n", "eta": 2}])
    data["dataset"].update(train_data_dir=str(tmp_path), validation_split=0.1)
    data["network"]["train_unet_only"] = False
    data["training"]["caption_dropout_rate"] = 0.1
    with pytest.raises(ProfileError) as caught:
        profile_from_dict(data, plugins=build_plugins(entry_points=False))
    problems = caught.value.problems
    expected = ["slider.pairs.0.positive: Field required", "slider.pairs.2.weight:", "slider.pairs.3.eta: unknown key",
                "slider.guidance_scale:", "slider.resolution: 100 must be multiples of 16",
                "slider.pairs.1: positive and negative are the same prompt", "slider.preview_strengths: empty",
                "dataset.train_data_dir: a slider trains from its prompt pairs", "dataset.validation_split:",
                "network.train_unet_only:", "training.caption_dropout_rate:"]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    # pair 2's target is reported by its own index though pairs 0 and 3 were dropped for their schema errors
    assert not any(p.startswith("slider.pairs.0.target") for p in problems)


def test_the_pruned_pairs_keep_their_indices_in_later_problems(tmp_path, tiny_model):
    data = slider_data_dict(tmp_path, tiny_model, pairs=[{"target": "a", "negative": "b"},
                                                        {"target": "", "positive": "p", "negative": "n"}])
    with pytest.raises(ProfileError) as caught:
        profile_from_dict(data, plugins=build_plugins(entry_points=False))
    assert any(p.startswith("slider.pairs.1.target: empty") for p in caught.value.problems), caught.value.problems


def test_slider_keys_without_pairs_and_full_fine_tuning_are_refused(tmp_path, tiny_model):
    data = slider_data_dict(tmp_path, tiny_model, pairs=[])
    data["dataset"] = {"train_data_dir": str(tmp_path)}
    with pytest.raises(ProfileError) as caught:
        profile_from_dict(data, plugins=build_plugins(entry_points=False))
    assert any(p.startswith("slider: sets guidance_scale, resolution but has no [[slider.pairs]]")
               for p in caught.value.problems), caught.value.problems
    data = slider_data_dict(tmp_path, tiny_model)
    data["network"] = {"module": "full"}
    with pytest.raises(ProfileError) as caught:
        profile_from_dict(data, plugins=build_plugins(entry_points=False))
    assert any(p.startswith("network.module: a slider trains the LoRA at strength +1 and -1")
               for p in caught.value.problems), caught.value.problems


def test_a_slider_profile_needs_no_dataset_and_validate_summarises_it(tmp_path, tiny_model):
    from anima_core.preflight import preflight

    profile = slider_profile(tmp_path, tiny_model)
    result = preflight(profile, build_plugins(entry_points=False), scan_images=True)
    assert not result.problems, result.problems
    assert result.summary[0].startswith("slider: 2 prompt pair(s) at 64x32, batch 2, 1 batch(es) per epoch, "
                                        "1 step(s) per epoch, 6 step(s) in all")


def test_batches_are_planned_globally_and_sliced_per_process(tmp_path, tiny_model, models):
    """Three pairs, batch 1 on 2 processes: global batches of 2; process 1 gets the second sample of each and
    an empty slice where the epoch's last global batch has one pair."""
    profile = slider_profile(tmp_path, tiny_model, pairs=PAIRS + [{"target": "x", "positive": "p", "negative": "n"}])
    profile.dataset.train_batch_size = 1
    parts = [build_slider_data(profile, SimpleNamespace(num_processes=2, index=i)) for i in range(2)]
    for part in parts:
        part.cache_text(models.te, qwen_max_length=TOKENS, t5_max_length=TOKENS)
    assert parts[0].num_batches_per_epoch == 2
    slices = [list(part.epoch_slices(0)) for part in parts]
    plan = parts[0]._plan(0)
    assert sorted(i for batch in plan for i in batch) == [0, 1, 2]
    for k, batch in enumerate(plan):
        assert slices[0][k][1].pairs == batch[:1] and slices[0][k][1].positions == [0]
        if len(batch) == 2:
            assert slices[1][k][1].pairs == batch[1:] and slices[1][k][1].positions == [1]
        else:
            assert slices[1][k][1] is None
    assert len({str(parts[0]._plan(epoch)) for epoch in range(8)}) > 1  # the order follows (seed, epoch)


def test_a_stopped_slider_resumes_to_the_same_lora(tmp_path, tiny_model):
    """Three pairs, batch 2: two batches an epoch; stopped after step 3 (mid-epoch 2) and resumed, the run ends
    with the LoRA of the run that never stopped."""
    from safetensors.torch import load_file

    from anima_core.hookspecs import hookimpl

    class StopAt:
        @hookimpl
        def register_event_sinks(self, register):
            def make(run_dir, profile):
                return lambda e: (run_dir / "control" / "stop").touch() if e["type"] == "step" and e["step"] == 3 else None

            register("stop_at_3", make)

    def run(name, *, stop=False, resume=None):
        data = slider_data_dict(tmp_path, tiny_model, pairs=PAIRS + [{"target": "x", "positive": "p", "negative": "n"}])
        data["training"]["max_train_steps"] = 5
        data["logging"]["run_name"] = name
        plugins = build_plugins(entry_points=False, extra=(StopAt(),) if stop else ())
        return Trainer(profile_from_dict(data, plugins=plugins), plugins, resume=resume).run()

    whole = load_file(run("whole").lora_path)
    stopped = run("stopped", stop=True)
    assert stopped.status == "stopped" and stopped.step == 3
    resumed = load_file(run("resumed", resume=str(stopped.run_dir)).lora_path)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_editor_shows_the_pairs_on_one_line_and_saves_an_edit(tmp_path):
    """The TUI editor's field for slider.pairs: the [[slider.pairs]] tables as one line of inline tables that
    reads back unchanged, and an edited line saved as the profile's pairs."""
    import shutil
    import tomllib

    from anima_tui.profile_draft import ProfileDraft, field_specs, parse, shown

    path = tmp_path / "slider.toml"
    shutil.copy(Path(__file__).parent.parent / "profiles" / "anima-slider.toml", path)
    draft = ProfileDraft.open(path)
    spec = next(s for s in field_specs("slider") if s.name == "pairs")
    text = shown(draft.value("slider", "pairs"), spec)
    assert "\n" not in text and text.startswith("[{target = ")
    assert not draft.set("slider", "pairs", parse(text, spec))  # what the field reports at first changes nothing
    assert draft.set("slider", "pairs", parse(text.replace("old woman", "elderly woman"), spec))
    draft.save()
    pairs = tomllib.loads(path.read_text())["slider"]["pairs"]
    assert pairs[0]["positive"] == "1girl, solo, portrait, elderly woman, wrinkles, grey hair" and len(pairs) == 2


def test_show_config_writes_the_pairs_and_reads_back_the_same_slider(tmp_path, tiny_model):
    """Unset keys of a pair (neutral, guidance_scale) are left out, as TOML has no null."""
    import tomllib

    from anima_core.config.show import profile_to_commented_toml

    profile = slider_profile(tmp_path, tiny_model)
    text = profile_to_commented_toml(profile)
    again = profile_from_dict(tomllib.loads(text), plugins=build_plugins(entry_points=False))
    assert again.slider == profile.slider
    assert "neutral" not in tomllib.loads(text)["slider"]["pairs"][0]


def test_two_processes_train_the_one_process_slider(tmp_path, tiny_model):
    """2 gloo processes × 1 pair train what 1 process × 2 pairs trains: each pair's draws come from its place in
    the global batch, and the gradients are summed (up to the order of the all-reduce's additions)."""
    import os
    import subprocess
    import sys

    import tomli_w
    from safetensors.torch import load_file

    def data_for(name, batch, processes):
        data = slider_data_dict(tmp_path, tiny_model, guidance_scale=10.0)
        data["dataset"]["train_batch_size"] = batch
        data["training"].update(max_train_steps=3, num_processes=processes, num_cpu_threads_per_process=1)
        data["logging"]["run_name"] = name
        data["saving"]["output_dir"] = str(tmp_path / name)
        return data

    path = tmp_path / "two.toml"
    path.write_text(tomli_w.dumps(data_for("two", 1, 2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "anima_core.cli", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    plugins = build_plugins(entry_points=False)
    one = Trainer(profile_from_dict(data_for("one", 2, 1), plugins=plugins), plugins).run()
    left, right = load_file(tmp_path / "two" / "lora.safetensors"), load_file(one.lora_path)
    difference = sum(float((left[k].double() - right[k].double()).pow(2).sum()) for k in right) ** 0.5
    size = sum(float(right[k].double().pow(2).sum()) for k in right) ** 0.5
    assert difference <= 1e-5 * size, difference / size


DORA = {"module": "lycoris", "dim": 4, "alpha": 4.0, "train_unet_only": True, "args": {"algo": "locon", "dora_wd": True}}


def test_a_network_that_is_not_the_base_model_at_zero_is_refused_by_validate_and_run(tmp_path, tiny_model):
    """LyCORIS's DoRA at multiplier 0 keeps W + ΔW's direction: the slider's targets would not be the base model's."""
    pytest.importorskip("lycoris")
    from anima_core.preflight import preflight

    data = slider_data_dict(tmp_path, tiny_model)
    data["network"] = DORA
    plugins = build_plugins(entry_points=False)
    profile = profile_from_dict(data, plugins=plugins)
    problems = preflight(profile, plugins, scan_images=True).problems
    assert any(p.startswith("network.args.dora_wd: a slider's targets are the network's predictions at multiplier 0")
               for p in problems), problems
    with pytest.raises(AnimaError, match="the slider cannot run: network.args.dora_wd"):
        Trainer(profile, plugins).run()
    data["network"] = {**DORA, "args": {"algo": "locon"}}  # LoCon at 0 is the base model
    assert not preflight(profile_from_dict(data, plugins=plugins), plugins, scan_images=True).problems
