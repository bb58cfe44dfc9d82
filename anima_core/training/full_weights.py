"""Full fine-tuning: the training target that trains the DiT's own weights (and its LLM adapter), as sd-scripts'
``anima_train.py`` does, and saves them as the released single file (``net.`` keys, the adapter inside), so
ComfyUI, ``anima-train run`` and ``sample`` load a fine-tune as a base model.

Parameter groups follow anima_train.py's split by name: ``llm_adapter`` first, then ``.self_attn``,
``.cross_attn``, ``.mlp``, ``.adaln_modulation``, everything else "base" at ``optimizer.learning_rate``. A
component rate left unset is the base rate; 0 freezes the group (its weights never get a gradient).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from anima_core.config.full_rules import FULL, component_rates
from anima_core.models.checkpoint import save_safetensors_atomic
from anima_core.training import sharding
from anima_core.training.network import refuse_unsupported_multipliers
from anima_core.training.precision import choose_precision

# (group, name test) in anima_train.py's order: the first match wins.
COMPONENTS = (
    ("llm_adapter", lambda name: "llm_adapter" in name),
    ("self_attn", lambda name: ".self_attn" in name),
    ("cross_attn", lambda name: ".cross_attn" in name),
    ("mlp", lambda name: ".mlp" in name),
    ("mod", lambda name: ".adaln_modulation" in name),
)


def component_of(name: str) -> str:
    return next((group for group, matches in COMPONENTS if matches(name)), "base")


@dataclass
class ModelCheck:
    path: str
    ok: bool
    tensors: int
    problems: list[str]

    @property
    def summary(self) -> str:
        if self.ok:
            return f"{self.tensors} tensors, the released layout, equal to the trained weights"
        return "; ".join(self.problems[:5])


class FullWeightsTarget:
    """The DiT's weights themselves. The text encoder stays frozen (as in anima_train.py). With training.fsdp the
    weights are sharded over the processes (training/sharding.py): saves and states then gather them, on every
    process, and only the main process writes."""

    file_kind = "model"
    file_label = "model"
    default_save_dtype = torch.bfloat16  # the released files' dtype
    trains_text_encoder = False

    @staticmethod
    def prepare_dit(profile, dit) -> None:
        """Before the memory strategies place the weights (block swap keeps a CPU copy of each block's, in
        their final dtype): the trained weights require grad and are float32 unless training.full_bf16 (the
        LoRA rule, and sd-scripts' without --full_bf16: a bf16 weight rounds away updates below its precision,
        as lr 1e-5 steps are)."""
        rates = component_rates(profile.optimizer)
        dtype = torch.bfloat16 if profile.training.full_bf16 else torch.float32
        for name, param in dit.named_parameters():
            param.requires_grad_(rates[component_of(name)] > 0)
            if param.requires_grad:
                param.data = param.data.to(dtype)

    def __init__(self, profile, plugins, *, dit, text_encoder, data, device, log, processes):
        """``dit``: prepared by :meth:`prepare_dit`, then placed by the memory strategies."""
        refuse_unsupported_multipliers(dit, FULL, data)
        self.module = dit
        self.processes = processes
        self.device = device
        self.rates = component_rates(profile.optimizer)
        self.swapped = bool(profile.memory.blocks_to_swap)
        self.sharded = bool(profile.training.fsdp) and processes.distributed
        if self.sharded:
            precision, _ = choose_precision(profile.training, device)
            sharding.shard_dit(dit, processes, compute_dtype=torch.bfloat16 if precision == "bf16" else None)
            log(f"FSDP: the DiT's weights, gradients and optimizer state sharded over {processes.num_processes} processes")
        # collected after sharding, which replaces each parameter by its sharded one
        self.groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, param in dit.named_parameters():
            self.groups.setdefault(component_of(name), []).append((name, param))
        self.model_name = type(dit).__name__
        self._written: dict[str, torch.Tensor] | None = None  # a sharded save's gathered tensors, for its check

    @property
    def collective(self) -> bool:
        """True when saves and states need every process (they gather the shards)."""
        return self.sharded

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def param_groups(self, optimizer_cfg) -> list[dict]:
        return [{"params": [p for _, p in params], "lr": self.rates[group], "name": group}
                for group, params in self.groups.items() if self.rates[group] > 0]

    def _trained_names(self) -> list[str]:
        """The trained parameters' names in the optimizer's order (param_groups')."""
        return [name for group, params in self.groups.items() if self.rates[group] > 0 for name, _ in params]

    def describe_groups(self) -> str:
        lines = ["full fine-tuning of the DiT's weights (the text encoder stays frozen):"]
        for group, params in self.groups.items():
            count = sum(p.numel() for _, p in params)
            rate = self.rates[group]
            lines.append(f"  group {group:<12} " + (f"lr {rate:<10g}" if rate else "frozen    ")
                         + f" {len(params):>5} tensors {count:>14,} params")
        return "\n".join(lines)

    def batch_multiplier(self, multiplier: float):
        return contextlib.nullcontext()  # refused at construction unless 1.0

    def empty_slice(self, device, autocast) -> None:
        """A process whose slice of a batch is empty still takes part in a sharded step's gathers (its forward
        under the step's ``autocast()``, as the others')."""
        if self.sharded:
            sharding.empty_forward_backward(self.module, device, autocast)

    def sum_gradients(self, params) -> None:
        if self.sharded:
            sharding.sum_gradients(params, self.processes.num_processes)
        else:
            self.processes.sum_gradients(params)

    def metadata(self) -> dict[str, str]:
        return {"ss_network_module": FULL, "format": "pt"}  # format=pt: as the official file says

    # ---- files and states ------------------------------------------------------------------------

    def _whole_state(self) -> dict[str, torch.Tensor]:
        """The whole weights: on the main process when sharded (gathered, {} elsewhere), else the module's."""
        return sharding.whole_model_state(self.module) if self.sharded else self.module.state_dict()

    def state_for_file(self, dtype) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v.detach().to("cpu", dtype) for k, v in self._whole_state().items()}

    def save(self, path: Path, *, metadata: dict[str, str], dtype) -> None:
        """Sharded: every process calls it (the gather), the main process writes."""
        tensors = self.state_for_file(dtype)
        if not self.processes.is_main:
            return
        save_safetensors_atomic(tensors, path, metadata={**metadata, "format": "pt"})
        self._written = tensors if self.sharded else None

    def state_dicts(self, optimizer) -> tuple[dict, dict]:
        """(weights, optimizer state) for a resumable state: whole tensors. Sharded, they are gathered (every
        process calls it; the main process gets them) and the optimizer's state is keyed by parameter name."""
        if not self.sharded:
            return self.module.state_dict(), optimizer.state_dict()
        return sharding.whole_model_state(self.module), sharding.whole_optimizer_state(self.module, optimizer)

    def load_state_dicts(self, optimizer, weights: dict, optimizer_state: dict) -> None:
        """A state saved with or without sharding, into this run with or without it."""
        groups = optimizer_state.get("param_groups")  # absent from the fused backward pass's own format
        by_name = bool(groups) and isinstance(groups[0]["params"][0], str)
        if not self.sharded and not by_name:
            self.module.load_state_dict(weights)
            optimizer.load_state_dict(optimizer_state)
        else:
            sharding.load_whole_states(self.module, optimizer, weights, optimizer_state if by_name
                                       else named_optimizer_state(optimizer_state, self._trained_names()))
        if self.swapped:  # a swapped-out block's weights point at the CPU, but its updates run on the device
            for state in optimizer.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() and value.device != self.device:
                        state[key] = value.to(self.device)

    def self_check(self, path: Path) -> ModelCheck | None:
        """The file loads through the strict loader (the released layout) and holds the trained weights (sharded:
        the weights gathered for it). None on the other processes, which write nothing."""
        from anima_core.models.dit_loading import load_dit

        if not self.processes.is_main:
            return None
        written, self._written = self._written, None
        problems = []
        try:
            load_dit(path, device="meta")
        except Exception as exc:  # the loader's own message names what is wrong
            return ModelCheck(str(path), False, 0, [str(exc)])
        expected = written if written is not None else {f"net.{k}": v for k, v in self.module.state_dict().items()}
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                saved = f.get_tensor(key)
                if not torch.equal(saved, expected[key].detach().to("cpu", saved.dtype)):
                    problems.append(f"{key} differs from the trained weight")
        return ModelCheck(str(path), not problems, len(keys), problems)


def named_optimizer_state(state: dict, names: list[str]) -> dict:
    """torch's optimizer state (parameters numbered in param_groups' order) keyed by parameter name instead, the
    form a sharded optimizer loads."""
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]}
