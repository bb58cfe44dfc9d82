"""The Anima LoRA network: built from the network args, trained by the loop, saved for ComfyUI."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from anima_core.errors import AnimaError

from .args import NetworkArgs, parse_network_args
from .files import LoRAFileError, metadata_json, read_lora_file, write_lora_file
from .inference import SelfCheckResult, self_check
from .keymap import resolver_key_map
from .module import LoRAModule
from .names import COMFY_TE_PREFIX, lr_component
from .selection import Skipped, Target, select_targets

NETWORK_MODULE = "networks.lora_anima"
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
OPTIMIZER_LR_FIELDS = {
    "self_attn": "self_attn_lr",
    "cross_attn": "cross_attn_lr",
    "mlp": "mlp_lr",
    "mod": "mod_lr",
    "llm_adapter": "llm_adapter_lr",
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise AnimaError(f"unknown save dtype {dtype!r}; use one of fp32, fp16, bf16.")
    return DTYPES[str(dtype).lower()]


def arg_to_string(value: object) -> str:
    """sd-scripts keeps network args as the strings of ``key=value``; lists as Python literals."""
    if isinstance(value, (list, tuple)):
        return repr(list(value))
    return str(value)


@dataclass
class GroupPlan:
    """One parameter group before it becomes an optimizer dict."""

    name: str
    lr: float
    params: list[nn.Parameter]
    modules: int


class AnimaLoRANetwork(nn.Module):
    def __init__(
        self,
        *,
        dit: nn.Module,
        text_encoder_model: nn.Module | None,
        args: NetworkArgs,
        raw_args: dict,
        network_dim: int,
        alpha: float,
        dropout: float | None,
        save_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.args = args
        self.raw_args = dict(raw_args)
        self.network_dim = network_dim
        self.network_alpha = alpha
        self.dropout = dropout
        self.save_dtype = save_dtype
        self._models = (dit, text_encoder_model)  # a tuple, so they are not registered as submodules
        targets, skipped = select_targets(args, dit=dit, text_encoder_model=text_encoder_model, network_dim=network_dim)
        self.targets: list[Target] = targets
        self.skipped: list[Skipped] = skipped
        self.loras = nn.ModuleDict(
            {
                t.name: LoRAModule(
                    t.name,
                    t.module,
                    rank=t.rank,
                    alpha=alpha,
                    dropout=dropout,
                    rank_dropout=args.rank_dropout,
                    module_dropout=args.module_dropout,
                    fused=wants_fused(args, t),
                )
                for t in targets
            }
        )
        swapped = getattr(dit, "_block_swapper", None) is not None
        for t in targets:
            if swapped and t.part == "dit" and t.path.startswith("blocks."):
                # Block swap points the block's weights at its own copies every step: a stacked buffer would
                # be a second copy of each weight.
                self.loras[t.name].refuse_fusing("blocks_to_swap moves this block's weights between its own copies")
        self._last_groups: list[GroupPlan] = []
        self._frozen: list[str] = []

    # --- structure -----------------------------------------------------------------------------------

    @property
    def trains_text_encoder(self) -> bool:
        return any(t.part == "te" for t in self.targets)

    def apply_to(self) -> None:
        for lora in self.loras.values():
            lora.apply_to()

    def remove(self) -> None:
        for lora in reversed(list(self.loras.values())):
            lora.remove()

    def fused_lines(self) -> list[str]:
        """How many modules run the fused GEMM, and why the others do not (after ``apply_to``)."""
        asked = [lora for lora in self.loras.values() if lora.fused]
        if not asked:
            return []
        fused = sum(lora.fused_reason is None for lora in asked)
        lines = [f"  fused LoRA GEMM: {fused} of {len(self.loras)} modules"]
        reasons: dict[str, int] = {}
        for lora in asked:
            if lora.fused_reason is not None:
                reasons[lora.fused_reason] = reasons.get(lora.fused_reason, 0) + 1
        lines += [f"    plain path for {count}: {reason}" for reason, count in reasons.items()]
        if self.dropout or self.args.rank_dropout or self.args.module_dropout:
            lines.append("    training steps take the plain path: dropout, rank_dropout or module_dropout is set")
        return lines

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.loras.values():
            lora.multiplier = multiplier

    def merge_into(self) -> None:
        """Add every adapter into its Linear's weight (previews, export); the adapter path is then idle."""
        for lora in self.loras.values():
            lora.merge()

    def unmerge(self) -> None:
        for lora in self.loras.values():
            lora.unmerge()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for lora in self.loras.values():
            lora.refresh_scale()
        return result

    # --- learning rates ------------------------------------------------------------------------------

    def param_groups(self, optimizer_cfg) -> list[dict]:
        """Parameter groups {"params", "lr", "name"}; a rate of 0 freezes its modules and drops the group."""
        self._last_groups, self._frozen = plan_param_groups(self.targets, self.loras, self.args, optimizer_cfg)
        return [{"params": p.params, "lr": p.lr, "name": p.name} for p in self._last_groups]

    def describe_groups(self) -> str:
        """The parameter groups with their rates (after ``param_groups``), and with ``verbose`` every module."""
        lines = [
            f"LoRA network: {len(self.targets)} modules "
            f"({sum(t.part == 'dit' for t in self.targets)} DiT/adapter, "
            f"{sum(t.part == 'te' for t in self.targets)} text encoder), dim {self.network_dim}, "
            f"alpha {self.network_alpha:g}, preset {self.args.target_preset}, "
            f"{sum(p.numel() for p in self.parameters()):,} parameters"
        ]
        lines += group_lines(self._last_groups, self._frozen)
        lines += self.fused_lines()
        if self.args.verbose:
            lines.append(f"  {'module':<64} {'rank':>5} {'alpha':>7}")
            for target in self.targets:
                lines.append(f"  {target.name:<64} {target.rank:>5} {float(self.loras[target.name].alpha):>7g}")
            for skipped in self.skipped:
                lines.append(f"  skipped {skipped.path}: {skipped.reason}")
        return "\n".join(lines)

    # --- files ---------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {
            "ss_network_module": NETWORK_MODULE,
            "ss_network_dim": str(self.network_dim),
            "ss_network_alpha": str(self.network_alpha),  # "1.0" as sd-scripts writes it
            "ss_network_dropout": str(self.dropout),
            "ss_network_args": metadata_json({k: arg_to_string(v) for k, v in self.raw_args.items()}),
            "ss_base_model_version": "anima",
        }

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors under their file names: kohya for the DiT, ComfyUI's generic names for Qwen3."""
        tensors = {}
        for target in self.targets:
            lora = self.loras[target.name]
            key = target.name if target.part == "dit" else COMFY_TE_PREFIX + target.path
            for suffix, tensor in (
                (".lora_down.weight", lora.lora_down.weight),
                (".lora_up.weight", lora.lora_up.weight),
                (".alpha", lora.alpha),
            ):
                tensor = tensor.detach().cpu()
                tensors[key + suffix] = tensor.to(dtype) if dtype is not None else tensor.clone()
        return tensors

    def save(self, path, *, metadata: dict[str, str] | None = None, dtype: torch.dtype | str | None = None) -> None:
        merged = {**(metadata or {}), **self.metadata()}
        write_lora_file(path, self.file_tensors(resolve_dtype(dtype) or self.save_dtype), merged)

    def self_check(self, path, *, probe=None) -> SelfCheckResult:
        """``inference.self_check`` of a file this network saved, against the models it was built on."""
        dit, text_encoder_model = self._models
        return self_check(path, dit, text_encoder_model, probe=probe)

    def load_weights(self, path) -> None:
        """Continue from a LoRA file: every key must land on a module of this network, and vice versa."""
        lora_file = read_lora_file(path)
        pairs, stray = lora_file.pairs()
        key_map = resolver_key_map(*self._models)
        by_address = {(t.part, t.path): t for t in self.targets}
        unmatched = list(stray)
        loaded: dict[str, tuple] = {}
        for pair in pairs:
            target = by_address.get(key_map.get(pair.key, ("", "")))
            if target is None:
                unmatched += pair.tensor_keys
                continue
            lora = self.loras[target.name]
            if tuple(pair.down.shape) != tuple(lora.lora_down.weight.shape) or tuple(pair.up.shape) != tuple(
                lora.lora_up.weight.shape
            ):
                raise LoRAFileError(
                    f"{path}: {pair.key} has rank {pair.rank} and shapes {tuple(pair.down.shape)}/"
                    f"{tuple(pair.up.shape)}, but this network gives {target.path} rank {target.rank}. "
                    "Use the network_dim and rank args the file was trained with."
                )
            loaded[target.name] = (pair, lora)
        missing = [t.name for t in self.targets if t.name not in loaded]
        if unmatched or missing:
            raise LoRAFileError(
                f"{path} does not match the network selected by the profile: "
                f"{len(unmatched)} file key(s) fit no selected module (e.g. {unmatched[:4]}), "
                f"{len(missing)} selected module(s) are absent from the file (e.g. {missing[:4]}). "
                "Use the same network args (target_preset, dims, train_llm_adapter, text-encoder training) "
                "as the run that made the file, or start without network_weights."
            )
        with torch.no_grad():
            for pair, lora in loaded.values():
                lora.lora_down.weight.copy_(pair.down)
                lora.lora_up.weight.copy_(pair.up)
                lora.alpha.fill_(pair.alpha if pair.alpha is not None else lora.rank)
                lora.refresh_scale()


def wants_fused(args: NetworkArgs, target: Target) -> bool:
    """The fused GEMM for this module: the ``fused`` arg; ``auto`` fuses the layers on a GPU."""
    if args.fused is not None:
        return args.fused
    return target.module.weight.device.type == "cuda"


def _opt(cfg, name: str, default: float) -> float:
    value = getattr(cfg, name, None)
    return default if value is None else float(value)


def base_rates(optimizer_cfg) -> tuple[float, float]:
    """(DiT rate, Qwen3 rate): unet_lr / text_encoder_lr, each defaulting to learning_rate."""
    base = float(optimizer_cfg.learning_rate)
    return _opt(optimizer_cfg, "unet_lr", base), _opt(optimizer_cfg, "text_encoder_lr", base)


def learning_rate_group(target: Target, args: NetworkArgs, optimizer_cfg, unet_lr: float, te_lr: float) -> tuple[str, float]:
    """(group name, rate) of one module: network_reg_lrs first, then Qwen3, then the DiT component rates."""
    for index, (pattern, lr) in enumerate(args.reg_lrs):
        if re.fullmatch(pattern, target.path):
            return f"network_reg_lrs[{index}] {pattern}", lr
    if target.part == "te":
        return "text_encoder", te_lr
    component = lr_component(target.path)
    if component == "base":
        return "unet", unet_lr
    return component, _opt(optimizer_cfg, OPTIMIZER_LR_FIELDS[component], unet_lr)


def plan_param_groups(targets: list[Target], modules, args: NetworkArgs, optimizer_cfg) -> tuple[list[GroupPlan], list[str]]:
    """The groups of a network's modules (``modules[target.name]``) and the names of modules frozen by a rate of 0.

    LoRA+ (``loraplus_*_ratio``) moves each module's ``lora_up`` parameters into a group at ratio x the rate.
    """
    unet_lr, te_lr = base_rates(optimizer_cfg)
    dit_ratio = args.loraplus_unet_lr_ratio or args.loraplus_lr_ratio
    te_ratio = args.loraplus_text_encoder_lr_ratio or args.loraplus_lr_ratio
    plans: dict[str, GroupPlan] = {}
    frozen: list[str] = []
    for target in targets:
        module = modules[target.name]
        group, lr = learning_rate_group(target, args, optimizer_cfg, unet_lr, te_lr)
        ratio = dit_ratio if target.part == "dit" else te_ratio
        if lr == 0:
            module.requires_grad_(False)
            frozen.append(target.name)
            continue
        module.requires_grad_(True)
        for index, (param_name, param) in enumerate(module.named_parameters()):
            name, group_lr = group, lr
            if ratio is not None and param_name.startswith("lora_up"):
                name, group_lr = f"{group} lora_up (LoRA+ x{ratio:g})", lr * ratio
            plan = plans.setdefault(name, GroupPlan(name, group_lr, [], 0))
            plan.params.append(param)
            plan.modules += index == 0
    if not plans:
        raise AnimaError(
            "every network module has a learning rate of 0, so nothing would train. Give at least one of "
            "learning_rate / unet_lr / text_encoder_lr / the component rates a value above 0."
        )
    return list(plans.values()), frozen


def group_lines(plans: list[GroupPlan], frozen: list[str]) -> list[str]:
    """The parameter groups with their rates, for the start-of-run log."""
    lines = []
    for plan in plans:
        count = sum(p.numel() for p in plan.params)
        lines.append(f"  group {plan.name:<40} lr {plan.lr:<10.3g} {len(plan.params):>5} tensors {count:>12,} params")
    if frozen:
        lines.append(f"  frozen (lr 0): {len(frozen)} modules")
    return lines


def text_encoder_model_for(text_encoder, train_text_encoder: bool) -> nn.Module | None:
    """The Qwen3 model that gets modules, or None when the text encoder is not trained."""
    if not train_text_encoder:
        return None
    if text_encoder is None:
        raise AnimaError(
            "text-encoder training was asked for, but no text encoder was loaded. Set "
            "network_train_unet_only = true, or load the Qwen3 text encoder."
        )
    return getattr(text_encoder, "model", text_encoder)


def create_network(network_cfg, *, dit: nn.Module, text_encoder, train_text_encoder: bool) -> AnimaLoRANetwork:
    raw_args = dict(getattr(network_cfg, "args", None) or {})
    args = parse_network_args(raw_args)
    dim = getattr(network_cfg, "dim", None)
    alpha = getattr(network_cfg, "alpha", None)
    network = AnimaLoRANetwork(
        dit=dit,
        text_encoder_model=text_encoder_model_for(text_encoder, train_text_encoder),
        args=args,
        raw_args=raw_args,
        network_dim=4 if dim is None else int(dim),
        alpha=1.0 if alpha is None else float(alpha),
        dropout=getattr(network_cfg, "dropout", None),
        save_dtype=resolve_dtype(getattr(network_cfg, "save_dtype", None)),
    )
    weights = getattr(network_cfg, "weights", None)
    if weights:
        network.load_weights(weights)
    return network
