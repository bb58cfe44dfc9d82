"""The ``lycoris`` network: LyCORIS modules (lycoris-lora) on the layers ``lora_anima`` would adapt.

The algorithms are LyCORIS's own module classes; this file only picks the layers (``lora_anima``'s
selection), patches their forwards, groups learning rates and writes kohya-named files ComfyUI loads.
"""

from __future__ import annotations

import torch
from torch import nn

from anima_core.errors import AnimaError
from anima_plugins.lora.files import LoRAFileError, metadata_json, read_lora_file, write_lora_file
from anima_plugins.lora.keymap import Address, resolver_key_map
from anima_plugins.lora.names import COMFY_TE_PREFIX
from anima_plugins.lora.network import (
    GroupPlan,
    arg_to_string,
    group_lines,
    plan_param_groups,
    resolve_dtype,
    text_encoder_model_for,
)
from anima_plugins.lora.selection import Skipped, Target, select_targets

from .args import DROPOUT_REFUSED, LycorisArgs, parse_lycoris_args
from .formats import group_modules
from .package import module_classes
from .selfcheck import LycorisSelfCheck, self_check

NETWORK_MODULE = "lycoris.kohya"  # what sd-scripts writes for a LyCORIS network; LyCORIS loaders know it
FILE_ALGO = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "full": "full"}


class AnimaLycorisNetwork(nn.Module):
    def __init__(
        self,
        *,
        dit: nn.Module,
        text_encoder_model: nn.Module | None,
        args: LycorisArgs,
        raw_args: dict,
        network_dim: int,
        alpha: float,
        dropout: float = 0.0,
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
        targets, skipped = select_targets(
            args.selection, dit=dit, text_encoder_model=text_encoder_model, network_dim=network_dim
        )
        self.targets: list[Target] = targets
        self.skipped: list[Skipped] = skipped
        module_class = module_classes()[args.algo]
        self.loras = nn.ModuleDict(
            {
                t.name: module_class(t.name, t.module, multiplier=1.0, lora_dim=t.rank, alpha=alpha, dropout=dropout,
                                     **args.module_kwargs())
                for t in targets
            }
        )
        self._saved_forwards: dict[str, tuple[bool, object]] = {}
        self._last_groups: list[GroupPlan] = []
        self._frozen: list[str] = []

    # --- structure -----------------------------------------------------------------------------------

    @property
    def trains_text_encoder(self) -> bool:
        return any(t.part == "te" for t in self.targets)

    def apply_to(self) -> None:
        """Route each layer's forward through its module. LyCORIS's own ``apply_to`` is not used: for
        ``full`` it moves the layer's weight into the module, and the DiT's state dict must never change."""
        for target in self.targets:
            if target.name in self._saved_forwards:
                continue
            module, layer = self.loras[target.name], target.module
            self._saved_forwards[target.name] = ("forward" in layer.__dict__, layer.forward)
            module.org_forward = layer.forward
            layer.forward = module.forward

    def remove(self) -> None:
        for target in reversed(self.targets):
            saved = self._saved_forwards.pop(target.name, None)
            if saved is None:
                continue
            had_own, forward = saved
            if had_own:
                target.module.forward = forward
            else:
                del target.module.forward

    def set_multiplier(self, multiplier: float) -> None:
        """Every module's output scale (LyCORIS modules read ``multiplier`` in their forward)."""
        for module in self.loras.values():
            module.multiplier = multiplier

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def modules_by_address(self) -> dict[Address, nn.Module]:
        return {(t.part, t.path): self.loras[t.name] for t in self.targets}

    # --- resume state: every parameter and buffer as it is, so a resumed run continues bit for bit ------
    # (LyCORIS's module state dicts fold use_scalar into a weight and reset the scalar on load.)

    def _raw_tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self._raw_tensors().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self._raw_tensors()
        if set(state_dict) != set(own):
            missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            raise AnimaError(
                f"the saved network state does not fit this lycoris network: missing {missing[:4]}, unexpected "
                f"{extra[:4]}. Resume with the network args the state was saved with."
            )
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state_dict[name])
        return None

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float) -> dict:
        """sd-scripts' scale_weight_norms by LyCORIS's own per-module max-norm (as its sd-scripts network does):
        each module whose ΔW norm exceeds ``max_norm`` is scaled back to it."""
        scaled, norms = 0, []
        for module in self.loras.values():
            was_scaled, norm = module.apply_max_norm(max_norm)
            scaled += bool(was_scaled)
            norms.append(float(norm))
        return {"keys_scaled": scaled, "mean_norm": sum(norms) / len(norms), "max_norm": max(norms)}

    # --- learning rates ------------------------------------------------------------------------------

    def param_groups(self, optimizer_cfg) -> list[dict]:
        """Groups as ``lora_anima`` forms them (component rates, network_reg_lrs, 0 freezes); LoRA+ speeds up
        LoCon's ``lora_up`` (the args refuse LoRA+ for the other algorithms)."""
        self._last_groups, self._frozen = plan_param_groups(self.targets, self.loras, self.args.selection, optimizer_cfg)
        return [{"params": p.params, "lr": p.lr, "name": p.name} for p in self._last_groups]

    def describe_groups(self) -> str:
        args = self.args
        extras = [f"factor {args.factor}" if args.algo == "lokr" else "", "DoRA" if args.dora_wd else ""]
        lines = [
            f"LyCORIS network ({args.algo}{''.join(', ' + e for e in extras if e)}): {len(self.targets)} modules "
            f"({sum(t.part == 'dit' for t in self.targets)} DiT/adapter, "
            f"{sum(t.part == 'te' for t in self.targets)} text encoder), dim {self.network_dim}, "
            f"alpha {self.network_alpha:g}, preset {args.selection.target_preset}, "
            f"{sum(p.numel() for p in self.parameters()):,} parameters"
        ]
        lines += group_lines(self._last_groups, self._frozen)
        if args.selection.verbose:
            lines.append(f"  {'module':<64} {'dim':>5} {'params':>10}")
            for target in self.targets:
                params = sum(p.numel() for p in self.loras[target.name].parameters())
                lines.append(f"  {target.name:<64} {target.rank:>5} {params:>10,}")
            for skipped in self.skipped:
                lines.append(f"  skipped {skipped.path}: {skipped.reason}")
        return "\n".join(lines)

    # --- files ---------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        args = {"algo": self.args.algo, **{k: arg_to_string(v) for k, v in self.raw_args.items()}}
        return {
            "ss_network_module": NETWORK_MODULE,
            "ss_network_dim": str(self.network_dim),
            "ss_network_alpha": str(self.network_alpha),
            "ss_network_dropout": str(self.dropout or None),
            "ss_network_args": metadata_json({k: str(v) for k, v in args.items()}),
            "ss_base_model_version": "anima",
        }

    def _module_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """suffix -> tensor as LyCORIS saves the module (use_scalar folded in); ``full`` as diff / diff_b."""
        if self.args.algo == "full":
            tensors = {"diff": module.weight}
            if module.bias is not None:
                tensors["diff_b"] = module.bias
            return tensors
        return dict(module.state_dict())

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors under kohya names for the DiT and ComfyUI's generic names for Qwen3 (as ``lora_anima``)."""
        tensors = {}
        for target in self.targets:
            key = target.name if target.part == "dit" else COMFY_TE_PREFIX + target.path
            for suffix, tensor in self._module_tensors(self.loras[target.name]).items():
                tensor = tensor.detach().cpu()
                tensors[f"{key}.{suffix}"] = tensor.to(dtype) if dtype is not None else tensor.clone()
        return tensors

    def save(self, path, *, metadata: dict[str, str] | None = None, dtype: torch.dtype | str | None = None) -> None:
        merged = {**(metadata or {}), **self.metadata()}
        write_lora_file(path, self.file_tensors(resolve_dtype(dtype) or self.save_dtype), merged)

    def self_check(self, path) -> LycorisSelfCheck:
        dit, text_encoder_model = self._models
        return self_check(path, dit=dit, text_encoder_model=text_encoder_model,
                          modules_by_address=self.modules_by_address())

    def load_weights(self, path) -> None:
        """Continue from a LyCORIS file of the same algorithm: every module of the file lands on a module of
        this network, and every module of the network is in the file."""
        lora_file = read_lora_file(path)
        adapters, stray = group_modules(lora_file.tensors)
        key_map = resolver_key_map(*self._models)
        by_address = {(t.part, t.path): t for t in self.targets}
        expected = FILE_ALGO[self.args.algo]
        unmatched, loaded = list(stray), {}
        for adapter in adapters:
            target = by_address.get(key_map.get(adapter.key, ("", "")))
            if target is None:
                unmatched += adapter.tensor_keys
                continue
            if adapter.algo != expected:
                raise LoRAFileError(
                    f"{path}: {adapter.key} is a {adapter.algo} module, but this network trains algo="
                    f"{self.args.algo}. Set the algo the file was trained with, or start without network_weights."
                )
            loaded[target.name] = adapter
        missing = [t.name for t in self.targets if t.name not in loaded]
        if unmatched or missing:
            raise LoRAFileError(
                f"{path} does not match the network selected by the profile: {len(unmatched)} file key(s) fit no "
                f"selected layer (e.g. {unmatched[:4]}), {len(missing)} selected layer(s) are absent from the file "
                f"(e.g. {missing[:4]}). Use the same network args as the run that made the file, or start without "
                "network_weights."
            )
        for name, adapter in loaded.items():
            module = self.loras[name]
            try:
                module.load_state_dict({k: v.to(torch.float32) for k, v in adapter.tensors.items()}, strict=True)
            except RuntimeError as err:
                raise LoRAFileError(
                    f"{path}: {adapter.key} does not fit this network's {self.args.algo} module ({err}). Use the "
                    "network_dim, factor and DoRA args the file was trained with."
                ) from None


def create_network(network_cfg, *, dit: nn.Module, text_encoder, train_text_encoder: bool) -> AnimaLycorisNetwork:
    raw_args = dict(getattr(network_cfg, "args", None) or {})
    args = parse_lycoris_args(raw_args)
    dropout = getattr(network_cfg, "dropout", None) or 0.0
    if dropout and not args.bypass_mode:
        raise AnimaError(f"network.dropout: {DROPOUT_REFUSED}")
    dim, alpha = getattr(network_cfg, "dim", None), getattr(network_cfg, "alpha", None)
    network = AnimaLycorisNetwork(
        dit=dit,
        text_encoder_model=text_encoder_model_for(text_encoder, train_text_encoder),
        args=args,
        raw_args=raw_args,
        network_dim=4 if dim is None else int(dim),
        alpha=1.0 if alpha is None else float(alpha),
        dropout=dropout,
        save_dtype=resolve_dtype(getattr(network_cfg, "save_dtype", None)),
    )
    weights = getattr(network_cfg, "weights", None)
    if weights:
        network.load_weights(weights)
    return network

