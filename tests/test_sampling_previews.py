"""Previews during training and `anima-train sample`, on the real tiny model set (CPU)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from anima_core.config.schema import Profile
from anima_core.models import load_dit, load_text_encoder
from anima_core.sampling.cli import parse_lora_argument, run_sample_command
from anima_core.sampling.during_training import TrainingPreviews
from anima_core.training.distributed import Processes
from anima_core.training.events import EventLog, make_run_dir
from anima_plugins.anima_loader import AnimaLoader
from anima_plugins.lora import create_network

FAST = "--w 64 --h 64 --s 1"


class RecordingStrategy:
    """Records the memory-strategy calls the previews make, in order."""

    def __init__(self, calls):
        self.calls = calls

    def prepare_for_sampling(self, dit):
        self.calls.append(("sampling", dit.training))

    def prepare_for_training(self, dit):
        self.calls.append(("training", dit.training))


def random_lora(dit, seed: int):
    network = create_network(SimpleNamespace(dim=4, alpha=4.0), dit=dit, text_encoder=None, train_text_encoder=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.copy_(0.5 * torch.randn(lora.lora_up.weight.shape, generator=generator))
    return network


@pytest.fixture
def trainer(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# previews\na red fox {FAST} --d 5 --l 1\na blue sky {FAST} --n dark --l 3 --zz 1\n")
    profile = Profile(
        model={"vae": str(tiny_model.vae), "qwen3_max_token_length": 32, "t5_max_token_length": 32},
        sampling={"sample_prompts": str(prompts), "sample_every_n_steps": 2, "sample_every_n_epochs": 3},
        saving={"output_name": "tiny", "output_dir": str(tmp_path / "out")},
        training={"seed": 100},
    )
    dit = load_dit(tiny_model.dit, dtype=torch.float32).train()
    network = random_lora(dit, seed=1)
    network.apply_to()
    network.train()
    run_dir = make_run_dir(tmp_path / "out", "run")
    events = EventLog(run_dir)
    calls = []
    text_encoder = load_text_encoder(tiny_model.qwen3, tokenizer_path=tiny_model.qwen_tokenizer,
                                     t5_tokenizer_path=tiny_model.t5_tokenizer, dtype=torch.float32)
    trainer = SimpleNamespace(
        profile=profile, dit=dit, network=network, text_encoder=text_encoder, vae=None, device=torch.device("cpu"),
        dit_dtype=torch.float32, strategies=[RecordingStrategy(calls)], run_dir=run_dir, events=events,
        warn=lambda message, **detail: events.emit("warning", message=message),
        models=AnimaLoader(), ema_weights=lambda use: contextlib.nullcontext(),
        calls=calls, prompts=prompts, processes=Processes.single(torch.device("cpu")),
    )
    yield trainer
    events.close()


def read_events(trainer, kind):
    lines = (trainer.run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == kind]


def pixels(path):
    return np.asarray(Image.open(path))


def test_previews_write_named_images_and_leave_training_untouched(trainer):
    previews = TrainingPreviews(trainer)
    rng_before = torch.get_rng_state()

    previews.after_step(1, None)
    assert not any((trainer.run_dir / "samples").iterdir())

    previews.after_step(2, None)
    samples = trainer.run_dir / "samples"
    names = sorted(p.name for p in samples.iterdir())
    # Unseeded prompts use the training seed + their index; the sheet puts both side by side.
    assert names == ["tiny_000002_00_5.png", "tiny_000002_01_101.png", "tiny_000002_sheet.png"]
    assert Image.open(samples / names[0]).size == (64, 64)
    assert Image.open(samples / names[2]).size == (256 + 4 + 256, 256)
    events = read_events(trainer, "sample")
    assert [(e["prompt"], e["step"]) for e in events] == [("a red fox", 2), ("a blue sky", 2)]
    assert events[0]["path"] == str(samples / names[0])
    assert any("--zz 1" in w["message"] for w in read_events(trainer, "warning"))

    assert torch.equal(torch.get_rng_state(), rng_before)
    assert trainer.dit.training and trainer.network.training
    assert trainer.calls == [("sampling", False), ("training", False)]

    previews.after_step(3, 3)  # the end of epoch 3 renders by epoch
    assert (samples / "tiny_e000003_00_5.png").is_file()
    # Same seed, unchanged LoRA: the same picture at every preview.
    assert np.array_equal(pixels(samples / "tiny_000002_00_5.png"), pixels(samples / "tiny_e000003_00_5.png"))
    previews.render(step=3, epoch=3)  # the final render right after a scheduled one is not repeated
    assert len(read_events(trainer, "sample")) == 4


def test_prompt_file_edits_take_effect_and_failures_are_warnings(trainer, tiny_model):
    previews = TrainingPreviews(trainer)
    trainer.prompts.write_text(f"a green frog {FAST} --d 9\n")
    previews.render(step=4, epoch=1)
    assert [e["prompt"] for e in read_events(trainer, "sample")] == ["a green frog"]

    trainer.profile.model.vae = tiny_model.vae.parent / "missing_vae.safetensors"
    rng_before = torch.get_rng_state()
    assert previews.render(step=6, epoch=1) == []
    assert any("previews at step 6 skipped" in w["message"] for w in read_events(trainer, "warning"))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert trainer.dit.training and trainer.calls[-1][0] == "training"

    trainer.prompts.unlink()
    assert previews.render(step=8, epoch=1) == []
    assert any("cannot be read" in w["message"] for w in read_events(trainer, "warning"))


def test_lora_argument_parsing():
    assert parse_lora_argument("a/b.safetensors:0.5") == (Path("a/b.safetensors"), 0.5)
    assert parse_lora_argument("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert parse_lora_argument("C:/x/b.safetensors") == (Path("C:/x/b.safetensors"), 1.0)


def test_sample_command_with_and_without_lora(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMA_TRAIN_IMAGES", "halfblock")
    lora_path = tmp_path / "random.safetensors"
    random_lora(load_dit(tiny_model.dit, dtype=torch.float32), seed=2).save(lora_path)

    def sample(out, loras, show=False):
        args = argparse.Namespace(
            dit=str(tiny_model.dit), qwen3=str(tiny_model.qwen3), vae=str(tiny_model.vae),
            qwen3_tokenizer=str(tiny_model.qwen_tokenizer), t5_tokenizer=str(tiny_model.t5_tokenizer),
            lora=loras, prompt=[f"a cat {FAST} --d 3 --n dog --l 4"], output=tmp_path / out, device="cpu", show=show,
        )  # fmt: skip
        console = Console(file=io.StringIO(), width=40, height=12)
        (path,) = run_sample_command(args, console)
        assert path == tmp_path / out / "sample_00_3.png"
        return pixels(path), console.file.getvalue()

    plain, quiet = sample("plain", [])
    with_lora, shown = sample("lora", [f"{lora_path}:1.0"], show=True)
    assert "▀" not in quiet
    # --show draws the image under its name (half blocks where the console is no graphics terminal).
    assert "sample_00_3.png" in shown and shown.count("▀") >= 10 * 10
    assert plain.shape == (64, 64, 3)
    assert not np.array_equal(plain, with_lora)
