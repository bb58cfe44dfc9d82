"""Text encoder (tokenizers, masks, empty caption, file layouts) and VAE (naming, file formats, tiling)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from anima_core.errors import TokenizerNotFoundError
from anima_core.models import load_text_encoder, load_vae, make_tiny_model
from anima_core.models.checkpoint import read_state_dict
from anima_core.models.tokenizer_files import PACKAGED_QWEN3_TOKENIZER, PACKAGED_T5_TOKENIZER
from anima_core.models.vae import diffusers_key_to_wan, to_diffusers_names, wan_key_to_diffusers


@pytest.fixture(scope="module")
def text_encoder(tiny_model):
    return load_text_encoder(tiny_model.qwen3, t5_tokenizer_path=tiny_model.t5_tokenizer, dtype=torch.float32)


def test_empty_caption_gives_the_spec_values(text_encoder, qwen_tokenizer_dir, t5_tokenizer_dir):
    # qwen_tokenizer_dir / t5_tokenizer_dir: the tiny set carries copies of the real tokenizers
    states, qwen_mask, t5_ids, t5_mask = text_encoder.encode(["", "a cat"], qwen_max_length=16, t5_max_length=8)
    assert states.shape == (2, 16, 64) and states.isfinite().all()
    assert (states[0] == 0).all() and (qwen_mask[0] == 0).all()
    assert text_encoder.tokenize([""], 16, 8)[0].eq(151643).all()
    assert t5_ids[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0] and t5_mask[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    # "a cat": Qwen has no BOS/EOS, T5 appends </s>
    assert qwen_mask[1].sum() == 2 and (states[1, 2:] == 0).all() and (states[1, :2] != 0).any()
    assert t5_ids[1, :4].tolist() == [3, 9, 1712, 1] and t5_mask[1].sum() == 4


def test_single_file_with_a_tokenizer_folder_equals_the_folder(tiny_model, text_encoder, tmp_path):
    single = tmp_path / "qwen_3_06b_tiny.safetensors"
    shutil.copyfile(tiny_model.qwen3 / "model.safetensors", single)
    from_file = load_text_encoder(
        single, tokenizer_path=tiny_model.qwen_tokenizer, t5_tokenizer_path=tiny_model.t5_tokenizer,
        dtype=torch.float32,
    )  # fmt: skip
    a = text_encoder.encode(["blue sky"], 8, 8)[0]
    b = from_file.encode(["blue sky"], 8, 8)[0]
    torch.testing.assert_close(a, b)
    assert from_file.identity() != text_encoder.identity()
    assert "layers.1.self_attn.q_proj" in dict(from_file.model.named_modules())


def test_identity_is_stable_and_names_dtype(tiny_model, text_encoder):
    bf16 = load_text_encoder(tiny_model.qwen3, t5_tokenizer_path=tiny_model.t5_tokenizer, dtype=torch.bfloat16)
    assert bf16.identity() != text_encoder.identity()
    assert bf16.identity().replace("bfloat16", "float32") == text_encoder.identity()
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32


def test_shipped_tokenizers_are_used_when_none_is_given(tiny_model, tmp_path):
    """A Qwen3 folder without tokenizer files, and no tokenizer named, loads with the tokenizers inside the package."""
    bare = tmp_path / "qwen3"
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(tiny_model.qwen3 / name, bare / name)
    te = load_text_encoder(bare, dtype=torch.float32)
    assert Path(te.qwen_tokenizer.name_or_path) == PACKAGED_QWEN3_TOKENIZER
    assert Path(te.t5_tokenizer.name_or_path) == PACKAGED_T5_TOKENIZER
    states, qwen_mask, t5_ids, t5_mask = te.encode(["a cat", ""], qwen_max_length=8, t5_max_length=8)
    assert qwen_mask[0].sum() == 2 and (states[1] == 0).all()  # "a", " cat"; an empty caption has no tokens
    assert t5_ids[0].tolist() == [3, 9, 1712, 1, 0, 0, 0, 0] and t5_ids[1].tolist() == [1] + [0] * 7


def test_a_named_tokenizer_folder_wins_and_a_wrong_one_names_the_key(tiny_model, tmp_path):
    single = tmp_path / "qwen.safetensors"
    shutil.copyfile(tiny_model.qwen3 / "model.safetensors", single)
    te = load_text_encoder(single, tokenizer_path=tiny_model.qwen_tokenizer, t5_tokenizer_path=tiny_model.t5_tokenizer)
    assert Path(te.qwen_tokenizer.name_or_path) == tiny_model.qwen_tokenizer
    with pytest.raises(TokenizerNotFoundError) as err:
        load_text_encoder(single, tokenizer_path=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "model.qwen3_tokenizer" in message and "\n" not in message


def test_real_2b_vae_names_map_like_diffusers_own_converter():
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        diffusers_keys = list(AutoencoderKLQwenImage().state_dict())
    assert len(diffusers_keys) == 194
    wan = {diffusers_key_to_wan(k): torch.zeros(1) for k in diffusers_keys}
    assert len(wan) == 194 and "conv1.weight" in wan and "decoder.upsamples.14.residual.6.bias" in wan
    theirs = convert_wan_vae_to_diffusers(wan)
    assert set(theirs) == set(diffusers_keys)
    assert all(wan_key_to_diffusers(k) in theirs for k in wan)
    assert to_diffusers_names(dict.fromkeys(diffusers_keys)).keys() == set(diffusers_keys)  # already diffusers


def test_pth_file_and_5d_latents(tiny_model, tmp_path):
    pth = tmp_path / "vae.pth"
    torch.save(read_state_dict(tiny_model.vae, "VAE"), pth)
    pixels = torch.rand(1, 3, 32, 40) * 2 - 1
    a = load_vae(tiny_model.vae).encode(pixels)
    vae = load_vae(pth)
    torch.testing.assert_close(vae.encode(pixels), a)
    torch.testing.assert_close(vae.decode(a[:, :, None]), vae.decode(a))


def test_chunked_vae_is_exact_and_tiled_vae_keeps_shapes(tiny_model):
    pixels = torch.rand(1, 3, 40, 32) * 2 - 1
    plain = load_vae(tiny_model.vae)
    chunked = load_vae(tiny_model.vae, chunk_size=16)
    assert "_conv_forward" in vars(chunked.vae.encoder.conv_in)  # the chunked path is installed
    latents = plain.encode(pixels)
    torch.testing.assert_close(chunked.encode(pixels), latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.decode(latents), plain.decode(latents), rtol=1e-5, atol=1e-5)
    assert len({plain.identity(), chunked.identity(), load_vae(tiny_model.vae, tiled=True).identity()}) == 3

    tiled = load_vae(tiny_model.vae, tiled=True)
    tiled.vae.enable_tiling(32, 32, 24, 24)  # tiles small enough for a tiny image: 2 x 1 tiles
    tiled_latents = tiled.encode(pixels)
    assert tiled_latents.shape == latents.shape and tiled_latents.isfinite().all()
    decoded = tiled.decode(tiled_latents)
    assert decoded.shape == pixels.shape and decoded.abs().max() <= 1
    with pytest.raises(ValueError, match="positive number of rows"):
        load_vae(tiny_model.vae, chunk_size=0)


def test_every_shipped_tokenizer_file_is_package_data():
    """The wheel carries what pyproject's package-data globs match: every file of the tokenizer folder must match."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package_dir = PACKAGED_QWEN3_TOKENIZER.parents[1]  # anima_core/models
    files = [p.relative_to(package_dir).as_posix() for p in (package_dir / "tokenizers").rglob("*") if p.is_file()]
    assert len(files) >= 9 and "tokenizers/NOTICE.md" in files and "tokenizers/LICENSE-Apache-2.0.txt" in files
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs["anima_core.models"])]
    assert unshipped == []


def test_single_frame_convolutions_equal_diffusers_3d_ones(tiny_model, monkeypatch):
    """Images are one-frame videos to the VAE: its causal 3D convolutions run as 2D ones with the kernel's last
    temporal slice (the others meet only the causal zero padding). Encode and decode must match diffusers' own
    3D path, and no 3D convolution may run."""
    fast = load_vae(tiny_model.vae)
    reference = load_vae(tiny_model.vae)
    patched = [m for m in reference.vae.modules() if "forward" in vars(m)]
    assert len(patched) > 10
    for module in patched:
        del module.forward  # back to diffusers' QwenImageCausalConv3d.forward
    pixels = torch.rand(2, 3, 40, 56) * 2 - 1
    latents = reference.encode(pixels)
    decoded = reference.decode(latents)
    calls = []
    conv3d = torch.nn.functional.conv3d
    monkeypatch.setattr(torch.nn.functional, "conv3d", lambda *a, **k: calls.append(1) or conv3d(*a, **k))
    torch.testing.assert_close(fast.encode(pixels), latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.decode(latents), decoded, rtol=1e-5, atol=1e-5)
    assert not calls
