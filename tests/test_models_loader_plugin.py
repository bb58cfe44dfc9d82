"""The built-in "anima" model loader reads the profile's [model] table and returns working models."""

from __future__ import annotations

import torch

from anima_core.config.schema import ModelTable
from anima_core.models import AnimaDiT
from anima_core.plugins import build_plugins


def test_anima_loader_loads_the_tiny_set_with_the_profile_options(tiny_model):
    loader = build_plugins(entry_points=False).registry("register_model_loaders").get("anima")
    cfg = ModelTable(
        dit=tiny_model.dit, qwen3=tiny_model.qwen3, vae=tiny_model.vae, t5_tokenizer=tiny_model.t5_tokenizer,
        attn_mode="xformers", split_attn=True, vae_chunk_size=16, apply_t5_attn_mask=True,
    )  # fmt: skip
    dit = loader.load_dit(cfg, dtype=torch.float32, device="cpu")
    assert isinstance(dit, AnimaDiT) and dit.apply_t5_attn_mask
    assert dit.blocks[0].self_attn.backend.split  # xformers is not installed here: SDPA, split kept
    te = loader.load_text_encoder(cfg, dtype=torch.float32, device="cpu")
    vae = loader.load_vae(cfg, dtype=torch.float32, device="cpu")
    assert "chunk=16" in vae.identity()

    states, qwen_mask, t5_ids, t5_mask = te.encode(["a lighthouse"], qwen_max_length=8, t5_max_length=8)
    latents = vae.encode(torch.zeros(1, 3, 32, 32))[:, :, None]
    with torch.no_grad():
        v = dit(latents, torch.tensor([0.5]), states, target_input_ids=t5_ids, target_attention_mask=t5_mask,
                source_attention_mask=qwen_mask)  # fmt: skip
    assert v.shape == latents.shape and v.isfinite().all()
