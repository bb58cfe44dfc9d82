"""How much matmul work a training step is, so a run can say what fraction of the card it used.

Counted like ANCHORS.md's floor: matmuls and attention of the DiT and its LLM adapter, forward plus the
activation gradients (the base weights are frozen, so no weight gradients), one more forward per block with
checkpointing; element-wise work and the small LoRA matmuls are left out. For the 2B model at 1024² and
512 text tokens this gives 40.2 TFLOP (40.7 in ANCHORS.md) and 58.1 with checkpointing (59.0).
"""

from __future__ import annotations

import time

import torch

from anima_core.models.dit import CONTEXT_ROWS


def step_tflop(config, *, latent_hw: tuple[int, int], text_tokens: int, batch: int, checkpointing: bool) -> float:
    """TFLOP of one optimizer step for ``batch`` samples of one latent size, counted as the floor is.

    Which matmuls need a backward, with LoRA on the DiT blocks (sd-scripts' targets) and frozen base weights:
    the image path (projections of x, MLP, embedder and final layer) computes input gradients (1× its
    forward); the context path (cross-attention k/v over the context, the LLM adapter) has nothing upstream
    that trains, so no backward; attention computes gradients for q, k and v (2× its forward).
    """
    image_path, context_path, attention, ends, adapter = _forward_parts(config, latent_hw, text_tokens)
    block_forward = image_path + context_path + attention
    step = config.num_blocks * (2 * image_path + context_path + 3 * attention + (block_forward if checkpointing else 0))
    step += 2 * ends + adapter
    return batch * step / 1e12


def forward_tflop(config, *, latent_hw: tuple[int, int], text_tokens: int, batch: int) -> float:
    """TFLOP of one forward without grad (a base-model prediction of a slider step), counted as step_tflop."""
    image_path, context_path, attention, ends, adapter = _forward_parts(config, latent_hw, text_tokens)
    return batch * (config.num_blocks * (image_path + context_path + attention) + ends + adapter) / 1e12


def _forward_parts(config, latent_hw: tuple[int, int], text_tokens: int) -> tuple[int, int, int, int, int]:
    """Forward FLOP of one sample: a block's image path, context path and attention; the embedder and final
    layer; the LLM adapter (0 without one)."""
    d, c, hidden, a = config.model_channels, config.context_dim, config.mlp_hidden, config.adaln_lora_dim
    tokens = (latent_hw[0] // config.patch_spatial) * (latent_hw[1] // config.patch_spatial)
    rows = max(CONTEXT_ROWS, text_tokens)  # the DiT always sees the context padded to CONTEXT_ROWS
    image_path = 2 * tokens * (6 * d * d + 2 * d * hidden) + 2 * 3 * (d * a + a * 3 * d)
    context_path = 2 * rows * 2 * c * d
    attention = 4 * tokens * tokens * d + 4 * tokens * rows * d
    ends = 2 * tokens * d * ((config.in_channels + 1) * config.patch_features + config.out_channels * config.patch_features)
    adapter, total = config.llm_adapter, 0
    if adapter is not None:
        m, hidden_a = adapter.model_dim, int(adapter.model_dim * adapter.mlp_ratio)
        layer = 2 * text_tokens * (6 * m * m + 2 * m * hidden_a) + 2 * text_tokens * 2 * adapter.source_dim * m
        total = adapter.num_layers * (layer + 8 * text_tokens * text_tokens * m) + 2 * text_tokens * m * adapter.target_dim
    return image_path, context_path, attention, ends, total


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate of this device in ``dtype``: the denominator of the floor."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    repeats = 20 if device.type == "cuda" else 5
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def speed_report(tflop_done: float, seconds: float, device: torch.device, dtype: torch.dtype) -> tuple[dict, str]:
    """Achieved model math per second, and its share of this device's measured matmul rate (the floor):
    (the run_end fields, the log line)."""
    achieved = tflop_done / seconds
    peak = matmul_tflops(device, dtype)
    fields = {"tflops": round(achieved, 4), "floor_fraction": round(achieved / peak, 4)}
    return fields, (f"model math: {achieved:.3g} TFLOP/s, {100 * achieved / peak:.0f}% of this device's measured "
                    f"{str(dtype).removeprefix('torch.')} matmul rate ({peak:.3g} TFLOP/s)")
