"""Selective activation checkpointing: between keeping everything and recomputing every block.

Each DiT block is one non-reentrant checkpoint whose policy (torch's selective-checkpoint API) keeps the outputs
of the expensive ops, the matrix products and attention, and recomputes everything else in backward: norms,
modulation, RoPE, GELU, casts, the LoRA's dropouts and scaling. A matrix product whose reduction is short (the
LoRA up-projection, whose reduction is the rank) is recomputed too: its output is as large as the layer's and
costs a sliver of it to make again. Memory per block: its input plus the kept outputs, instead of everything
autograd saves (no checkpointing) or the input alone (``gradient_checkpointing``); the backward pass recomputes
only the cheap elementwise work, where full checkpointing runs every block's forward again.

Selected by ``memory.selective_checkpointing`` (read with a default of false, so a profile schema without the
field leaves it off) or by naming it in ``memory.extra_strategies``. It replaces ``gradient_checkpointing``
when both are set; the offloading variants keep a different set of tensors and cannot be combined with it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from anima_core.training.memory import CHECKPOINT_LAYER, BlockRunner, MemoryStrategy, option, wrap_block_runner

NAME = "selective_checkpointing"
_aten = torch.ops.aten
MATMULS = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm}
ATTENTION = {
    getattr(_aten, name)
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if hasattr(_aten, name)
}
# A product is recomputed when its reduction is shorter than this share of the model width.
SHORT_REDUCTION = 1 / 8


def wants_selective(profile) -> bool:
    """The profile asks for selective checkpointing (its field, or the strategy named in extra_strategies)."""
    return bool(option(profile, "memory", NAME, False)) or NAME in (option(profile, "memory", "extra_strategies", ()) or ())


def _is_attention(func) -> bool:
    if func.overloadpacket in ATTENTION:
        return True
    # flash-attn and xformers register their kernels as custom ops: keep their forward outputs too.
    name = func.overloadpacket.__name__
    return ("flash_attn" in name or "attention" in name) and "backward" not in name and func.namespace != "aten"


def matmul_policy(min_reduction: int):
    """The policy: keep matrix products reducing over at least ``min_reduction`` elements and attention outputs;
    recompute everything else."""

    def policy(ctx, func, *args, **kwargs):
        if func.overloadpacket in MATMULS:
            reduction = args[-2].shape[-1]  # (bias,) a, b: a's last axis is the reduction
            return CheckpointPolicy.MUST_SAVE if reduction >= min_reduction else CheckpointPolicy.PREFER_RECOMPUTE
        if _is_attention(func):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


class SelectiveCheckpointing(MemoryStrategy):
    """Checkpoint each DiT block, keeping its matmul and attention outputs; recompute the elementwise work."""

    name = NAME
    order = 20

    @classmethod
    def enabled(cls, profile) -> bool:
        return bool(option(profile, "memory", NAME, False))

    @classmethod
    def validate(cls, profile) -> list[str]:
        offload = [key for key in ("cpu_offload_checkpointing", "unsloth_offload_checkpointing")
                   if option(profile, "memory", key, False)]
        if offload:
            return [
                f"memory.selective_checkpointing and memory.{offload[0]} both decide what each block keeps for "
                "backward; turn one of them off (selective keeps matmul outputs on the GPU, the offloading variants "
                "keep only the block input, in CPU memory)."
            ]
        return []

    def apply(self, dit, *, device) -> None:
        self.policy = matmul_policy(max(1, int(dit.config.model_channels * SHORT_REDUCTION)))
        contexts = partial(create_selective_checkpoint_contexts, self.policy)

        def wrap(inner: BlockRunner) -> BlockRunner:
            def run(index, block, x, *args):
                if not torch.is_grad_enabled():
                    return inner(index, block, x, *args)
                return checkpoint(inner, index, block, x, *args, use_reentrant=False, context_fn=contexts)

            return run

        wrap_block_runner(dit, CHECKPOINT_LAYER, wrap)
