"""Caption processing with sd-scripts semantics; every random choice comes from the generator passed in.

Order (as sd-scripts): prefix/suffix, caption dropout (rate or every-N-epochs), wildcard or first line,
then keep_tokens / keep_tokens_separator split, token warmup, shuffle, tag dropout, re-join with ", ",
and finally the secondary separator replaced by the caption separator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from anima_core.data.config import SubsetSpec

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionStep:
    """Where training is, for the options that depend on it. `epoch` is 1-based, as sd-scripts counts."""

    epoch: int
    step: int
    max_train_steps: int | None


def add_prefix_suffix(subset: SubsetSpec, caption: str) -> str:
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    return caption


def warmup_steps(subset: SubsetSpec, max_train_steps: int | None) -> int:
    """token_warmup_step below 1 is a fraction of the training steps."""
    if 0 < subset.token_warmup_step < 1:
        if max_train_steps is None:
            raise ValueError("token_warmup_step < 1 needs max_train_steps")
        return math.floor(subset.token_warmup_step * max_train_steps)
    return int(subset.token_warmup_step)


def _split(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _expand_wildcards(caption: str, rng: np.random.Generator) -> str:
    if "\n" in caption:
        lines = caption.split("\n")
        caption = lines[int(rng.integers(len(lines)))]
    # `{{` and `}}` are literal braces
    open_mark, close_mark = "\x00", "\x01"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(match: re.Match) -> str:
        options = match.group(1).split("|")
        return options[int(rng.integers(len(options)))]

    caption = _WILDCARD.sub(choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def is_dropped(subset: SubsetSpec, at: CaptionStep, rng: np.random.Generator) -> bool:
    """Whole-caption dropout; the draw happens even at rate 0 so other draws keep their positions."""
    draw = rng.random()
    if subset.caption_dropout_rate > 0 and draw < subset.caption_dropout_rate:
        return True
    n = subset.caption_dropout_every_n_epochs
    return n > 0 and at.epoch % n == 0


def process_caption(subset: SubsetSpec, caption: str, at: CaptionStep, rng: np.random.Generator) -> str:
    caption = add_prefix_suffix(subset, caption)
    if is_dropped(subset, at, rng):
        return ""
    if subset.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup = warmup_steps(subset, at.max_train_steps)
    if subset.shuffle_caption or warmup > 0 or subset.caption_tag_dropout_rate > 0:
        sep = subset.caption_separator
        fixed: list[str] = []
        suffix: list[str] = []
        keep_sep = subset.keep_tokens_separator
        if keep_sep and keep_sep in caption:
            fixed_part, flex_part = caption.split(keep_sep, 1)
            if keep_sep in flex_part:
                flex_part, suffix_part = flex_part.split(keep_sep, 1)
                suffix = _split(suffix_part, sep)
            fixed = _split(fixed_part, sep)
            flex = _split(flex_part, sep)
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            fixed, flex = tokens[: subset.keep_tokens], tokens[subset.keep_tokens :]

        if warmup and at.step < warmup:
            keep = math.floor(at.step * ((len(flex) - subset.token_warmup_min) / warmup)) + subset.token_warmup_min
            flex = flex[:keep]
        if subset.shuffle_caption:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def fixed_caption(subset: SubsetSpec, caption: str) -> str:
    """The caption as it is encoded for the text cache: only the deterministic parts of processing."""
    caption = add_prefix_suffix(subset, caption).split("\n")[0]
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Lower-cased comma-separated tags and how often each occurs, as sd-scripts records for metadata."""
    freq: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq
