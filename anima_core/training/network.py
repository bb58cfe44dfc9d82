"""What the trainer asks of a network plugin (``register_networks``): the contract, checked by type checkers.

A network is also a ``torch.nn.Module`` (the trainer moves it with ``.to()`` and reads ``state_dict()``). Its
adapters are not children of the DiT or the text encoder, so their state dicts never change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from anima_core.errors import AnimaError


@runtime_checkable
class Network(Protocol):
    @property
    def trains_text_encoder(self) -> bool:
        """True when some adapter sits on the text encoder (its outputs then cannot be cached)."""

    def apply_to(self) -> None:
        """Hook the adapters into the model; called once, before training."""

    def set_multiplier(self, multiplier: float) -> None:
        """Scale every adapter's output by ``multiplier`` (1.0: as the saved file loads). The trainer sets a
        batch's dataset ``network_multiplier`` for its forward and backward; a network without this method
        trains only datasets at 1.0."""

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


@contextlib.contextmanager
def applied_at(network: Network, multiplier: float) -> Iterator[None]:
    """The network's adapters at ``multiplier`` inside the block, back at 1.0 after it. sd-scripts sets the
    batch's dataset ``network_multiplier`` before each batch's forward; here the value never outlives the
    batch, so previews, validation and saves see the LoRA at 1.0, the strength ComfyUI loads it at."""
    if multiplier == 1.0:
        yield
        return
    network.set_multiplier(multiplier)
    try:
        yield
    finally:
        network.set_multiplier(1.0)


def refuse_unsupported_multipliers(network: Any, module: str, data: Any) -> None:
    """A dataset ``network_multiplier`` other than 1.0 needs a network with ``set_multiplier``: without it
    the value would do nothing, so the run is refused before training starts."""
    if hasattr(network, "set_multiplier"):
        return
    parts = [data] + ([data.validation] if getattr(data, "validation", None) is not None else [])
    values = sorted({ds.spec.network_multiplier for part in parts for ds in part.datasets} - {1.0})
    if values:
        raise AnimaError(
            f"the dataset config sets network_multiplier {', '.join(map(str, values))}, but network.module {module!r} "
            "cannot scale its adapters (it has no set_multiplier). Remove network_multiplier from the dataset config "
            "or use network.module = 'lora_anima' or 'lycoris'."
        )
