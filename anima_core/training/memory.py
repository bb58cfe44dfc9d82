"""The memory-strategy contract, and how several strategies share the DiT's one block runner.

A run enables every registered strategy whose ``enabled(profile)`` is true, collects ``validate(profile)``
errors, and then, before the LoRA network exists, applies them with :func:`apply_memory_strategies`.

Several strategies want to wrap block execution (block swap decides where weights live, checkpointing
decides what is kept for backward). Wrapping order matters: block swap must stay outside checkpointing so
a recompute in backward never triggers swap traffic. :func:`wrap_block_runner` therefore composes wrappers
by ``layer`` (smaller = outer), whatever order the strategies were applied in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from anima_core.errors import AnimaError

BlockRunner = Callable[..., torch.Tensor]
RunnerWrapper = Callable[[BlockRunner], BlockRunner]

# Runner layers, outermost first.
SWAP_LAYER = 10
CHECKPOINT_LAYER = 20

_RUNNER_STACK_ATTR = "_memory_runner_stack"


class MemoryStrategyError(AnimaError):
    """A memory strategy cannot be used with this model or these settings."""


def option(profile: Any, table: str, name: str, default: Any = None) -> Any:
    """``profile.<table>.<name>``, or ``default`` when a (test) profile leaves it out."""
    return getattr(getattr(profile, table, None), name, default)


class MemoryStrategy(ABC):
    """Base class for memory strategies. Subclasses set ``name`` and override what they need.

    ``order``: apply order, smallest first. Strategies that change how weights are stored (fp8) come before
    ones that place weights (block swap), which copy whatever storage they find.
    ``places_weights``: the strategy moves the DiT to the device itself (only part of it, for block swap),
    so nobody else may call ``dit.to(device)`` afterwards.
    """

    name: str = ""
    order: int = 50
    places_weights: bool = False
    recomputes_forward: bool = False  # runs each block's forward again in backward (the FLOP count includes it)
    graph_capture: str | None = None  # why the strategy cannot run inside a captured CUDA graph; None: it can

    @classmethod
    def enabled(cls, profile) -> bool:
        return False

    @classmethod
    def validate(cls, profile) -> list[str]:
        return []

    def __init__(self, profile):
        self.profile = profile

    @abstractmethod
    def apply(self, dit: nn.Module, *, device: torch.device | str) -> None:
        """Change how the DiT stores or runs its blocks (before the network is created)."""

    def prepare_for_sampling(self, dit: nn.Module) -> None:
        """Called before previews (forward only, no grad)."""

    def prepare_for_training(self, dit: nn.Module) -> None:
        """Called after previews, before training steps resume."""


def apply_memory_strategies(
    strategies: Iterable[MemoryStrategy], dit: nn.Module, *, device: torch.device | str
) -> list[MemoryStrategy]:
    """Apply ``strategies`` in their ``order``; move the DiT to ``device`` unless one of them places weights.

    Returns the strategies in the order they were applied (the order to call the prepare_* hooks in).
    """
    ordered = sorted(strategies, key=lambda s: s.order)
    for strategy in ordered:
        strategy.apply(dit, device=device)
    if not any(s.places_weights for s in ordered):
        dit.to(device)
    return ordered


def chosen_strategies(profile, plugins) -> list[MemoryStrategy]:
    """The registered strategies the profile enables, or names in memory.extra_strategies, built for it."""
    registry = plugins.registry("register_memory_strategies")
    return [entry.obj(profile) for entry in registry.entries.values()
            if entry.obj.enabled(profile) or entry.name in profile.memory.extra_strategies]


def wrap_block_runner(dit: nn.Module, layer: int, wrapper: RunnerWrapper) -> None:
    """Add ``wrapper`` (inner runner -> runner) to the DiT's block runner at ``layer`` (smaller = outer)."""
    stack = getattr(dit, _RUNNER_STACK_ATTR, None)
    if stack is None:
        stack = {"base": dit.block_runner, "wrappers": []}
        setattr(dit, _RUNNER_STACK_ATTR, stack)
    stack["wrappers"].append((layer, wrapper))
    runner = stack["base"]
    for _, wrap in sorted(stack["wrappers"], key=lambda item: -item[0]):
        runner = wrap(runner)
    dit.set_block_runner(runner)
