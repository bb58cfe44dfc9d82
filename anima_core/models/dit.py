"""The Anima DiT (MiniTrainDIT): AdaLN-LoRA modulation, 3D RoPE, padding-mask channel, patchify/unpatchify.

Module paths equal the released checkpoint's keys without the ``net.`` prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anima_core.models.attention import AttentionBackend
from anima_core.models.llm_adapter import LLMAdapter, LLMAdapterConfig
from anima_core.models.norms import RMSNorm, norm_modulate
from anima_core.models.rope import apply_rope, cached_dit_rope_cos_sin

# Training and sampling always give the DiT 512 context rows; zero rows still take softmax weight, so the count matters.
CONTEXT_ROWS = 512


@dataclass(frozen=True)
class DiTConfig:
    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_hidden: int = 8192
    adaln_lora_dim: int = 256
    context_dim: int = 1024
    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    rope_ratios: tuple[float, float, float] = (1.0, 4.0, 4.0)  # (t, h, w) extrapolation ratios
    llm_adapter: LLMAdapterConfig | None = LLMAdapterConfig()

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def patch_features(self) -> int:
        return self.patch_spatial * self.patch_spatial * self.patch_temporal


BlockRunner = Callable[..., torch.Tensor]


def default_block_runner(index: int, block: Block, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
    return block(x, *args)


def patchify(x: torch.Tensor, p: int, r: int) -> torch.Tensor:
    """[B, C, T·r, H·p, W·p] -> [B, T, H, W, C·r·p·p], feature index c·(r·p·p) + ri·p·p + m·p + n (channel slowest)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // r, r, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t // r, h // p, w // p, c * r * p * p)


def unpatchify(x: torch.Tensor, p: int, r: int, channels: int) -> torch.Tensor:
    """[B, T, H, W, p·p·r·C] -> [B, C, T·r, H·p, W·p], feature index (p1·p + p2)·r·C + ri·C + c (channel fastest)."""
    b, t, h, w, _ = x.shape
    x = x.reshape(b, t, h, w, p, p, r, channels)
    return x.permute(0, 7, 1, 6, 2, 4, 3, 5).reshape(b, channels, t * r, h * p, w * p)


def timestep_sinusoid(sigmas: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., dim] float32 = [cos(σ·f), sin(σ·f)], f_k = 10000^(-k/(dim/2)). σ is the raw flow time, not ×1000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigmas.device) / half)
    angles = sigmas.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Patchify(nn.Module):
    def __init__(self, spatial: int, temporal: int):
        super().__init__()
        self.spatial = spatial
        self.temporal = temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.spatial, self.temporal)


class PatchEmbed(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        in_features = (config.in_channels + 1) * config.patch_features  # +1: the padding-mask channel
        self.proj = nn.Sequential(
            Patchify(config.patch_spatial, config.patch_temporal),
            nn.Linear(in_features, config.model_channels, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SinusoidEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, sigmas: torch.Tensor) -> torch.Tensor:
        return timestep_sinusoid(sigmas, self.dim)


class TimestepEmbedding(nn.Module):
    """sinusoid -> the AdaLN-LoRA term [.., 3D] shared by every modulation layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


def adaln_modulation(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, chunks * dim, bias=False))


class Attention(nn.Module):
    """Multi-head attention with per-head RMSNorm on q and k. RoPE only when cos/sin are given (self-attention)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.backend = AttentionBackend()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope_cos: torch.Tensor | None = None,
        rope_sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(context).view(b, m, self.num_heads, self.head_dim))
        v = self.v_proj(context).view(b, m, self.num_heads, self.head_dim)
        if rope_cos is not None:
            q = apply_rope(q, rope_cos, rope_sin)
            k = apply_rope(k, rope_cos, rope_sin)
        out = self.backend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.output_proj(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.activation(self.layer1(x)))


def modulate(x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift``; the DiT's LayerNorms (no affine weights) go through ``norm_modulate``."""
    plain_layer_norm = isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
    if plain_layer_norm and norm.weight is None and norm.bias is None:
        return norm_modulate(x, shift, scale, norm.eps)
    return norm(x) * (1 + scale) + shift


class Block(nn.Module):
    """One DiT block: self-attention, cross-attention and MLP, each AdaLN-modulated and gated."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.model_channels
        self.self_attn = Attention(d, d, config.num_heads, config.head_dim)
        self.cross_attn = Attention(d, config.context_dim, config.num_heads, config.head_dim)
        self.mlp = FeedForward(d, config.mlp_hidden)
        self.layer_norm_self_attn = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.layer_norm_cross_attn = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.layer_norm_mlp = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaln_modulation_self_attn = adaln_modulation(d, config.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_modulation(d, config.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = adaln_modulation(d, config.adaln_lora_dim, 3)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        emb: torch.Tensor,
        adaln_lora: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, S, D] (S = tokens per frame); emb and adaln_lora [B, 1 or T, 1, D or 3D]."""
        b, t, s, d = x.shape

        shift, scale, gate = (self.adaln_modulation_self_attn(emb) + adaln_lora).chunk(3, dim=-1)
        y = modulate(x, self.layer_norm_self_attn, shift, scale).reshape(b, t * s, d)
        x = x + gate * self.self_attn(y, y, rope_cos, rope_sin).reshape(b, t, s, d)

        shift, scale, gate = (self.adaln_modulation_cross_attn(emb) + adaln_lora).chunk(3, dim=-1)
        y = modulate(x, self.layer_norm_cross_attn, shift, scale).reshape(b, t * s, d)
        x = x + gate * self.cross_attn(y, context).reshape(b, t, s, d)

        shift, scale, gate = (self.adaln_modulation_mlp(emb) + adaln_lora).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(x, self.layer_norm_mlp, shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.model_channels
        self.layer_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, config.patch_features * config.out_channels, bias=False)
        self.adaln_modulation = adaln_modulation(d, config.adaln_lora_dim, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[..., : 2 * d]).chunk(2, dim=-1)
        return self.linear(modulate(x, self.layer_norm, shift, scale))


def pad_context_rows(context: torch.Tensor, rows: int = CONTEXT_ROWS) -> torch.Tensor:
    if context.shape[1] >= rows:
        return context
    return F.pad(context, (0, 0, 0, rows - context.shape[1]))


class AnimaDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.model_channels
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = nn.Sequential(SinusoidEmbedding(d), TimestepEmbedding(d))
        self.t_embedding_norm = RMSNorm(d)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.final_layer = FinalLayer(config)
        self.llm_adapter = LLMAdapter(config.llm_adapter) if config.llm_adapter is not None else None
        self.block_runner: BlockRunner = default_block_runner
        # Default for calls that do not say; False ignores the T5 mask in the adapter (see adapt_context).
        self.apply_t5_attn_mask = True

    def set_block_runner(self, fn: BlockRunner | None) -> None:
        """Replace how blocks run: ``fn(index, block, x, *args) -> x``; None restores ``block(x, *args)``."""
        self.block_runner = fn if fn is not None else default_block_runner

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every block in place (off unless called; ``options`` go to torch.compile).

        Regional compilation: the blocks share one compiled graph, state-dict keys stay the same, and block
        runners (checkpointing, block swap) keep running outside the compiled code.
        """
        for block in self.blocks:
            block.compile(**options)

    def eager_blocks(self) -> None:
        """Undo :meth:`compile_blocks`: every block runs eagerly again (a failed compile's fallback)."""
        for block in self.blocks:
            block._compiled_call_impl = None

    def set_attention_backend(self, name: str, split: bool = False) -> None:
        """"sdpa" or "flash" (falls back to SDPA with a warning when flash-attn is missing) for DiT attention."""
        backend = AttentionBackend.create(name, split)
        for block in self.blocks:
            block.self_attn.backend = backend
            block.cross_attn.backend = backend

    def adapt_context(
        self,
        qwen_states: torch.Tensor,
        target_input_ids: torch.Tensor,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
        apply_t5_attn_mask: bool | None = None,
    ) -> torch.Tensor:
        """Run the LLM adapter: Qwen3 states + T5 ids -> context [B, max(512, Lt), context_dim].

        With the T5 mask applied (the reference behaviour) padded T5 positions are masked keys in the adapter's
        self-attention and their output rows are zero; ``apply_t5_attn_mask=False`` treats them as tokens.
        """
        if self.llm_adapter is None:
            raise ValueError(
                "this DiT has no LLM adapter: load it with load_dit(..., llm_adapter_path=...) or pass an adapted context"
            )
        if apply_t5_attn_mask is None:
            apply_t5_attn_mask = self.apply_t5_attn_mask
        context = self.llm_adapter(
            qwen_states, target_input_ids, target_attention_mask, source_attention_mask, apply_t5_attn_mask
        )
        return pad_context_rows(context)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        target_input_ids: torch.Tensor | None = None,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
        apply_t5_attn_mask: bool | None = None,
    ) -> torch.Tensor:
        """Velocity [B, 16, T, H, W] for latents x [B, 16, T, H, W] at σ = timesteps ([B] or [B, T], in [0, 1]).

        With ``target_input_ids`` the context is raw Qwen3 states and the adapter runs first; otherwise it is an
        already adapted context [B, N, context_dim].
        """
        cfg = self.config
        if target_input_ids is not None:
            context = self.adapt_context(
                context, target_input_ids, target_attention_mask, source_attention_mask, apply_t5_attn_mask
            )
        b, _, t, h, w = x.shape
        p, r = cfg.patch_spatial, cfg.patch_temporal
        if h % p or w % p or t % r:
            raise ValueError(f"latent size {t}x{h}x{w} must be divisible by the patch size {r}x{p}x{p}")
        dtype = self.x_embedder.proj[1].weight.dtype
        x = x.to(dtype)
        if padding_mask is None:
            padding_mask = x.new_zeros(b, 1, h, w)
        elif padding_mask.shape[-2:] != (h, w):
            padding_mask = F.interpolate(padding_mask.to(dtype), size=(h, w), mode="nearest")
        x = torch.cat([x, padding_mask.to(dtype)[:, :, None].expand(b, 1, t, h, w)], dim=1)

        tokens = self.x_embedder(x)
        grid = tokens.shape[1:4]
        tokens = tokens.reshape(b, grid[0], grid[1] * grid[2], -1)

        sigmas = timesteps.reshape(b, -1)  # [B, 1] or [B, T]
        sinusoid = self.t_embedder[0](sigmas).to(dtype)
        adaln_lora = self.t_embedder[1](sinusoid)[:, :, None]
        emb = self.t_embedding_norm(sinusoid)[:, :, None]

        rope_cos, rope_sin = cached_dit_rope_cos_sin(cfg.head_dim, tuple(grid), cfg.rope_ratios, tokens.device)
        context = context.to(dtype)
        for index, block in enumerate(self.blocks):
            tokens = self.block_runner(index, block, tokens, context, emb, adaln_lora, rope_cos, rope_sin)

        out = self.final_layer(tokens, emb, adaln_lora).reshape(b, *grid, -1)
        return unpatchify(out, p, r, cfg.out_channels)
