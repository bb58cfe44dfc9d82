"""The LLM adapter: maps Qwen3 hidden states (source) into the DiT's context space, queried by T5 token ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from anima_core.models.attention import masked_attention
from anima_core.models.norms import T5RMSNorm
from anima_core.models.rope import apply_rope, cached_adapter_rope_cos_sin


@dataclass(frozen=True)
class LLMAdapterConfig:
    source_dim: int = 1024
    target_dim: int = 1024
    model_dim: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    vocab_size: int = 32128
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads


class LLMAdapterAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(query_dim, inner, bias=False)
        self.k_proj = nn.Linear(context_dim, inner, bias=False)
        self.v_proj = nn.Linear(context_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, query_dim, bias=False)
        self.q_norm = T5RMSNorm(head_dim)
        self.k_norm = T5RMSNorm(head_dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor | None,
        q_rope: tuple[torch.Tensor, torch.Tensor],
        k_rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        b, lq, _ = x.shape
        lk = context.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, lq, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(context).view(b, lk, self.num_heads, self.head_dim))
        v = self.v_proj(context).view(b, lk, self.num_heads, self.head_dim)
        q = apply_rope(q, *q_rope)
        k = apply_rope(k, *k_rope)
        out = masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).to(q.dtype), key_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, -1))


class LLMAdapterTransformerBlock(nn.Module):
    def __init__(self, config: LLMAdapterConfig):
        super().__init__()
        d = config.model_dim
        self.norm_self_attn = T5RMSNorm(d)
        self.self_attn = LLMAdapterAttention(d, d, config.num_heads, config.head_dim)
        self.norm_cross_attn = T5RMSNorm(d)
        self.cross_attn = LLMAdapterAttention(d, config.source_dim, config.num_heads, config.head_dim)
        self.norm_mlp = T5RMSNorm(d)
        hidden = int(d * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        target_mask: torch.Tensor | None,
        source_mask: torch.Tensor | None,
        target_rope: tuple[torch.Tensor, torch.Tensor],
        source_rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        y = self.norm_self_attn(x)
        x = x + self.self_attn(y, y, target_mask, target_rope, target_rope)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, source_mask, target_rope, source_rope)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    def __init__(self, config: LLMAdapterConfig):
        super().__init__()
        if config.model_dim != config.target_dim:
            raise ValueError("the adapter's model_dim must equal target_dim (no in_proj in released files)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.target_dim)
        self.blocks = nn.ModuleList(LLMAdapterTransformerBlock(config) for _ in range(config.num_layers))
        self.out_proj = nn.Linear(config.model_dim, config.target_dim)
        self.norm = T5RMSNorm(config.target_dim)

    def forward(
        self,
        source: torch.Tensor,
        target_input_ids: torch.Tensor,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
        apply_t5_attn_mask: bool = True,
    ) -> torch.Tensor:
        """[B, Lt, target_dim]; rows where the T5 mask is 0 are exactly 0.

        ``apply_t5_attn_mask=False`` ignores the T5 mask (keys and output rows), like a prompt run unpadded.
        """
        if not apply_t5_attn_mask:
            target_attention_mask = None
        x = self.embed(target_input_ids).to(source.dtype)
        head_dim = self.config.head_dim
        target_rope = cached_adapter_rope_cos_sin(head_dim, x.shape[1], x.device, x.dtype)
        source_rope = cached_adapter_rope_cos_sin(head_dim, source.shape[1], x.device, x.dtype)
        for block in self.blocks:
            x = block(x, source, target_attention_mask, source_attention_mask, target_rope, source_rope)
        x = self.norm(self.out_proj(x))
        if target_attention_mask is not None:
            x = x * target_attention_mask.to(device=x.device, dtype=x.dtype)[:, :, None]
        return x
