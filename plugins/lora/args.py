"""Network args of both sd-scripts generations, parsed and checked before any module is built.

Values arrive from a TOML profile (already typed) or from sd-scripts style ``key=value`` strings, so every
parser accepts both forms.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from anima_core.errors import AnimaError

PRESETS = ("guide", "sd-scripts")
COMPONENT_DIM_ARGS = {
    "self_attn_dim": "self_attn",
    "cross_attn_dim": "cross_attn",
    "mlp_dim": "mlp",
    "mod_dim": "mod",
    "llm_adapter_dim": "llm_adapter",
}
EMB_COMPONENTS = ("x_embedder", "t_embedder", "final_layer")
FLOAT_ARGS = (
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)
# The args that pick layers, ranks, rates and dropouts (the lycoris network shares these), then lora_anima's own.
SELECTION_ARGS = (
    *COMPONENT_DIM_ARGS,
    "emb_dims",
    "train_block_indices",
    "train_llm_adapter",
    "verbose",
    *FLOAT_ARGS,
    "exclude_patterns",
    "include_patterns",
    "network_reg_dims",
    "network_reg_lrs",
    "target_preset",
)
KNOWN_ARGS = (*SELECTION_ARGS, "fused")
FUSED_VALUES = ("auto", "true", "false")


class NetworkArgsError(AnimaError):
    """A network arg has an unknown name or a value that cannot be used."""


@dataclass(frozen=True)
class NetworkArgs:
    target_preset: str = "guide"
    component_dims: dict[str, int] = field(default_factory=dict)  # component -> rank, only those given
    emb_dims: dict[str, int] = field(default_factory=dict)  # x_embedder / t_embedder / final_layer -> rank
    train_block_indices: str | None = None  # checked against the block count by the selection
    train_llm_adapter: bool = False
    verbose: bool = False
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    exclude_patterns: tuple[str, ...] = ()
    include_patterns: tuple[str, ...] = ()
    reg_dims: tuple[tuple[str, int], ...] = ()  # first matching regex wins
    reg_lrs: tuple[tuple[str, float], ...] = ()
    # The fused LoRA GEMM: True, False, or None = auto (on for layers on a GPU). Off by default until its speed is
    # measured on a GPU (a GEMM of out + rank rows can cost a whole extra tile of the GPU's matmul).
    fused: bool | None = False


def arg_error(name: str, value: object, expected: str) -> NetworkArgsError:
    return NetworkArgsError(
        f"network arg {name}={value!r} cannot be used: expected {expected}. Fix it in the [network] args "
        f"of the profile (or the --network_args string)."
    )


def as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise arg_error(name, value, "true or false")


def _as_fused(value: object) -> bool | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in FUSED_VALUES):
        return as_bool("fused", value)
    raise arg_error("fused", value, "true, false or \"auto\"")


def _as_int(name: str, value: object, *, minimum: int = 0) -> int:
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or (isinstance(value, float) and value != number):
        raise arg_error(name, value, f"a whole number >= {minimum}")
    return number


def _as_float(name: str, value: object, *, lo: float = 0.0, hi: float | None = None) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < lo or (hi is not None and number >= hi):
        bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise arg_error(name, value, f"a number {bound}")
    return number


def _as_list(name: str, value: object) -> list[str]:
    """A Python-literal list (sd-scripts form), a TOML list, or one string."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise arg_error(name, value, "a list of regular expressions like ['.*mlp.*']") from None
        else:
            value = [text]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise arg_error(name, value, "a list of regular expressions")
    for pattern in value:
        _check_regex(name, pattern)
    return list(value)


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise arg_error(name, pattern, f"a valid regular expression ({err})") from None


def _as_pairs(name: str, value: object, convert) -> tuple[tuple[str, object], ...]:
    """``regex=value,regex=value`` (sd-scripts form) or a list of ``regex=value`` strings."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise arg_error(name, value, "'regex=value,regex=value'")
    pairs = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if "=" not in item:
            raise arg_error(name, item, "'regex=value' (the regex may not contain ',' or '=')")
        pattern, raw = (part.strip() for part in item.split("=", 1))
        _check_regex(name, pattern)
        pairs.append((pattern, convert(name, raw)))
    return tuple(pairs)


def _parse_emb_dims(value: object) -> dict[str, int]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = [part.strip() for part in text.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = []
    if len(items) != 3:
        raise arg_error("emb_dims", value, "exactly 3 ranks for x_embedder, t_embedder, final_layer, e.g. [8,4,8]")
    return {comp: _as_int("emb_dims", item) for comp, item in zip(EMB_COMPONENTS, items)}


def parse_network_args(raw: dict[str, object] | None) -> NetworkArgs:
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(KNOWN_ARGS))
    if unknown:
        raise NetworkArgsError(
            f"unknown network arg(s) {', '.join(unknown)} for lora_anima. Known args: "
            f"{', '.join(sorted(KNOWN_ARGS))}. Remove or rename them in the [network] args of the profile."
        )
    preset = str(raw.get("target_preset", "guide"))
    if preset not in PRESETS:
        raise arg_error("target_preset", preset, " or ".join(repr(p) for p in PRESETS))
    component_dims = {
        component: _as_int(arg, raw[arg]) for arg, component in COMPONENT_DIM_ARGS.items() if arg in raw
    }
    train_llm_adapter = as_bool("train_llm_adapter", raw.get("train_llm_adapter", False))
    if component_dims.get("llm_adapter", 0) > 0 and not train_llm_adapter:
        raise NetworkArgsError(
            f"network arg llm_adapter_dim={component_dims['llm_adapter']} has no effect because the LLM "
            f"adapter is not trained. Add train_llm_adapter=true to the [network] args, or remove llm_adapter_dim."
        )
    blocks = raw.get("train_block_indices")
    return NetworkArgs(
        target_preset=preset,
        component_dims=component_dims,
        emb_dims=_parse_emb_dims(raw["emb_dims"]) if "emb_dims" in raw else {},
        train_block_indices=None if blocks is None else str(blocks),
        train_llm_adapter=train_llm_adapter,
        verbose=as_bool("verbose", raw.get("verbose", False)),
        **{
            name: _as_float(name, raw[name], hi=1.0 if name.endswith("dropout") else None)
            if name in raw
            else None
            for name in FLOAT_ARGS
        },
        exclude_patterns=tuple(_as_list("exclude_patterns", raw["exclude_patterns"]))
        if "exclude_patterns" in raw
        else (),
        include_patterns=tuple(_as_list("include_patterns", raw["include_patterns"]))
        if "include_patterns" in raw
        else (),
        reg_dims=_as_pairs("network_reg_dims", raw["network_reg_dims"], _as_int)
        if "network_reg_dims" in raw
        else (),
        reg_lrs=_as_pairs("network_reg_lrs", raw["network_reg_lrs"], _as_float)
        if "network_reg_lrs" in raw
        else (),
        fused=_as_fused(raw.get("fused", False)),
    )


def parse_block_indices(text: str, block_count: int) -> set[int]:
    """``all``, ``none``/empty, or ``0-5,10,15-27`` (0-based, inclusive ranges) checked against the model."""
    spec = text.strip().lower()
    if spec == "all":
        return set(range(block_count))
    if spec in ("", "none"):
        return set()
    selected: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not match:
            raise arg_error("train_block_indices", text, "'all', 'none' or indices and ranges like 0-5,10,15-27")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if start > end or end >= block_count:
            raise NetworkArgsError(
                f"network arg train_block_indices={text!r}: {part!r} is outside the model's blocks "
                f"0-{block_count - 1} (this DiT has {block_count} blocks). Use indices from 0 to {block_count - 1}."
            )
        selected.update(range(start, end + 1))
    return selected
