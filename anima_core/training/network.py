"""What the trainer asks of a network plugin (``register_networks``): the contract, checked by type checkers.

A network is also a ``torch.nn.Module`` (the trainer moves it with ``.to()`` and reads ``state_dict()``). Its
adapters are not children of the DiT or the text encoder, so their state dicts never change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Network(Protocol):
    @property
    def trains_text_encoder(self) -> bool:
        """True when some adapter sits on the text encoder (its outputs then cannot be cached)."""

    def apply_to(self) -> None:
        """Hook the adapters into the model; called once, before training."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def param_groups(self, optimizer_cfg: Any) -> list[dict]:
        """Optimizer parameter groups with their learning rates (component rates, LoRA+)."""

    def describe_groups(self) -> str:
        """One line per group for the run log."""

    def metadata(self) -> dict[str, str]:
        """The network's ``ss_*`` keys (module, dim, alpha, args) for the saved file."""

    def save(self, path: str | Path, *, metadata: dict[str, str] | None = None,
             dtype: torch.dtype | str | None = None) -> None:
        """Write the file ComfyUI loads, atomically."""

    def load_weights(self, path: str | Path) -> None:
        """Continue from a saved file (``network.weights``)."""

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False): ...

    def to(self, *args, **kwargs) -> nn.Module: ...


# create(network_cfg, *, dit, text_encoder, train_text_encoder) -> Network; loads network_cfg.weights when set.
NetworkFactory = Callable[..., Network]
