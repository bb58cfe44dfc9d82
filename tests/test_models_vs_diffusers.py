"""Numerical equality with diffusers' independent Anima implementation on the tiny random weights (float32).

The mapping from the checkpoint's names to diffusers' names is written here from the facts (ANIMA.md §1.4, §2.2),
not taken from either implementation.
"""

from __future__ import annotations

import re
import types

import pytest
import torch
import torch.nn.functional as F

from anima_core.models import load_dit, load_text_encoder, load_vae
from anima_core.models.checkpoint import read_state_dict, strip_prefixes
from anima_core.models.tiny import TINY_DIT

REL_TOL = 1e-5

DIT_RENAMES = [
    (r"x_embedder\.proj\.1\.", "patch_embed.proj."),
    (r"t_embedder\.1\.", "time_embed.t_embedder."),
    (r"t_embedding_norm\.", "time_embed.norm."),
    (r"final_layer\.linear\.", "proj_out."),
    (r"final_layer\.adaln_modulation\.1\.", "norm_out.linear_1."),
    (r"final_layer\.adaln_modulation\.2\.", "norm_out.linear_2."),
    (r"blocks\.(\d+)\.", r"transformer_blocks.\1."),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.([qkv])_proj\.", r".to_\1."),
    (r"\.output_proj\.", ".to_out.0."),
    (r"\.([qk])_norm\.", r".norm_\1."),
    (r"\.mlp\.layer1\.", ".ff.net.0.proj."),
    (r"\.mlp\.layer2\.", ".ff.net.2."),
    (r"\.adaln_modulation_self_attn\.(\d)\.", r".norm1.linear_\1."),
    (r"\.adaln_modulation_cross_attn\.(\d)\.", r".norm2.linear_\1."),
    (r"\.adaln_modulation_mlp\.(\d)\.", r".norm3.linear_\1."),
]


def to_diffusers_dit_key(key: str) -> str:
    for pattern, replacement in DIT_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.fixture(scope="module")
def dit_state_dict(tiny_model):
    return strip_prefixes(read_state_dict(tiny_model.dit, "DiT"))


@pytest.fixture(scope="module")
def diffusers_transformer(dit_state_dict, monkeypatch_module):
    from diffusers import CosmosTransformer3DModel
    from diffusers.models.transformers import transformer_cosmos

    if getattr(transformer_cosmos, "transforms", None) is None:
        # torchvision is not a dependency; diffusers only uses it to resize the padding mask (nearest).
        resize = lambda x, size, interpolation: F.interpolate(x, size=size, mode="nearest")  # noqa: E731
        shim = types.SimpleNamespace(
            functional=types.SimpleNamespace(resize=resize), InterpolationMode=types.SimpleNamespace(NEAREST=None)
        )
        monkeypatch_module.setattr(transformer_cosmos, "transforms", shim, raising=False)
    cfg = TINY_DIT
    model = CosmosTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        num_layers=cfg.num_blocks,
        mlp_ratio=cfg.mlp_hidden / cfg.model_channels,
        text_embed_dim=cfg.context_dim,
        adaln_lora_dim=cfg.adaln_lora_dim,
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
    )
    dit_only = {to_diffusers_dit_key(k): v for k, v in dit_state_dict.items() if not k.startswith("llm_adapter.")}
    model.load_state_dict(dit_only, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def diffusers_conditioner(dit_state_dict):
    from diffusers import AnimaTextConditioner

    a = TINY_DIT.llm_adapter
    model = AnimaTextConditioner(
        source_dim=a.source_dim,
        target_dim=a.target_dim,
        model_dim=a.model_dim,
        num_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        target_vocab_size=a.vocab_size,
    )
    adapter = {k[len("llm_adapter.") :]: v for k, v in dit_state_dict.items() if k.startswith("llm_adapter.")}
    model.load_state_dict(adapter, strict=True)  # the adapter's names are the same in both
    return model.eval()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def text_encoder(tiny_model):
    return load_text_encoder(tiny_model.qwen3, t5_tokenizer_path=tiny_model.t5_tokenizer, dtype=torch.float32)


CAPTIONS = ["1girl, solo, long hair, looking at viewer, smile", "a red fox in the snow"]


def test_text_path_matches_transformers_and_the_diffusers_conditioner(tiny_model, text_encoder, diffusers_conditioner):
    from transformers import Qwen3Model

    states, qwen_mask, t5_ids, t5_mask = text_encoder.encode(CAPTIONS, qwen_max_length=32, t5_max_length=24)
    reference_qwen = Qwen3Model.from_pretrained(str(tiny_model.qwen3), dtype=torch.float32).eval()
    ids = text_encoder.qwen_tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(ids["attention_mask"], qwen_mask)
    with torch.no_grad():
        expected = reference_qwen(**ids).last_hidden_state * ids["attention_mask"][..., None]
        conditioned = diffusers_conditioner(expected, t5_ids, t5_mask, qwen_mask)
    assert rel_err(states, expected) <= REL_TOL

    dit = load_dit(tiny_model.dit, dtype=torch.float32)
    with torch.no_grad():
        ours = dit.adapt_context(states, t5_ids, t5_mask, qwen_mask)
    assert ours.shape == conditioned.shape == (2, 512, 64)
    assert rel_err(ours, conditioned) <= REL_TOL


def test_dit_with_adapter_matches_diffusers(tiny_model, diffusers_transformer, diffusers_conditioner):
    dit = load_dit(tiny_model.dit, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 1, 10, 14, generator=g)
    sigmas = torch.tensor([0.25, 0.9])
    qwen = torch.randn(2, 20, 64, generator=g)
    qwen_mask = torch.ones(2, 20, dtype=torch.long)
    qwen_mask[1, 12:] = 0
    t5_ids = torch.randint(0, 32100, (2, 16), generator=g)
    t5_mask = torch.ones(2, 16, dtype=torch.long)
    t5_mask[0, 9:] = 0
    with torch.no_grad():
        ours = dit(x, sigmas, qwen * qwen_mask[..., None], target_input_ids=t5_ids, target_attention_mask=t5_mask,
                   source_attention_mask=qwen_mask)  # fmt: skip
        context = diffusers_conditioner(qwen * qwen_mask[..., None], t5_ids, t5_mask, qwen_mask)
        theirs = diffusers_transformer(
            x, sigmas, context, padding_mask=torch.zeros(1, 1, 10, 14), return_dict=False
        )[0]
    assert ours.shape == theirs.shape == x.shape
    assert rel_err(ours, theirs) <= REL_TOL


def test_vae_matches_diffusers_with_diffusers_own_wan_conversion(tiny_model):
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from anima_core.models.tiny import TINY_VAE_BASE_DIM

    wan = read_state_dict(tiny_model.vae, "VAE")
    assert "conv1.weight" in wan and "decoder.upsamples.11.resample.1.weight" in wan  # released (Wan) naming
    reference = AutoencoderKLQwenImage(base_dim=TINY_VAE_BASE_DIM)
    reference.load_state_dict(convert_wan_vae_to_diffusers(wan), strict=True)
    reference.eval()
    mean = torch.tensor(reference.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, 16, 1, 1, 1)

    vae = load_vae(tiny_model.vae, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    pixels = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(pixels)
        expected = (reference.encode(pixels[:, :, None]).latent_dist.mode() - mean) / std
        decoded = vae.decode(latents)
        expected_pixels = reference.decode(expected * std + mean).sample
    assert latents.shape == (2, 16, 6, 8)
    assert rel_err(latents, expected[:, :, 0]) <= REL_TOL
    assert decoded.shape == pixels.shape
    assert rel_err(decoded, expected_pixels[:, :, 0]) <= REL_TOL
