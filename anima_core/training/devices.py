"""Dtypes by profile name, the device a run uses, and what it reports of its memory.

Its own module so that previews (sampling/during_training.py) and the trainer both use it without
importing each other.
"""

from __future__ import annotations

import gc

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def memory_stats(device: torch.device) -> dict:
    stats = {"vram_allocated": None, "vram_reserved": None, "vram_peak": None}
    if device.type == "cuda":
        stats = {
            "vram_allocated": torch.cuda.memory_allocated(device),
            "vram_reserved": torch.cuda.memory_reserved(device),
            "vram_peak": torch.cuda.max_memory_allocated(device),
        }
    try:
        import resource

        stats["ram_used"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        stats["ram_used"] = None
    return stats


def free_memory(device: torch.device) -> None:
    """Let go of what nothing references any more, on the device too."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
