"""The Anima model stack: DiT with LLM adapter, Qwen3 text encoder, Qwen-Image VAE, tiny random models."""

from anima_core.models.dit import AnimaDiT, Block, DiTConfig
from anima_core.models.dit_loading import detect_dit_config, load_dit
from anima_core.models.llm_adapter import LLMAdapter, LLMAdapterConfig, LLMAdapterTransformerBlock

__all__ = [
    "AnimaDiT",
    "Block",
    "DiTConfig",
    "LLMAdapter",
    "LLMAdapterConfig",
    "LLMAdapterTransformerBlock",
    "detect_dit_config",
    "load_dit",
]
