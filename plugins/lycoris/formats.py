"""LyCORIS file formats as ComfyUI reads them: which keys form one module, and the weight ComfyUI rebuilds.

This restates ComfyUI's loader (``comfy/lora.py`` and ``comfy/weight_adapter/{lora,loha,lokr,base}.py``) for
Linear layers, independently of the LyCORIS modules that wrote the file, so the self-check and ``lora-info``
see a file the way ComfyUI does. Needs torch only, not the lycoris package.

Per module key ``K`` (a kohya name or ComfyUI's generic name), with ``alpha`` from ``K.alpha`` and
``dora_scale`` from ``K.dora_scale``:

* locon: ``K.lora_up.weight`` (out, r), ``K.lora_down.weight`` (r, in); ΔW = up·down · alpha / r.
* loha: ``K.hada_w1_a`` (out, r), ``K.hada_w1_b`` (r, in), ``K.hada_w2_a``, ``K.hada_w2_b``;
  ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha / r.
* lokr: ``K.lokr_w1`` or ``K.lokr_w1_a``·``K.lokr_w1_b``, and ``K.lokr_w2`` or ``K.lokr_w2_a``·``K.lokr_w2_b``;
  ΔW = kron(w1, w2) · alpha / r, where r is the inner size of the last factored half (w2 before w1), and
  the factor is 1 when both halves are full matrices.
* full: ``K.diff`` is ΔW itself; ``K.diff_b`` is the bias difference. No alpha.
* DoRA (``dora_scale`` present, locon/loha/lokr): W' = (W + ΔW) · dora_scale / ‖·‖ + eps, where ‖·‖ is the
  norm of each input column of W + ΔW when dora_scale has shape (1, in), and ComfyUI's norm of each output
  row of the *untrained* W when it has shape (out, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

COMMON = (".alpha", ".dora_scale")
SUFFIXES = {
    "locon": (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"),
    "lokr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"),
    "full": (".diff", ".diff_b"),
}
# The key whose presence makes ComfyUI pick the format (any one of them for lokr).
DETECT = {
    "locon": (".lora_up.weight",),
    "loha": (".hada_w1_a",),
    "lokr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a"),
    "full": (".diff",),
}
# Keys only LyCORIS writes: a file with one of them is not a plain LoRA.
LYCORIS_ONLY = tuple(s for algo in ("loha", "lokr", "full") for s in SUFFIXES[algo]) + (".lora_mid.weight", ".dora_scale")
CONV_ONLY = (".lora_mid.weight", ".hada_t1", ".hada_t2", ".lokr_t2")  # Tucker cores: convolution kernels only


class FormatError(ValueError):
    """A module's tensors do not form a weight difference for a Linear layer."""


@dataclass
class AdapterModule:
    """One module's tensors as found in a file, by suffix (``lokr_w1``, ``alpha`` ...)."""

    key: str
    algo: str
    tensors: dict[str, torch.Tensor]
    tensor_keys: list[str] = field(default_factory=list)

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    @property
    def alpha(self) -> float | None:
        alpha = self.get("alpha")
        return None if alpha is None else float(alpha)

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.tensors

    @property
    def rank(self) -> int | None:
        """The r that divides alpha (None: the format has no rank, or both LoKr halves are full)."""
        if self.algo == "locon":
            return self.tensors["lora_down.weight"].shape[0]
        if self.algo == "loha":
            return self.tensors["hada_w1_b"].shape[0]
        if self.algo == "lokr":  # the last factored half sets it, w2 before w1
            for half in (2, 1):
                if f"lokr_w{half}" not in self.tensors and f"lokr_w{half}_b" in self.tensors:
                    return self.tensors[f"lokr_w{half}_b"].shape[0]
        return None

    def weight_shape(self) -> tuple[int, int]:
        """(out, in) of the Linear this module's difference is for."""
        t = self.tensors
        if any(name.lstrip(".") in t for name in CONV_ONLY):
            raise FormatError(f"{self.key} has a Tucker core (a convolution-kernel form); Anima's layers are Linear")
        try:
            if self.algo == "locon":
                return t["lora_up.weight"].shape[0], t["lora_down.weight"].shape[1]
            if self.algo == "loha":
                return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
            if self.algo == "lokr":
                w1, w2 = _lokr_half(t, 1), _lokr_half(t, 2)
                return w1[0] * w2[0], w1[1] * w2[1]
            return tuple(t["diff"].shape)
        except KeyError as err:
            raise FormatError(f"{self.key} is a {self.algo} module without its {err.args[0]} tensor") from None


def _lokr_half(tensors: dict[str, torch.Tensor], half: int) -> tuple[int, int]:
    full = tensors.get(f"lokr_w{half}")
    if full is not None:
        return full.shape[0], full.shape[1]
    return tensors[f"lokr_w{half}_a"].shape[0], tensors[f"lokr_w{half}_b"].shape[1]


def group_modules(tensors: dict[str, torch.Tensor]) -> tuple[list[AdapterModule], list[str]]:
    """Modules in ComfyUI's detection order (LoRA, LoHa, LoKr, then diff), and keys no module uses."""
    by_key: dict[str, dict[str, torch.Tensor]] = {}
    names: dict[str, list[str]] = {}
    all_suffixes = [s for algo in SUFFIXES.values() for s in algo] + list(COMMON)
    for name, tensor in tensors.items():
        for suffix in all_suffixes:
            if name.endswith(suffix):
                key = name[: -len(suffix)]
                by_key.setdefault(key, {})[suffix[1:]] = tensor
                names.setdefault(key, []).append(name)
                break
    modules, used = [], set()
    for key, found in by_key.items():
        algo = next((a for a in SUFFIXES if any(s[1:] in found for s in DETECT[a])), None)
        if algo is None:
            continue
        own = {s[1:] for s in SUFFIXES[algo]} | ({"alpha", "dora_scale"} if algo != "full" else set())
        kept = {n: t for n, t in found.items() if n in own}
        keys = [k for k in names[key] if k[len(key) + 1 :] in kept]
        modules.append(AdapterModule(key, algo, kept, sorted(keys)))
        used.update(keys)
    return sorted(modules, key=lambda m: m.key), sorted(set(tensors) - used)


def _factor(module: AdapterModule) -> float:
    alpha, rank = module.alpha, module.rank
    return alpha / rank if alpha is not None and rank is not None else 1.0


def comfy_difference(module: AdapterModule) -> torch.Tensor:
    """ΔW before DoRA and strength, in float32, as ComfyUI's ``calculate_weight`` forms it (alpha included)."""
    t = {name: tensor.float() for name, tensor in module.tensors.items()}
    if module.algo == "locon":
        diff = t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)
    elif module.algo == "loha":
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    elif module.algo == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        diff = torch.kron(w1, w2)
    else:
        return t["diff"]
    return diff * _factor(module)


def comfy_weight(module: AdapterModule, weight: torch.Tensor) -> torch.Tensor:
    """The Linear weight ComfyUI uses with this module at strength 1 (float32)."""
    weight = weight.float()
    diff = comfy_difference(module).to(weight.device).reshape(weight.shape)
    if not module.dora:
        return weight + diff
    dora_scale = module.tensors["dora_scale"].float().to(weight.device)
    merged = weight + diff
    if dora_scale.shape[0] == weight.shape[0]:  # output axis: ComfyUI takes the norm of the untrained weight
        norm = weight.norm(dim=1, keepdim=True)
    else:
        norm = merged.norm(dim=0, keepdim=True)
    return merged * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def comfy_bias_difference(module: AdapterModule) -> torch.Tensor | None:
    bias = module.get("diff_b")
    return None if bias is None else bias.float()
