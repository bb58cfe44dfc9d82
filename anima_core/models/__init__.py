"""The Anima model stack: DiT with LLM adapter, Qwen3 text encoder, Qwen-Image VAE, tiny random models."""

from anima_core.models.dit import AnimaDiT, Block, DiTConfig
from anima_core.models.dit_loading import detect_dit_config, load_dit
from anima_core.models.llm_adapter import LLMAdapter, LLMAdapterConfig, LLMAdapterTransformerBlock
from anima_core.models.text_encoder import AnimaTextEncoder, load_text_encoder
from anima_core.models.tiny import RandomModelPaths, make_tiny_model
from anima_core.models.vae import AnimaVAE, load_vae

__all__ = [
    "AnimaDiT",
    "AnimaTextEncoder",
    "AnimaVAE",
    "Block",
    "DiTConfig",
    "LLMAdapter",
    "LLMAdapterConfig",
    "LLMAdapterTransformerBlock",
    "RandomModelPaths",
    "detect_dit_config",
    "load_dit",
    "load_text_encoder",
    "load_vae",
    "make_tiny_model",
]
