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
