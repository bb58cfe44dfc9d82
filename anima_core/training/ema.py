"""An exponential moving average of the trained weights (as OneTrainer and ai-toolkit offer).

After every ``every``-th optimizer step: ema ← decay · ema + (1 − decay) · weight, in float32, starting from
the weights training starts with. ``applied()`` puts the average into the network for a preview, a
validation pass or a save, and puts the trained weights back after, bit for bit.

Sharded weights (training.fsdp): each process averages its own shards; a state holds the whole averages,
gathered from every process (each calls ``state_dict``) and split again on load.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from anima_core.training.sharding import local_part, part_of_whole, whole_from_part


class WeightEMA:
    def __init__(self, network: nn.Module, *, decay: float, every: int, device: torch.device):
        self.params = {name: p for name, p in network.named_parameters() if p.requires_grad}
        self.decay, self.every, self.device = decay, every, device
        self.shadow = {name: local_part(p.detach()).to(device=device, dtype=torch.float32, copy=True)
                       for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Called after optimizer step ``step`` (1-based); True when it updated the average."""
        if step % self.every:
            return False
        for name, param in self.params.items():
            self.shadow[name].lerp_(local_part(param.detach()).to(self.device, torch.float32), 1.0 - self.decay)
        return True

    @contextmanager
    def applied(self):
        """The network holds the averaged weights inside the block and its trained weights again after it."""
        kept = {name: local_part(p.detach()).clone() for name, p in self.params.items()}
        self._copy_into_params(self.shadow)
        try:
            yield
        finally:
            self._copy_into_params(kept)

    @torch.no_grad()
    def _copy_into_params(self, values: dict) -> None:
        for name, param in self.params.items():
            local_part(param).copy_(values[name])

    def state_dict(self) -> dict:
        shadow = {name: whole_from_part(self.params[name], v).cpu() for name, v in self.shadow.items()}
        return {"decay": self.decay, "every": self.every, "shadow": shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = self.shadow.keys() - state["shadow"].keys()
        if missing:
            raise KeyError(f"the saved EMA lacks {len(missing)} weight(s), e.g. {sorted(missing)[0]}")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(part_of_whole(self.params[name], value))


def build_ema(optimizer_cfg, network: nn.Module, device: torch.device) -> WeightEMA | None:
    if optimizer_cfg.ema_decay is None:
        return None
    where = torch.device("cpu") if optimizer_cfg.ema_device == "cpu" else device
    return WeightEMA(network, decay=optimizer_cfg.ema_decay, every=optimizer_cfg.ema_every_n_steps, device=where)
