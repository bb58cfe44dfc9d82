"""Which Linear layers get a LoRA and with which rank.

Rules, in order, for every Linear under a target container (DiT blocks, x_embedder, t_embedder,
final_layer; adapter blocks with ``train_llm_adapter``; Qwen3 attention and MLP when the text encoder
is trained):

1. Preset exclusion. ``guide`` (first release, the default): embedders and the final layer only get a
   LoRA through ``emb_dims``. ``sd-scripts`` (current): the regex
   ``.*(_modulation|_norm|_embedder|final_layer).*`` excludes the AdaLN linears, embedders and final
   layer. In both presets a component rank given explicitly (``mod_dim``, an ``emb_dims`` entry > 0)
   lifts that component's preset exclusion.
2. ``exclude_patterns`` exclude; ``include_patterns`` override every exclusion (``re.fullmatch`` on the
   module path).
3. Rank: first matching ``network_reg_dims`` regex, else the component's rank arg (``self_attn_dim`` ...,
   ``emb_dims``), else ``network_dim``. Rank 0 skips the module. Every module belongs to exactly one
   component (``adaln_modulation_self_attn`` is ``mod``, never ``self_attn``); the first release let an
   unset component fall through to the next name match, so there ``self_attn_dim`` alone also set the
   rank of ``adaln_modulation_self_attn``, which the guide's one-arg-per-component table does not describe.
4. ``train_block_indices`` gives unselected DiT blocks rank 0. It applies to DiT blocks only (the first
   release also filtered the six adapter blocks by the same indices; the guide documents it for DiT blocks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from anima_core.errors import AnimaError

from .args import NetworkArgs, parse_block_indices
from .names import (
    ADAPTER_TARGET_PATH,
    DIT_PREFIX,
    DIT_TARGET_PATH,
    TE_PREFIX,
    TE_TARGET_PATH,
    dit_block_index,
    kohya_name,
    rank_component,
)

SD_SCRIPTS_DEFAULT_EXCLUDE = re.compile(r".*(_modulation|_norm|_embedder|final_layer).*")
EMB_COMPONENTS = ("x_embedder", "t_embedder", "final_layer")


class EmptySelectionError(AnimaError):
    """The network args select no module at all."""


@dataclass(eq=False)
class Target:
    part: str  # "dit" (DiT and LLM adapter) or "te" (Qwen3)
    path: str
    name: str  # kohya name: lora_unet_<path> / lora_te_<path>
    rank: int
    module: nn.Linear


@dataclass(eq=False)
class Skipped:
    part: str
    path: str
    reason: str


def linear_paths(root: nn.Module, pattern: re.Pattern) -> list[tuple[str, nn.Linear]]:
    return [
        (path, module)
        for path, module in root.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(path)
    ]


def dit_block_count(dit: nn.Module) -> int:
    blocks = getattr(dit, "blocks", None)
    if blocks is not None:
        return len(blocks)
    indices = {dit_block_index(path) for path, _ in dit.named_modules()} - {None}
    return max(indices) + 1 if indices else 0


def _preset_excluded(args: NetworkArgs, path: str, component: str) -> bool:
    explicit = args.emb_dims.get(component, 0) if component in EMB_COMPONENTS else args.component_dims.get(component, 0)
    if explicit > 0:
        return False
    if args.target_preset == "sd-scripts":
        return SD_SCRIPTS_DEFAULT_EXCLUDE.fullmatch(path) is not None
    return component in EMB_COMPONENTS


def _rank_for(args: NetworkArgs, path: str, component: str, network_dim: int, part: str) -> int:
    for pattern, rank in args.reg_dims:
        if re.fullmatch(pattern, path):
            return rank
    if part == "dit":
        if component in EMB_COMPONENTS and component in args.emb_dims:
            return args.emb_dims[component]
        if component in args.component_dims:
            return args.component_dims[component]
    return network_dim


def select_targets(
    args: NetworkArgs,
    *,
    dit: nn.Module,
    text_encoder_model: nn.Module | None,
    network_dim: int,
) -> tuple[list[Target], list[Skipped]]:
    """The LoRA targets and, for the verbose table, the candidates that were left out and why."""
    blocks = None
    if args.train_block_indices is not None:
        blocks = parse_block_indices(args.train_block_indices, dit_block_count(dit))

    candidates: list[tuple[str, str, nn.Linear]] = [("dit", p, m) for p, m in linear_paths(dit, DIT_TARGET_PATH)]
    if args.train_llm_adapter:
        adapter = linear_paths(dit, ADAPTER_TARGET_PATH)
        if not adapter:
            raise AnimaError(
                "network arg train_llm_adapter=true, but this DiT has no LLM adapter blocks "
                "(no llm_adapter.blocks.* layers). Load a DiT file that carries the adapter, or set "
                "train_llm_adapter=false."
            )
        candidates += [("dit", p, m) for p, m in adapter]
    if text_encoder_model is not None:
        candidates += [("te", p, m) for p, m in linear_paths(text_encoder_model, TE_TARGET_PATH)]

    targets, skipped = [], []
    for part, path, module in candidates:
        component = rank_component(path) if part == "dit" else "text_encoder"
        included = any(re.fullmatch(p, path) for p in args.include_patterns)
        if not included:
            if part == "dit" and _preset_excluded(args, path, component):
                skipped.append(Skipped(part, path, f"excluded by target_preset={args.target_preset}"))
                continue
            if any(re.fullmatch(p, path) for p in args.exclude_patterns):
                skipped.append(Skipped(part, path, "excluded by exclude_patterns"))
                continue
        rank = _rank_for(args, path, component, network_dim, part)
        index = dit_block_index(path) if part == "dit" else None
        if blocks is not None and index is not None and index not in blocks:
            skipped.append(Skipped(part, path, "block not in train_block_indices"))
            continue
        if rank == 0:
            skipped.append(Skipped(part, path, "rank 0"))
            continue
        prefix = DIT_PREFIX if part == "dit" else TE_PREFIX
        targets.append(Target(part, path, kohya_name(prefix, path), rank, module))

    if not targets:
        raise EmptySelectionError(
            "the network args select no module at all, so the LoRA would be empty. "
            f"target_preset={args.target_preset}, train_block_indices={args.train_block_indices!r}, "
            f"ranks={args.component_dims or 'default'}, emb_dims={args.emb_dims or 'unset'}, "
            f"exclude_patterns={list(args.exclude_patterns)}. Enable at least one component (a rank > 0, "
            "a block index, or an include pattern) in the [network] args."
        )
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise AnimaError(f"two modules map to the same LoRA name: {duplicates[:5]}; rename the model's modules.")
    return targets, skipped
