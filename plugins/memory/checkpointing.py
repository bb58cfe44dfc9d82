"""Activation checkpointing per DiT block: plain, with the saved block inputs on the CPU, and the
"unsloth" variant (only the block input is kept, copied to CPU memory without blocking).

Only the DiT blocks are checkpointed; the patch embedder, timestep embedder, final layer and LLM adapter
are not (as in sd-scripts). Each block is one segment.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from anima_core.training.memory import CHECKPOINT_LAYER, BlockRunner, MemoryStrategy, option, wrap_block_runner

from .selective import wants_selective


def _wants_offload_to_cpu(profile) -> bool:
    return bool(option(profile, "memory", "cpu_offload_checkpointing", False))


def _wants_unsloth(profile) -> bool:
    return bool(option(profile, "memory", "unsloth_offload_checkpointing", False))


class GradientCheckpointing(MemoryStrategy):
    """Recompute each block in backward (non-reentrant); keeps each block's input on the device."""

    name = "gradient_checkpointing"
    recomputes_forward = True
    order = 20

    @classmethod
    def enabled(cls, profile) -> bool:
        # The offloading variants and selective checkpointing are checkpointing too and replace this one.
        return bool(option(profile, "memory", "gradient_checkpointing", False)) and not (
            _wants_offload_to_cpu(profile) or _wants_unsloth(profile) or wants_selective(profile)
        )

    def apply(self, dit, *, device) -> None:
        def wrap(inner: BlockRunner) -> BlockRunner:
            def run(index, block, x, *args):
                if not torch.is_grad_enabled():
                    return inner(index, block, x, *args)
                return checkpoint(inner, index, block, x, *args, use_reentrant=False)

            return run

        wrap_block_runner(dit, CHECKPOINT_LAYER, wrap)


class CpuOffloadCheckpointing(MemoryStrategy):
    """Checkpointing whose saved block inputs live in CPU memory (blocking copies). Turns checkpointing on."""

    name = "cpu_offload_checkpointing"
    recomputes_forward = True
    graph_capture = "moves each block's saved input to the CPU and back inside the step, a host copy a graph cannot hold"
    order = 20

    @classmethod
    def enabled(cls, profile) -> bool:
        return _wants_offload_to_cpu(profile)

    @classmethod
    def validate(cls, profile) -> list[str]:
        if _wants_unsloth(profile):
            return [
                "memory.cpu_offload_checkpointing and memory.unsloth_offload_checkpointing both offload the "
                "checkpointed activations; turn one of them off (unsloth_offload_checkpointing is faster)."
            ]
        return []

    def apply(self, dit, *, device) -> None:
        def wrap(inner: BlockRunner) -> BlockRunner:
            def run(index, block, x, *args):
                if not torch.is_grad_enabled():
                    return inner(index, block, x, *args)
                compute_device = x.device

                def on_device(x_saved, *rest):
                    return inner(index, block, x_saved.to(compute_device), *rest)

                # The checkpoint keeps only its inputs: a CPU copy of x (a copy even on a CPU, so what is kept
                # is never the caller's tensor), and the shared args.
                return checkpoint(on_device, x.to("cpu", copy=True), *args, use_reentrant=False)

            return run

        wrap_block_runner(dit, CHECKPOINT_LAYER, wrap)


def _offload(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``x``: pinned and non-blocking from CUDA, so the copy overlaps the next block."""
    if x.is_cuda:
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
        return host
    return x.detach().clone()


class _OffloadedBlock(torch.autograd.Function):
    """Runs a block without grad and keeps only its input (on the CPU); backward copies it back and recomputes.

    ``anchor`` is a grad-requiring empty tensor: LoRA parameters are not inputs of this function, so without it
    a block whose input needs no grad (block 0) would produce an output autograd never differentiates.
    """

    @staticmethod
    def forward(ctx, run, anchor, x, *args):
        ctx.run = run
        ctx.device = x.device
        ctx.x_host = _offload(x)
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return run(x, *args)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.x_host.to(ctx.device, non_blocking=True).requires_grad_(ctx.needs_input_grad[2])
        args = [
            a.detach().requires_grad_(need) if a is not None else None
            for a, need in zip(ctx.saved_tensors, ctx.needs_input_grad[3:])
        ]
        with torch.enable_grad():
            out = ctx.run(x, *args)
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        del ctx.x_host
        grads = [a.grad if a is not None and a.requires_grad else None for a in args]
        return (None, None, x.grad if x.requires_grad else None, *grads)


class UnslothOffloadCheckpointing(MemoryStrategy):
    """Keep only each block's input, on the CPU (pinned, non-blocking copies); recompute in backward.

    Our own implementation of the idea unsloth published. It turns checkpointing on by itself.
    """

    name = "unsloth_offload_checkpointing"
    recomputes_forward = True
    graph_capture = "copies saved activations to pinned CPU memory on a side stream inside the step, which a graph cannot hold"
    order = 20

    @classmethod
    def enabled(cls, profile) -> bool:
        return _wants_unsloth(profile)

    def apply(self, dit, *, device) -> None:
        anchor = torch.empty(0, requires_grad=True)

        def wrap(inner: BlockRunner) -> BlockRunner:
            def run(index, block, x, *args):
                if not torch.is_grad_enabled():
                    return inner(index, block, x, *args)

                def run_block(x_in, *rest):
                    return inner(index, block, x_in, *rest)

                return _OffloadedBlock.apply(run_block, anchor, x, *args)

            return run

        wrap_block_runner(dit, CHECKPOINT_LAYER, wrap)
