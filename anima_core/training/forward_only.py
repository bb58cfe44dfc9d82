"""Forward passes in the middle of training (previews, validation loss) that leave training exactly as it was.

The CPU and CUDA random states are saved and restored, the DiT and the LoRA run in eval mode (no dropout) and
go back to train mode, and memory strategies switch to their forward-only layout and back, so the one model
copy serves both: no second copy is ever loaded.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def preserved_rng():
    """Training's random streams are exactly where they were after the block, whatever it drew."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def forward_only_mode(trainer):
    """Eval mode for the DiT and the LoRA (no dropout), memory strategies in forward-only mode; undone after."""
    network = trainer.network if isinstance(trainer.network, nn.Module) else None
    modes = [(module, module.training) for module in (trainer.dit, network) if module is not None]
    for module, _ in modes:
        module.eval()
    for strategy in trainer.strategies:
        strategy.prepare_for_sampling(trainer.dit)
    try:
        yield
    finally:
        for strategy in reversed(trainer.strategies):
            strategy.prepare_for_training(trainer.dit)
        for module, training in modes:
            module.train(training)
