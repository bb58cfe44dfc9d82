"""Turning sd-scripts argument strings into typed profile values (argparse's types, then sd-scripts' own
parsing of `--network_args` and `--optimizer_args`)."""

from __future__ import annotations

import ast
from typing import Any

# Network args whose value is text with its own syntax; the network plugin parses them.
TEXT_NETWORK_ARGS = ("train_block_indices", "network_reg_dims", "network_reg_lrs")


class ValueProblem(ValueError):
    """The value of one flag cannot be read; the message says what was expected."""


def as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueProblem(f"expected a whole number, got {text!r}") from None


def as_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueProblem(f"expected a number, got {text!r}") from None


def as_int_or_float(text: str) -> int | float:
    """sd-scripts' int_or_float: `10` is steps, `0.1` a fraction of all steps."""
    try:
        return int(text)
    except ValueError:
        return as_float(text)


def as_resolution(text: str) -> int | list[int]:
    """`512` → 512, `512,768` → [512, 768] (width, height), as sd-scripts reads --resolution."""
    sides = [as_int(part.strip()) for part in text.split(",")]
    if len(sides) == 1:
        return sides[0]
    if len(sides) == 2:
        return sides
    raise ValueProblem(f"expected `size` or `width,height`, got {text!r}")


def literal(text: str) -> Any:
    """A Python literal when the text is one (`1e-4`, `False`, `[8,4,8]`, `(0.9, 0.99)`), else the text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return _toml_ready(value)


def _toml_ready(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_toml_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _toml_ready(v) for k, v in value.items()}
    if value is None or isinstance(value, complex | bytes | set | frozenset):
        raise ValueProblem(f"{value!r} cannot be written to a TOML profile")
    return value


def _split_pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if "=" not in item:
            raise ValueProblem(f"{flag}: expected key=value items, got {item!r}")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), raw.strip()))
    return pairs


def network_args(items: list[str]) -> dict[str, Any]:
    """`"self_attn_dim=8" "train_llm_adapter=True" "emb_dims=[8,4,8]"` → typed dict.

    Booleans in either case, numbers, and bracketed lists become TOML values; text-syntax args
    (train_block_indices, network_reg_dims, network_reg_lrs) and anything else stay strings.
    """
    result: dict[str, Any] = {}
    for key, raw in _split_pairs(items, "--network_args"):
        if key in TEXT_NETWORK_ARGS:
            result[key] = raw
        elif raw.lower() in ("true", "false"):
            result[key] = raw.lower() == "true"
        else:
            try:
                result[key] = literal(raw)
            except ValueProblem:
                result[key] = raw
    return result


def _literal_args(items: list[str], flag: str) -> dict[str, Any]:
    """sd-scripts reads each value as a Python literal, a comma list as a tuple (`betas=0.9,0.999`)."""
    return {key: literal(raw) for key, raw in _split_pairs(items, flag)}


def optimizer_args(items: list[str]) -> dict[str, Any]:
    return _literal_args(items, "--optimizer_args")


def lr_scheduler_args(items: list[str]) -> dict[str, Any]:
    return _literal_args(items, "--lr_scheduler_args")
