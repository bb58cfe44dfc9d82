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
from anima_core.training.network import refuse_unsupported_multipliers

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
    """The DiT's weights themselves. The text encoder stays frozen (as in anima_train.py)."""

    file_kind = "model"
    file_label = "model"
    default_save_dtype = torch.bfloat16  # the released files' dtype
    trains_text_encoder = False

    def __init__(self, profile, plugins, *, dit, text_encoder, data, device, log):
        refuse_unsupported_multipliers(dit, FULL, data)
        self.module = dit
        self.rates = component_rates(profile.optimizer)
        self.groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, param in dit.named_parameters():
            self.groups.setdefault(component_of(name), []).append((name, param))
        # Trained weights are float32 unless training.full_bf16 (the LoRA rule, and sd-scripts' without
        # --full_bf16): a bf16 weight rounds away updates below its precision, as lr 1e-5 steps are.
        dtype = torch.bfloat16 if profile.training.full_bf16 else torch.float32
        for group, params in self.groups.items():
            for _, param in params:
                param.requires_grad_(self.rates[group] > 0)
                if param.requires_grad:
                    param.data = param.data.to(dtype)
        self.model_name = type(dit).__name__

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def param_groups(self, optimizer_cfg) -> list[dict]:
        return [{"params": [p for _, p in params], "lr": self.rates[group], "name": group}
                for group, params in self.groups.items() if self.rates[group] > 0]

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

    def metadata(self) -> dict[str, str]:
        return {"ss_network_module": FULL, "format": "pt"}  # format=pt: as the official file says

    def state_for_file(self, dtype) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v.detach().to("cpu", dtype) for k, v in self.module.state_dict().items()}

    def save(self, path: Path, *, metadata: dict[str, str], dtype) -> None:
        save_safetensors_atomic(self.state_for_file(dtype), path, metadata={**metadata, "format": "pt"})

    def self_check(self, path: Path) -> ModelCheck:
        """The file loads through the strict loader (the released layout) and holds the trained weights."""
        from anima_core.models.dit_loading import load_dit

        problems = []
        try:
            load_dit(path, device="meta")
        except Exception as exc:  # the loader's own message names what is wrong
            return ModelCheck(str(path), False, 0, [str(exc)])
        expected = self.module.state_dict()
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                saved = f.get_tensor(key)
                mine = expected[key.removeprefix("net.")].detach().to("cpu", saved.dtype)
                if not torch.equal(saved, mine):
                    problems.append(f"{key} differs from the trained weight")
        return ModelCheck(str(path), not problems, len(keys), problems)
