"""The training target: what a run trains, and so what the optimizer sees, what a state holds and what a save
writes. The loop, the optimizer step, the NaN guard and the saves ask only this; a new kind of training (the
model's own weights instead of a network over them) is a new target, not a branch in each of them.

Targets: :class:`NetworkTarget`, a network plugin (LoRA, LyCORIS, ...) over frozen weights, and
``full_weights.FullWeightsTarget``, the DiT's own weights (full fine-tuning).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from anima_core.config.full_rules import FULL
from anima_core.training.network import applied_at, refuse_unsupported_multipliers


class TrainingTarget(Protocol):
    file_kind: str  # the `save` event's kind ("lora", "model")
    file_label: str  # how messages name the saved file ("LoRA", "model")
    default_save_dtype: torch.dtype  # the saved tensors' dtype when saving.save_precision is unset
    module: nn.Module  # what is trained
    trains_text_encoder: bool

    @staticmethod
    def prepare_dit(profile, dit) -> None: ...  # the loaded DiT, before the memory strategies place it

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def param_groups(self, optimizer_cfg) -> list[dict]: ...

    def describe_groups(self) -> str: ...

    def batch_multiplier(self, multiplier: float) -> contextlib.AbstractContextManager: ...

    def metadata(self) -> dict[str, str]: ...

    def save(self, path: Path, *, metadata: dict[str, str], dtype) -> None: ...

    def self_check(self, path: Path): ...

    collective: bool  # saves and states need every process (a sharded target gathers its tensors)

    def empty_slice(self, device, autocast) -> None: ...  # this process's slice of a batch is empty

    def sum_gradients(self, params) -> None: ...  # after the step's backward passes: the processes' sum

    def state_dicts(self, optimizer) -> tuple[dict, dict]: ...  # (weights, optimizer state) for a state folder

    def load_state_dicts(self, optimizer, weights: dict, optimizer_state: dict) -> None: ...


class NetworkTarget:
    """A network plugin's adapters over the frozen DiT (and text encoder): the model's weights never change,
    the network is trained, saved as the file ComfyUI loads, and checked after each save."""

    file_kind = "lora"
    file_label = "LoRA"
    default_save_dtype = torch.float32  # saving.save_precision unset
    collective = False  # the main process saves alone

    @staticmethod
    def prepare_dit(profile, dit) -> None:
        """Nothing: the DiT stays frozen as loaded."""

    def __init__(self, profile, plugins, *, dit, text_encoder, data, device, log, processes):
        cfg = profile.network
        create = plugins.registry("register_networks").get(cfg.module)
        train_te = not cfg.train_unet_only
        network = create(cfg, dit=dit, text_encoder=text_encoder if train_te else None, train_text_encoder=train_te)
        refuse_unsupported_multipliers(network, cfg.module, data)
        network.apply_to()
        if cfg.weights:
            log(f"continuing from {cfg.weights}")
        # Adapters start on their target's device, which is the CPU for swapped-out blocks.
        network.to(device=device, dtype=torch.bfloat16 if profile.training.full_bf16 else torch.float32)
        self.module = network
        self.processes = processes

    @property
    def trains_text_encoder(self) -> bool:
        return self.module.trains_text_encoder

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.module.trainable_parameters()

    def param_groups(self, optimizer_cfg) -> list[dict]:
        return self.module.param_groups(optimizer_cfg)

    def describe_groups(self) -> str:
        return self.module.describe_groups()

    def batch_multiplier(self, multiplier: float):
        """The dataset's network_multiplier for one batch's forward and backward."""
        return applied_at(self.module, multiplier)

    def empty_slice(self, device, autocast) -> None:
        """Nothing to run: the gradients this process adds are zero (summed after backward)."""

    def sum_gradients(self, params) -> None:
        self.processes.sum_gradients(params)

    def state_dicts(self, optimizer) -> tuple[dict, dict]:
        return self.module.state_dict(), optimizer.state_dict()

    def load_state_dicts(self, optimizer, weights: dict, optimizer_state: dict) -> None:
        self.module.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)

    def metadata(self) -> dict[str, str]:
        return self.module.metadata()

    def save(self, path: Path, *, metadata: dict[str, str], dtype) -> None:
        self.module.save(path, metadata=metadata, dtype=dtype)

    def self_check(self, path: Path):
        """The network's check that the file reloads to the trained outputs, or None without one."""
        check = getattr(self.module, "self_check", None)
        return None if check is None else check(path)


def target_class(profile) -> type:
    """The kind of target the profile trains (``network.module = "full"``: the DiT's own weights), known before
    any model loads (messages name its files); built with ``(profile, plugins, dit=, text_encoder=, data=,
    device=, log=, processes=)`` once the models are loaded."""
    if profile.network.module == FULL:
        from anima_core.training.full_weights import FullWeightsTarget

        return FullWeightsTarget
    return NetworkTarget
