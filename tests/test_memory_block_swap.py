"""Block swap bookkeeping: the planned schedule is sound, and the engine moves each block exactly as planned.

On CPU the "device" slots are separate CPU tensors, so weights really are copied and a block that runs on
the wrong storage is detected.
"""

from __future__ import annotations

import pytest
import torch

from anima_core.training.memory import MemoryStrategyError, apply_memory_strategies, wrap_block_runner
from anima_plugins.memory import (
    BlockSwap,
    BlockSwapper,
    GradientCheckpointing,
    Move,
    SwapPlan,
    UnslothOffloadCheckpointing,
)

from test_memory_strategies import attach_lora, batch, build_dit, profile, train_step


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def simulate(plan: SwapPlan, order: list[int], moves: list[Move], phase: str, layout: set[int]) -> set[int]:
    """Run blocks in ``order`` applying ``moves`` after each; every block must be resident when it runs."""
    by_block = {m.after: m for m in moves}
    assert len(by_block) == len(moves), "one move per block at most"
    for index in order:
        assert index in layout, f"{phase}: block {index} runs while not resident ({sorted(layout)})"
        move = by_block.get(index)
        if move is not None:
            assert move.out in layout and move.into not in layout
            layout = (layout - {move.out}) | {move.into}
            # The block that comes in is not needed by the very next block: its copy overlaps compute.
            step = 1 if phase != "backward" else -1
            assert move.into != index + step
        assert len(layout) == plan.resident
    return layout


@pytest.mark.parametrize("num_blocks", [4, 6, 20, 28, 36])
def test_planned_schedules_keep_every_needed_block_resident(num_blocks):
    for swap in range(1, num_blocks - 1):
        plan = SwapPlan(num_blocks, swap)
        start = plan.start_layout()
        assert start == set(range(num_blocks - swap))
        end_forward = simulate(plan, list(range(num_blocks)), plan.forward_moves(), "forward", start)
        assert end_forward == set(range(swap, num_blocks))
        backward_order = list(range(num_blocks - 1, -1, -1))
        assert simulate(plan, backward_order, plan.backward_moves(), "backward", end_forward) == start
        assert simulate(plan, list(range(num_blocks)), plan.sampling_moves(), "sampling", start) == start
        # Every swapped block comes in exactly once per forward and once per backward.
        assert sorted(m.into for m in plan.forward_moves()) == list(range(num_blocks - swap, num_blocks))
        assert sorted(m.into for m in plan.backward_moves()) == list(range(swap))


def test_documented_maxima():
    for blocks, maximum in ((28, 26), (36, 34), (20, 18)):
        dit_blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2).requires_grad_(False) for _ in range(blocks))
        BlockSwapper(dit_blocks, maximum, "cpu")
        with pytest.raises(MemoryStrategyError, match=f"at most {maximum}"):
            BlockSwapper(dit_blocks, maximum + 1, "cpu")


def swapped_dit(num_blocks: int, swap: int, checkpointing=None, lora_blocks=None, swap_first=False):
    dit = build_dit(num_blocks)
    strategy = BlockSwap(profile(blocks_to_swap=swap))
    if swap_first:
        strategy.apply(dit, device="cpu")
    if checkpointing is not None:
        checkpointing(profile(gradient_checkpointing=True, unsloth_offload_checkpointing=True)).apply(dit, device="cpu")
    if not swap_first:
        strategy.apply(dit, device="cpu")
    swapper = strategy.swapper
    slot_storage = {t.data_ptr() for slot in swapper.slots for t in slot}
    runs = []

    def check_storage(inner):
        # Innermost runner: sees every block execution, including recomputation in backward.
        def run(index, block, x, *args):
            params = list(block.parameters())
            assert all(p.data_ptr() in slot_storage for p in params), f"block {index} runs off-device"
            for other, home in enumerate(swapper.home):
                if other not in swapper.resident():
                    assert all(p.data_ptr() == h.data_ptr() for p, h in zip(swapper.params[other], home))
            assert len(swapper.resident()) == num_blocks - swap
            runs.append((index, torch.is_grad_enabled()))
            return inner(index, block, x, *args)

        return run

    wrap_block_runner(dit, 99, check_storage)
    loras = attach_lora(dit, lora_blocks)
    return dit, strategy, loras, runs


@pytest.mark.parametrize("num_blocks,swap", [(6, 4), (6, 2), (4, 2)])
@pytest.mark.parametrize(
    "checkpointing,swap_first",
    [
        (None, False),
        (GradientCheckpointing, False),
        (GradientCheckpointing, True),
        (UnslothOffloadCheckpointing, False),
        (UnslothOffloadCheckpointing, True),
    ],
)
def test_training_and_sampling_move_each_block_exactly_as_planned(num_blocks, swap, checkpointing, swap_first):
    """Whatever order the strategies are applied in, checkpointing runs inside block swap."""
    dit, strategy, loras, runs = swapped_dit(num_blocks, swap, checkpointing, swap_first=swap_first)
    plan = strategy.swapper.plan
    for step in range(2):
        train_step(dit, loras, seed=step)
    per_step = plan.forward_moves() + plan.backward_moves()
    assert strategy.swapper.log == per_step * 2
    if checkpointing is not None:
        # Recomputation in backward ran every block again, on device storage, without any swap traffic.
        assert len(runs) == 2 * 2 * num_blocks
        assert [i for i, grad in runs if grad][-num_blocks:] == list(range(num_blocks - 1, -1, -1))

    strategy.prepare_for_sampling(dit)
    with torch.no_grad():
        x, t, context, _ = batch()
        dit(x, t, context)
        dit(x, t, context)
    strategy.prepare_for_training(dit)
    assert strategy.swapper.log[len(per_step) * 2 :] == plan.sampling_moves() * 2
    assert strategy.swapper.resident() == plan.start_layout()


def test_forward_without_backward_is_reconciled_before_the_next_pass():
    dit, strategy, loras, _ = swapped_dit(6, 4)
    x, t, context, _ = batch()
    dit(x, t, context)  # grad enabled, but no backward follows
    assert strategy.swapper.resident() == set(range(4, 6))
    log_before = len(strategy.swapper.log)
    reference = build_dit(6)
    ref_loss, ref_grads = train_step(reference, attach_lora(reference))
    loss, grads = train_step(dit, loras)
    reconciles = [m for m in strategy.swapper.log[log_before:] if m.phase == "reconcile"]
    assert {m.into for m in reconciles} == {0, 1}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    assert strategy.swapper.resident() == strategy.swapper.plan.start_layout()


def test_untrained_early_blocks_skip_their_backward_moves_and_recover():
    """With no LoRA in blocks 0-1 and no context grad, block 2's input needs no grad: its backward move cannot
    fire, so the next pass puts the start layout back (and logs it) before block 0 runs."""
    dit, strategy, loras, _ = swapped_dit(6, 4, lora_blocks={2, 3, 4, 5})
    train_step(dit, loras, context_grad=False)
    train_step(dit, loras, context_grad=False)
    phases = [m.phase for m in strategy.swapper.log]
    assert "reconcile" in phases
    assert all(m.after != 2 for m in strategy.swapper.log if m.phase == "backward")


def test_without_block_swap_the_whole_dit_moves_to_the_device():
    """("meta" stands in for the GPU; block swap itself cannot be placed on meta: parameters cannot switch
    between meta and CPU storage the way they switch between CUDA and CPU.)"""
    dit = build_dit(4)
    apply_memory_strategies([GradientCheckpointing(profile(gradient_checkpointing=True))], dit, device="meta")
    assert {p.device.type for p in dit.parameters()} == {"meta"}
