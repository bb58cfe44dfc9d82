"""The built-in model loader "anima": the released DiT, Qwen3 and Qwen-Image VAE files via anima_core.models."""

from __future__ import annotations

from anima_core.hookspecs import hookimpl
from anima_core.models import load_dit, load_text_encoder, load_vae
from anima_core.models.vae import vae_identity


class AnimaLoader:
    """Reads the paths and options of the profile's ``model`` table."""

    def load_dit(self, model_cfg, *, dtype, device):
        dit = load_dit(model_cfg.dit, llm_adapter_path=model_cfg.llm_adapter, dtype=dtype, device=device)
        dit.set_attention_backend(model_cfg.attn_mode, split=model_cfg.split_attn)
        dit.apply_t5_attn_mask = getattr(model_cfg, "apply_t5_attn_mask", True)
        return dit

    def load_vae(self, model_cfg, *, dtype, device):
        return load_vae(
            model_cfg.vae, dtype=dtype, device=device, chunk_size=model_cfg.vae_chunk_size, tiled=model_cfg.vae_tiled
        )

    def vae_identity(self, model_cfg, *, dtype):
        """The cache identity of the VAE load_vae would return; optional for loaders (without it the VAE is
        loaded before the latent caches are checked)."""
        return vae_identity(model_cfg.vae, dtype=dtype, chunk_size=model_cfg.vae_chunk_size, tiled=model_cfg.vae_tiled)

    def load_text_encoder(self, model_cfg, *, dtype, device):
        return load_text_encoder(
            model_cfg.qwen3,
            tokenizer_path=model_cfg.qwen3_tokenizer,
            t5_tokenizer_path=model_cfg.t5_tokenizer,
            dtype=dtype,
            device=device,
        )


@hookimpl
def register_model_loaders(register):
    register("anima", AnimaLoader())
