"""Each training option changes what it is for: break the option and one of these fails.

The runs are tiny end-to-end trainings; each test compares a run with the option against one without (or
against what the option's definition says the result must be), never a shape or a finished status.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from training_helpers import make_run, read_events, write_images

from anima_core.hookspecs import hookimpl
from anima_core.plugins import build_plugins


def lora_of(result) -> dict[str, torch.Tensor]:
    return load_file(result.lora_path)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rewrite_captions(data_dir, text: str) -> None:
    for caption in data_dir.rglob("*.txt"):
        caption.write_text(text)


def test_caption_dropout_rate_one_makes_the_captions_irrelevant(tmp_path, tiny_model):
    """At rate 1 every caption is replaced by the empty caption, so what the captions say cannot matter;
    at rate 0 it does."""
    runs = {}
    for rate in (0.0, 1.0):
        for words in ("1girl, red hair", "landscape, mountains, sky"):
            root = tmp_path / f"{rate}-{words[:4]}"
            write_images(root / "data")
            rewrite_captions(root / "data", words)
            runs[rate, words] = lora_of(make_run(root, tiny_model, training={"max_train_steps": 2,
                                                                              "caption_dropout_rate": rate}).run())
    assert same(runs[1.0, "1girl, red hair"], runs[1.0, "landscape, mountains, sky"])
    assert not same(runs[0.0, "1girl, red hair"], runs[0.0, "landscape, mountains, sky"])


def write_transparent_images(folder, count=2, side=64):
    subset = folder / "2_clear"
    subset.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        rgba = rng.integers(0, 256, (side, side, 4), dtype=np.uint8)
        rgba[..., 3] = 0  # nothing of the image counts
        Image.fromarray(rgba, "RGBA").save(subset / f"img{i}.png")
        (subset / f"img{i}.txt").write_text("1girl\n")


def test_an_alpha_mask_that_masks_everything_leaves_the_lora_untrained(tmp_path, tiny_model):
    """Masked loss (sd-scripts: loss × mask): a fully transparent image gives zero loss, so the zero-initialised
    up weights stay exactly zero; without alpha_mask the same images train them."""
    ups = {}
    for masked in (True, False):
        root = tmp_path / str(masked)
        write_transparent_images(root / "data")
        result = make_run(root, tiny_model, dataset={"alpha_mask": masked}, training={"max_train_steps": 2}).run()
        assert not [e for e in read_events(result.run_dir) if e["type"] == "warning" and "non-finite" in e["message"]]
        ups[masked] = [v for k, v in lora_of(result).items() if k.endswith("lora_up.weight")]
    assert ups[True] and all(not u.any() for u in ups[True])
    assert any(u.any() for u in ups[False])


def test_ip_noise_gamma_changes_the_training(tmp_path, tiny_model):
    loras = [lora_of(make_run(tmp_path / str(gamma), tiny_model,
                              training={"max_train_steps": 2, "ip_noise_gamma": gamma}).run()) for gamma in (None, 0.5)]
    assert not same(*loras)


def test_the_profiles_timestep_sampler_is_the_one_called(tmp_path, tiny_model):
    calls = []

    class RecordingSampler:
        @hookimpl
        def register_timestep_samplers(self, register):
            def constant_half(batch_size, cfg, generator, latent_hw=None):
                calls.append(batch_size)
                return torch.full((batch_size,), 0.5)

            register("constant_half", constant_half)

    plugins = build_plugins(entry_points=False, extra=(RecordingSampler(),))
    result = make_run(tmp_path, tiny_model, plugins=plugins,
                      training={"max_train_steps": 2, "timestep_sampling": "constant_half"}).run()
    assert result.status == "finished" and sum(calls) == 2 * 2  # two steps of batch 2


def test_save_last_n_steps_keeps_the_saves_of_the_last_n_steps(tmp_path, tiny_model):
    """sd-scripts' rule: after the save at step s, the save at step s − n − 1 (rounded down to the save interval)
    goes, so the saves newer than s − n − 1 stay."""
    every, keep, total = 2, 3, 9
    result = make_run(tmp_path, tiny_model, training={"max_train_steps": total},
                      saving={"save_every_n_steps": every, "save_last_n_steps": keep}).run()
    saved = sorted(int(p.stem.rsplit("step", 1)[1]) for p in result.lora_path.parent.glob("lora-step*.safetensors"))
    last = max(range(every, total, every))
    assert saved == [s for s in range(every, total, every) if s > last - keep - 1] == [6, 8]
    assert result.lora_path.is_file()


def test_network_dropout_drops_the_down_projection_as_sd_scripts_does(tiny_model):
    """sd-scripts' LoRA: out = W·x + up(dropout(down(x)))·scale in training; the profile's network.dropout reaches
    every module."""
    from anima_core.config.schema import NetworkTable
    from anima_core.models import load_dit
    from anima_plugins.lora import create_network

    dit = load_dit(tiny_model.dit, dtype=torch.float32)
    network = create_network(NetworkTable(dim=4, alpha=2, dropout=0.5), dit=dit, text_encoder=None,
                             train_text_encoder=False)
    network.apply_to()
    name, lora = next(iter(network.loras.items()))
    torch.nn.init.normal_(lora.lora_up.weight)
    lora.train()
    x = torch.randn(3, lora.lora_down.in_features)
    torch.manual_seed(5)
    out = lora.target(x)
    torch.manual_seed(5)
    expected = torch.nn.functional.linear(x, lora.target.weight, lora.target.bias) + lora.lora_up(
        torch.nn.functional.dropout(lora.lora_down(x), p=0.5)) * (2 / 4)
    assert torch.allclose(out, expected, atol=1e-6), name
    lora.eval()
    plain = torch.nn.functional.linear(x, lora.target.weight, lora.target.bias) + lora.lora_up(lora.lora_down(x)) / 2
    assert torch.allclose(lora.target(x), plain, atol=1e-6)
    assert not torch.allclose(out, plain)


def test_network_dropout_changes_the_training(tmp_path, tiny_model):
    loras = [lora_of(make_run(tmp_path / str(p), tiny_model, training={"max_train_steps": 2},
                              network={"dropout": p}).run()) for p in (None, 0.5)]
    assert not same(*loras)


def test_model_compile_blocks_compiles_the_trainers_dit(tmp_path, tiny_model, monkeypatch):
    from anima_core.models.dit import AnimaDiT

    compiled = []
    original = AnimaDiT.compile_blocks

    def compile_blocks(self, **options):  # Inductor takes minutes on a CPU; the eager backend still traces
        compiled.append(self)
        original(self, backend="eager")

    monkeypatch.setattr(AnimaDiT, "compile_blocks", compile_blocks)
    for flag in (False, True):
        result = make_run(tmp_path / str(flag), tiny_model, training={"max_train_steps": 1},
                          model={"compile_blocks": flag}).run()
        assert result.status == "finished"
        assert len(compiled) == int(flag)
    assert all(block._compiled_call_impl is not None for block in compiled[0].blocks)


def test_model_and_caching_options_reach_the_loaders(tmp_path, tiny_model, caplog, monkeypatch):
    """One run through a recording model loader: model.loader picks it; the DiT, VAE and text encoder come with the
    profile's dtypes, tokenizers, attention, VAE chunking and tiling; the caches encode vae_batch_size images and
    text_encoder_batch_size captions per call; extra_strategies and full_bf16 reach the trained network."""
    import logging
    import shutil
    from pathlib import Path

    from anima_plugins.anima_loader import AnimaLoader

    calls: dict[str, list] = {"dit": [], "vae": [], "vae_batches": [], "text_batches": []}

    class RecordingLoader(AnimaLoader):
        def load_dit(self, model_cfg, *, dtype, device):
            calls["dit"].append(dtype)
            return super().load_dit(model_cfg, dtype=dtype, device=device)

        def load_vae(self, model_cfg, *, dtype, device):
            vae = super().load_vae(model_cfg, dtype=dtype, device=device)
            calls["vae"].append((dtype, vae.identity()))
            encode = vae.encode
            vae.encode = lambda pixels: calls["vae_batches"].append(len(pixels)) or encode(pixels)
            return vae

        def load_text_encoder(self, model_cfg, *, dtype, device):
            te = super().load_text_encoder(model_cfg, dtype=dtype, device=device)
            calls["tokenizers"] = (Path(te.qwen_tokenizer.name_or_path), Path(te.t5_tokenizer.name_or_path))
            encode = te.encode
            te.encode = lambda captions, *a, **k: calls["text_batches"].append(len(captions)) or encode(captions, *a, **k)
            return te

    class Plugin:
        @hookimpl
        def register_model_loaders(self, register):
            register("recording", RecordingLoader())

    plugins = build_plugins(entry_points=False, extra=(Plugin(),))
    qwen_copy = shutil.copytree(tiny_model.qwen_tokenizer, tmp_path / "qwen_tokenizer")  # not the one beside qwen3
    t5_copy = shutil.copytree(tiny_model.t5_tokenizer, tmp_path / "t5_tokenizer")
    monkeypatch.setattr("anima_core.models.attention.package_available", lambda module: False)
    with caplog.at_level(logging.WARNING):
        trainer = make_run(tmp_path, tiny_model, plugins=plugins, training={"max_train_steps": 1, "full_bf16": True},
                           model={"loader": "recording", "qwen3_tokenizer": str(qwen_copy),
                                  "t5_tokenizer": str(t5_copy), "transformer_dtype": "bfloat16", "vae_dtype": "bfloat16",
                                  "vae_chunk_size": 16, "vae_tiled": True, "attn_mode": "flash", "split_attn": True},
                           caching={"vae_batch_size": 2, "text_encoder_batch_size": 1},
                           memory={"extra_strategies": ["gradient_checkpointing"]})
        result = trainer.run()
    assert result.status == "finished"
    assert calls["dit"] == [torch.bfloat16]
    assert calls["tokenizers"] == (qwen_copy, t5_copy)
    ((vae_dtype, identity),) = calls["vae"]
    assert vae_dtype == torch.bfloat16 and "chunk=16;tiled=True" in identity
    assert calls["vae_batches"] == [2] and calls["text_batches"] == [1, 1]  # two images
    cached = {e["phase"] for e in read_events(result.run_dir) if e["type"] == "cache" and e["finished"]}
    assert {"latents", "text"} <= cached  # cache_latents and cache_text_encoder_outputs (the tiny profile's)
    assert "flash-attn is not installed" in caplog.text  # flash asked for, SDPA used
    assert all(block.self_attn.backend.split for block in trainer.dit.blocks)
    assert [s.name for s in trainer.strategies] == ["gradient_checkpointing"]
    assert {p.dtype for p in trainer.network.parameters()} == {torch.bfloat16}


def run_with_console(root, tiny_model, **tables):
    """make_run, printing to a captured console: (result, what it printed)."""
    import io

    from rich.console import Console

    from anima_core.config import profile_from_dict
    from anima_core.training.trainer import Trainer
    from training_helpers import tiny_profile_data

    write_images(root / "data")
    plugins = build_plugins(entry_points=False)
    out = io.StringIO()
    console = Console(file=out, width=300, force_terminal=False)
    trainer = Trainer(profile_from_dict(tiny_profile_data(root, tiny_model, **tables), plugins=plugins), plugins,
                      console=console)
    return trainer.run(), out.getvalue()


def test_saving_options_shape_the_saved_file(tmp_path, tiny_model):
    """Where the LoRA lands and what it holds: output_dir / output_name.safetensors in save_precision, the
    modelspec and ss_ metadata keys sd-scripts writes for the metadata options, the run directory named run_name,
    the newest keep_last_n_states states;
    progress = "rich" draws a bar instead of the plain step lines."""
    import re

    from safetensors import safe_open

    from anima_core.training.state import list_states

    result, printed = run_with_console(
        tmp_path, tiny_model, training={"max_train_steps": 3},
        saving={"output_dir": str(tmp_path / "elsewhere"), "output_name": "mine", "save_precision": "fp16",
                "save_every_n_steps": 1, "keep_last_n_states": 1,
                "metadata_title": "Title", "metadata_author": "Author", "metadata_description": "About",
                "metadata_license": "CC0", "metadata_tags": "a, b", "training_comment": "Comment"},
        logging={"run_name": "named-run", "progress": "rich"})
    assert result.lora_path == tmp_path / "elsewhere" / "mine.safetensors"
    assert result.run_dir == tmp_path / "elsewhere" / "runs" / "named-run"
    with safe_open(result.lora_path, "pt") as f:  # save_model_as: a safetensors file
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        meta = f.metadata()
    assert dtypes == {torch.float16}
    assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.description"], meta["modelspec.license"],
            meta["modelspec.tags"], meta["ss_training_comment"]) == ("Title", "Author", "About", "CC0", "a, b", "Comment")
    # save_state (on by default) wrote a resumable state with each save, of which keep_last_n_states = 1 keeps the last
    assert [p.name for p in list_states(result.run_dir / "state")] == ["step-00000003"]
    assert not re.search(r"step \d+/\d+ epoch", printed)  # the bar, not a plain line
    assert "finished at step 3" in printed


def test_epoch_options_set_the_length_the_saves_and_the_previews(tmp_path, tiny_model):
    """Two images in two steps an epoch: max_train_epochs = 3 trains 6 steps whatever max_train_steps says; an
    epoch save after epochs 1 and 2 of which save_last_n_epochs = 1 keeps the newer (sd-scripts removes the save
    of epoch e - every x n); previews after epoch 2 and at the end; no_metadata leaves the essential keys; plain
    progress prints every log_every_n_steps steps and the last; the run directory is named after output_name;
    save_state = false writes no resumable state."""
    from safetensors import safe_open

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1girl --w 32 --h 32 --s 1\n")
    result, printed = run_with_console(
        tmp_path, tiny_model, training={"max_train_steps": 100, "max_train_epochs": 3},
        saving={"save_every_n_epochs": 1, "save_last_n_epochs": 1, "no_metadata": True, "training_comment": "x",
                "save_state": False},
        sampling={"sample_prompts": str(prompts), "sample_every_n_epochs": 2},
        logging={"run_name": None, "progress": "plain", "log_every_n_steps": 4})
    assert result.status == "finished" and result.step == 6
    assert not list((result.run_dir / "state").iterdir())  # no resumable state, not even at the end
    assert sorted(p.name for p in result.lora_path.parent.glob("*.safetensors")) == ["lora-000002.safetensors", "lora.safetensors"]
    samples = [e for e in read_events(result.run_dir) if e["type"] == "sample"]
    assert [(e["step"], e["epoch"]) for e in samples] == [(4, 2), (6, 3)]
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert "ss_network_dim" in meta and "ss_training_comment" not in meta and "ss_learning_rate" not in meta
    assert [line.split(" epoch")[0] for line in printed.splitlines() if line.startswith("step ")] == ["step 4/6", "step 6/6"]
    assert result.run_dir.name.endswith("-lora") and result.run_dir.name != "run"


def test_process_options_reach_the_process_group_and_torch(tmp_path, tiny_model, monkeypatch):
    """training.device names the device (no CUDA is touched until the run starts); num_cpu_threads_per_process
    sets torch's CPU threads; under a launcher, the process group is joined with
    ddp_timeout minutes (accelerate's PartialState timeout, as sd-scripts passes --ddp_timeout)."""
    from datetime import timedelta

    import accelerate
    import pytest

    from anima_core.training import distributed

    assert make_run(tmp_path / "gpu", tiny_model, training={"device": "cuda:1"}).device == torch.device("cuda:1")
    trainer = make_run(tmp_path, tiny_model, training={"num_cpu_threads_per_process": 2, "ddp_timeout": 7})
    assert trainer.device == torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        trainer._join_processes()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)

    class Joined(Exception):
        pass

    def partial_state(**options):
        raise Joined(options)

    monkeypatch.setattr(distributed, "under_launcher", lambda: True)
    monkeypatch.setattr(distributed, "worker_threads", lambda threads: None)
    monkeypatch.setattr(accelerate, "PartialState", partial_state)
    with pytest.raises(Joined) as joined:
        trainer._join_processes()
    assert joined.value.args[0]["timeout"] == timedelta(minutes=7)


def test_skip_cache_check_makes_the_trainer_trust_disk_caches(tmp_path, tiny_model):
    """caching.skip_cache_check: a text cache file whose caption has changed is re-encoded, unless the profile
    says to trust existing files (as sd-scripts' --skip_cache_check does)."""
    from anima_core.config import profile_from_dict
    from anima_core.training.trainer import Trainer
    from training_helpers import tiny_profile_data

    def text_caching(run_name, **caching):
        plugins = build_plugins(entry_points=False)
        data = tiny_profile_data(tmp_path, tiny_model, logging={"run_name": run_name},
                                 caching={"cache_text_encoder_outputs_to_disk": True, **caching})
        result = Trainer(profile_from_dict(data, plugins=plugins), plugins, cache_only=True).run()
        return [e for e in read_events(result.run_dir) if e["type"] == "cache" and e["phase"] == "text"][-1]

    write_images(tmp_path / "data")
    assert text_caching("first")["new"] == 2
    (tmp_path / "data" / "2_tiny" / "img0.txt").write_text("1girl, a caption written after caching\n")
    assert text_caching("trusted", skip_cache_check=True)["new"] == 0
    assert text_caching("checked")["new"] == 1
