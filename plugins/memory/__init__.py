"""Built-in memory strategies: checkpointing (plain, selective, CPU-offloaded, unsloth-style), block swap and fp8 base.

Registered in apply order (``MemoryStrategy.order``): fp8 changes how weights are stored before block swap
copies them; checkpointing wraps the block runner inside block swap whatever the order.
"""

from anima_core.hookspecs import hookimpl

from .block_swap import BlockSwap, BlockSwapper, Move, SwapPlan
from .checkpointing import CpuOffloadCheckpointing, GradientCheckpointing, UnslothOffloadCheckpointing
from .fp8 import Fp8Base, dequantize_weight, quantize_weight
from .selective import SelectiveCheckpointing

STRATEGIES = (Fp8Base, GradientCheckpointing, SelectiveCheckpointing, CpuOffloadCheckpointing,
              UnslothOffloadCheckpointing, BlockSwap)

__all__ = [
    "STRATEGIES",
    "BlockSwap",
    "BlockSwapper",
    "CpuOffloadCheckpointing",
    "Fp8Base",
    "GradientCheckpointing",
    "Move",
    "SelectiveCheckpointing",
    "SwapPlan",
    "UnslothOffloadCheckpointing",
    "dequantize_weight",
    "quantize_weight",
]


@hookimpl
def register_memory_strategies(register):
    for strategy in STRATEGIES:
        register(strategy.name, strategy)
