"""An exponential moving average of the trained weights (as OneTrainer and ai-toolkit offer).

After every ``every``-th optimizer step: ema ← decay · ema + (1 − decay) · weight, in float32, starting from
the weights training starts with. ``applied()`` puts the average into the network for a preview, a
validation pass or a save, and puts the trained weights back after, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class WeightEMA:
    def __init__(self, network: nn.Module, *, decay: float, every: int, device: torch.device):
        self.params = {name: p for name, p in network.named_parameters() if p.requires_grad}
        self.decay, self.every, self.device = decay, every, device
        self.shadow = {name: p.detach().to(device=device, dtype=torch.float32, copy=True) for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Called after optimizer step ``step`` (1-based); True when it updated the average."""
        if step % self.every:
            return False
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().to(self.device, torch.float32), 1.0 - self.decay)
        return True

    @contextmanager
    def applied(self):
        """The network holds the averaged weights inside the block and its trained weights again after it."""
        kept = {name: p.detach().clone() for name, p in self.params.items()}
        self._copy_into_params(self.shadow)
        try:
            yield
        finally:
            self._copy_into_params(kept)

    @torch.no_grad()
    def _copy_into_params(self, values: dict) -> None:
        for name, param in self.params.items():
            param.copy_(values[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = self.shadow.keys() - state["shadow"].keys()
        if missing:
            raise KeyError(f"the saved EMA lacks {len(missing)} weight(s), e.g. {sorted(missing)[0]}")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def build_ema(optimizer_cfg, network: nn.Module, device: torch.device) -> WeightEMA | None:
    if optimizer_cfg.ema_decay is None:
        return None
    where = torch.device("cpu") if optimizer_cfg.ema_device == "cpu" else device
    return WeightEMA(network, decay=optimizer_cfg.ema_decay, every=optimizer_cfg.ema_every_n_steps, device=where)
