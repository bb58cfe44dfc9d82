"""How much memory the in-memory caches of a dataset take, planned before anything is encoded.

The sizes are exact for latents (they follow from the buckets) and for text-encoder outputs when a Qwen3
tokenizer counts the real tokens of every caption (otherwise the padded length bounds them). In-memory
caches may use at most `MEMORY_SHARE` of the memory available at the start; the rest is left for the models
(read on the CPU before they move to the device), loader workers and batches. What does not fit is cached
on disk instead, and the run says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anima_core.data.cache import VAE_SCALE
from anima_core.data.captions import fixed_caption
from anima_core.data.compact import latent_entry_bytes, text_entry_bytes
from anima_core.data.progress import PhaseReporter, ProgressSink

MEMORY_SHARE = 0.5
QWEN3_06B_WIDTH = 1024  # hidden size of the released text encoder, used when the weights cannot be read

TokenCounter = Callable[[list[str]], list[int]]


def available_memory() -> int:
    """Bytes of RAM the system can give this process now (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gib(n: int) -> str:
    """Bytes in the unit that reads best: KiB, MiB or GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _entries(data: Any):
    """(dataset spec, subset spec, entry) of the training data and its validation part."""
    for part in [data] + ([data.validation] if data.validation else []):
        for ds in part.datasets:
            for e in ds.entries:
                yield ds.spec, ds.spec.subsets[e.subset_index], e


def latent_cache_bytes(data: Any) -> int:
    return sum(
        latent_entry_bytes(e.placement.bucket, s.flip_aug, s.alpha_mask, VAE_SCALE) for _, s, e in _entries(data)
    )


def text_cache_bytes(
    data: Any, *, width: int, itemsize: int, count_tokens: TokenCounter | None
) -> tuple[int, bool]:
    """(bytes, exact): exact when `count_tokens` gave every caption's Qwen3 token count."""
    o = data.opts
    captions = [fixed_caption(s, e.caption) for _, s, e in _entries(data)]
    if count_tokens is None:
        counts, exact = [o.qwen3_max_token_length] * len(captions), False
    else:
        counts, exact = [min(n, o.qwen3_max_token_length) for n in count_tokens(captions)], True
    return sum(text_entry_bytes(n, o.t5_max_token_length, width, itemsize) for n in counts), exact


def qwen_token_counter(tokenizer: Any, progress: ProgressSink | None = None) -> TokenCounter:
    """Counts with the tokenizer, 1000 captions at a time with progress (20,000 captions take seconds)."""

    def count(captions: list[str]) -> list[int]:
        reporter = PhaseReporter(progress, "count tokens", len(captions))
        counts = []
        for start in range(0, len(captions), 1000):
            chunk = captions[start : start + 1000]
            counts += [len(ids) for ids in tokenizer(chunk, add_special_tokens=True)["input_ids"]]
            reporter.advance(len(chunk))
        reporter.finish()
        return counts

    return count


def qwen_width(model_path: str | Path | None) -> int:
    """The text encoder's hidden size from its weights' header (no tensor is read); Qwen3-0.6B's if unreadable."""
    if model_path is None:
        return QWEN3_06B_WIDTH
    path = Path(model_path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    try:
        from safetensors import safe_open

        for file in files:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    if key.endswith("embed_tokens.weight"):
                        return int(f.get_slice(key).get_shape()[1])
    except Exception:  # noqa: BLE001 - a missing or foreign file only makes the estimate fall back
        pass
    return QWEN3_06B_WIDTH


@dataclass
class CachePlacement:
    """Where each cache goes, with the numbers behind it."""

    latents_to_disk: bool
    text_to_disk: bool
    latent_bytes: int  # 0 when latents are not cached in memory
    text_bytes: int  # 0 when text-encoder outputs are not cached in memory
    text_exact: bool
    available: int
    images: int
    lines: list[str]  # the estimate, to tell the person
    switched: str | None  # a warning when caches were moved to disk because they would not fit

    @property
    def budget(self) -> int:
        return int(self.available * MEMORY_SHARE)


def place_caches(
    data: Any,
    *,
    latents: bool,
    latents_to_disk: bool,
    text: bool,
    text_to_disk: bool,
    text_width: int,
    text_itemsize: int,
    count_tokens: TokenCounter | None = None,
    available: int | None = None,
) -> CachePlacement:
    """Estimate the in-memory caches asked for and move to disk those that would not fit (latents first)."""
    available = available_memory() if available is None else available
    budget = int(available * MEMORY_SHARE)
    images = sum(1 for _ in _entries(data))
    lat = latent_cache_bytes(data) if latents and not latents_to_disk else 0
    txt, exact = (
        text_cache_bytes(data, width=text_width, itemsize=text_itemsize, count_tokens=count_tokens)
        if text and not text_to_disk
        else (0, True)
    )
    lines: list[str] = []
    switched: list[str] = []
    if lat or txt:
        parts = []
        if lat:
            parts.append(f"latents {gib(lat)}")
        if txt:
            how = "real token counts" if exact else "padded length, an upper bound"
            parts.append(f"text-encoder outputs {gib(txt)} ({how})")
        lines.append(
            f"in-memory cache for {images} images: {', '.join(parts)}; {gib(available)} of memory available, "
            f"caches may use {gib(budget)}"
        )
    if lat > budget:
        latents_to_disk, lat = True, 0
        switched.append("latents")
    if txt > budget - lat:
        text_to_disk, txt = True, 0
        switched.append("text-encoder outputs")
    warning = None
    if switched:
        warning = (
            f"{' and '.join(switched)} would not fit in memory: caching them on disk beside the images instead "
            "(set the *_to_disk options to say so in the profile, or free memory)"
        )
    return CachePlacement(latents_to_disk, text_to_disk, lat, txt, exact, available, images, lines, warning)


def _qwen_tokenizer(model_cfg: Any) -> Any:
    from anima_core.models.tokenizer_files import load_qwen_tokenizer

    try:
        return load_qwen_tokenizer(model_cfg.qwen3_tokenizer, model_cfg.qwen3)
    except Exception:  # noqa: BLE001 - without a tokenizer the padded length bounds the estimate
        return None


def place_profile_caches(
    data: Any, profile: Any, *, text_dtype: Any, available: int | None = None, progress: ProgressSink | None = None
) -> CachePlacement:
    """`place_caches` for a profile's caching and model tables; `text_dtype` is the dtype the encoder runs in."""
    import torch

    c, m = profile.caching, profile.model
    text = c.cache_text_encoder_outputs or c.cache_text_encoder_outputs_to_disk
    tokenizer = _qwen_tokenizer(m) if text and not c.cache_text_encoder_outputs_to_disk else None
    return place_caches(
        data,
        latents=c.cache_latents or c.cache_latents_to_disk,
        latents_to_disk=c.cache_latents_to_disk,
        text=text,
        text_to_disk=c.cache_text_encoder_outputs_to_disk,
        text_width=qwen_width(m.qwen3) if text else QWEN3_06B_WIDTH,
        text_itemsize=torch.empty((), dtype=text_dtype).element_size(),
        count_tokens=None if tokenizer is None else qwen_token_counter(tokenizer, progress),
        available=available,
    )
