"""blocks_to_swap: only ``num_blocks − S`` DiT blocks hold their weights on the device at any time.

Layout at the start of every forward pass: blocks ``0 … N−S−1`` on the device, ``N−S … N−1`` in CPU memory.

* Training forward: after block ``i < S`` runs, block ``i`` leaves and block ``N−S+i`` comes in.
* Training backward (mirror image): after block ``k ≥ N−S`` has its gradients, block ``k`` leaves and block
  ``k−(N−S)`` comes in, which restores the start layout.
* Forward only (sampling, or any pass without grad): a window of ``N−S`` blocks slides cyclically: after
  block ``i``, block ``(i+N−S) mod N`` comes in, so the pass ends in the start layout too.

The device holds exactly ``N−S`` block-sized slots; an incoming block is copied into the slot the
outgoing block just left. Every block keeps one permanent (pinned) CPU copy: "leaving" points the parameters
back at it. Frozen weights (a LoRA run) never change, so only host-to-device copies move data. Trained weights
(full fine-tuning) are updated on the device (the fused backward pass updates each one during its block's
backward) and written there by state loads and the EMA, so a trained block is copied back to its CPU copy
whenever it leaves (device-to-host, waited for): whichever of the two copies a parameter points at is current.
Host-to-device copies run on a side CUDA stream and are waited on just before the block is needed, so they
overlap the compute of the block(s) in between. ``S ≤ N−2`` keeps at least one block of compute between a copy and its use.

Backward ordering comes from two identity autograd functions per block: one on the block output waits for
the block's weights before any of its backward runs; one on the block inputs (x and every argument that
needs grad) fires only once all of the block's backward work is done, and triggers the move. Checkpointing
runs inside this wrapper, so recomputation in backward sees resident weights and never causes swap traffic,
which is what makes block swap safe to combine with activation offloading.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from anima_core.training.memory import (
    SWAP_LAYER,
    BlockRunner,
    MemoryStrategy,
    MemoryStrategyError,
    option,
    wrap_block_runner,
)

_SWAPPER_ATTR = "_block_swapper"


@dataclass(frozen=True)
class Move:
    """One swap: ``out`` leaves the device and ``into`` comes in, after block ``after``'s ``phase`` work."""

    phase: str  # "forward", "backward", "sampling" or "reconcile" (restoring the start layout; -1 = before block 0)
    after: int
    out: int
    into: int


@dataclass(frozen=True)
class SwapPlan:
    num_blocks: int
    swap: int

    @property
    def resident(self) -> int:
        return self.num_blocks - self.swap

    def start_layout(self) -> set[int]:
        return set(range(self.resident))

    def forward_moves(self) -> list[Move]:
        return [Move("forward", i, i, self.resident + i) for i in range(self.swap)]

    def backward_moves(self) -> list[Move]:
        return [Move("backward", k, k, k - self.resident) for k in range(self.num_blocks - 1, self.resident - 1, -1)]

    def sampling_moves(self) -> list[Move]:
        n = self.num_blocks
        return [Move("sampling", i, i, (i + self.resident) % n) for i in range(n)]


def check_swap_count(swap: int, num_blocks: int) -> None:
    if not 0 < swap <= num_blocks - 2:
        raise MemoryStrategyError(
            f"memory.blocks_to_swap = {swap}, but this DiT has {num_blocks} blocks, so at most {num_blocks - 2} can be "
            "swapped (two must stay on the GPU so a block's copy overlaps another block's compute). Lower "
            "memory.blocks_to_swap."
        )


class BlockSwapper:
    """Moves block weights between their CPU copies and ``N−S`` device slots, and logs every move."""

    def __init__(self, blocks: nn.ModuleList, swap: int, device: torch.device | str):
        self.plan = SwapPlan(len(blocks), swap)
        check_swap_count(swap, self.plan.num_blocks)
        self.device = torch.device(device)
        use_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if use_cuda else None
        self.params: list[list[nn.Parameter]] = []
        self.home: list[list[torch.Tensor]] = []
        self.trained = any(p.requires_grad for p in blocks.parameters())  # full fine-tuning: write updates back
        for index, block in enumerate(blocks):
            params = list(block.parameters())
            self.params.append(params)
            home = [p.data.to("cpu") for p in params]
            self.home.append([t.pin_memory() for t in home] if use_cuda else home)
            self._point_at(index, self.home[index])  # frees the loaded copy now: host memory holds one copy
            for module in block.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.to(self.device)
        shapes = [[(t.shape, t.dtype) for t in home] for home in self.home]
        if any(s != shapes[0] for s in shapes):
            raise MemoryStrategyError(
                "memory.blocks_to_swap needs DiT blocks of identical shapes; this model's differ. Set "
                "memory.blocks_to_swap = 0."
            )
        # One slot per resident block; an incoming block reuses the slot the outgoing one left.
        self.slots = [
            [torch.empty_like(t, device=self.device) for t in self.home[0]] for _ in range(self.plan.resident)
        ]
        self.free_slots = list(range(self.plan.resident - 1, -1, -1))
        self.slot_of: dict[int, int] = {}
        self.ready: dict[int, torch.cuda.Event] = {}
        self.released: dict[int, torch.cuda.Event] = {}
        self.log: list[Move] = []
        for index in sorted(self.plan.start_layout()):
            self._load(index)
        self.wait_all()

    def resident(self) -> set[int]:
        return set(self.slot_of)

    def move(self, phase: str, after: int, out: int, into: int) -> None:
        self._unload(out)
        self._load(into)
        self.log.append(Move(phase, after, out, into))

    def wait(self, index: int) -> None:
        """Make the compute stream wait until block ``index`` is on the device (a bug if it is not coming)."""
        if index not in self.slot_of:
            raise RuntimeError(
                f"block swap: block {index} is needed but not on the device (resident: {sorted(self.slot_of)})"
            )
        event = self.ready.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def wait_all(self) -> None:
        for index in list(self.ready):
            self.wait(index)

    def reconcile(self) -> None:
        """Restore the start layout if a pass ended elsewhere (a grad forward with no backward, say)."""
        target = self.plan.start_layout()
        leaving = sorted(self.resident() - target)
        coming = sorted(target - self.resident())
        for out, into in zip(leaving, coming):
            self.move("reconcile", -1, out, into)

    def _point_at(self, index: int, tensors: list[torch.Tensor]) -> None:
        for param, tensor in zip(self.params[index], tensors):
            param.data = tensor

    def _unload(self, index: int) -> None:
        slot = self.slot_of.pop(index)
        if self.trained:  # on the compute stream, after the updates queued there; the host waits for it
            for home, current in zip(self.home[index], self.slots[slot]):
                home.copy_(current)
        self._point_at(index, self.home[index])
        self.ready.pop(index, None)
        if self.stream is not None:
            # The slot may be overwritten only after the work already queued on the compute stream has used it.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.released[slot] = event
        self.free_slots.append(slot)

    def _load(self, index: int) -> None:
        slot = self.free_slots.pop()
        tensors = self.slots[slot]
        if self.stream is None:
            for dst, src in zip(tensors, self.home[index]):
                dst.copy_(src)
        else:
            with torch.cuda.stream(self.stream):
                released = self.released.pop(slot, None)
                if released is not None:
                    self.stream.wait_event(released)
                for dst, src in zip(tensors, self.home[index]):
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ready[index] = event
        self.slot_of[index] = slot
        self._point_at(index, tensors)


class _AfterBlockBackward(torch.autograd.Function):
    """Identity on the block's inputs; its backward runs once every gradient into the block's inputs exists."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


class _BeforeBlockBackward(torch.autograd.Function):
    """Identity on the block's output; its backward runs before any of the block's own backward."""

    @staticmethod
    def forward(ctx, callback, x):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return None, grad


class BlockSwap(MemoryStrategy):
    name = "blocks_to_swap"
    order = 30
    places_weights = True
    graph_capture = "copies blocks between the CPU and the GPU on its own stream during the step, which a replayed graph would skip"

    @classmethod
    def enabled(cls, profile) -> bool:
        return int(option(profile, "memory", "blocks_to_swap", 0) or 0) > 0

    def __init__(self, profile):
        super().__init__(profile)
        self.swap = int(option(profile, "memory", "blocks_to_swap", 0))
        self.swapper: BlockSwapper | None = None
        self.sampling = False

    def apply(self, dit, *, device) -> None:
        check_swap_count(self.swap, len(dit.blocks))
        for name, child in dit.named_children():
            if child is not dit.blocks:
                child.to(device)
        for collection in (dit._parameters, dit._buffers):
            for key, tensor in collection.items():
                if tensor is not None:
                    tensor.data = tensor.data.to(device)
        self.swapper = BlockSwapper(dit.blocks, self.swap, device)
        setattr(dit, _SWAPPER_ATTR, self.swapper)
        wrap_block_runner(dit, SWAP_LAYER, self._wrap)

    def prepare_for_sampling(self, dit) -> None:
        self.sampling = True

    def prepare_for_training(self, dit) -> None:
        self.sampling = False

    def _wrap(self, inner: BlockRunner) -> BlockRunner:
        swapper = self.swapper
        plan = swapper.plan

        def run(index, block, x, *args):
            if index == 0:
                swapper.reconcile()
            swapper.wait(index)
            training = torch.is_grad_enabled() and not self.sampling
            if training:
                x, args = self._mark_inputs(index, x, args)
            out = inner(index, block, x, *args)
            if training:
                if out.requires_grad:
                    out = _BeforeBlockBackward.apply(partial(swapper.wait, index), out)
                if index < plan.swap:
                    swapper.move("forward", index, index, plan.resident + index)
            else:
                swapper.move("sampling", index, index, (index + plan.resident) % plan.num_blocks)
            return out

        return run

    def _mark_inputs(self, index: int, x: torch.Tensor, args: tuple) -> tuple[torch.Tensor, tuple]:
        positions = [i for i, t in enumerate((x, *args)) if t is not None and t.requires_grad]
        if not positions:
            return x, args
        values = [x, *args]
        marked = _AfterBlockBackward.apply(partial(self._after_backward, index), *(values[i] for i in positions))
        for i, tensor in zip(positions, marked):
            values[i] = tensor
        return values[0], tuple(values[1:])

    def _after_backward(self, index: int) -> None:
        plan = self.swapper.plan
        if index >= plan.resident:
            self.swapper.move("backward", index, index, index - plan.resident)
