"""Which mixed precision a run uses on its device, and the sentence saying why when it differs from the profile."""

from __future__ import annotations

import torch


def choose_precision(training, device: torch.device) -> tuple[str, str | None]:
    """(precision, note). On the CPU fp16 has no autocast path and bf16 runs about half as fast as float32, so
    both become float32; bf16 stays when the profile asks for it explicitly with ``training.device = "cpu"``."""
    asked = training.mixed_precision
    if device.type != "cpu" or asked == "no":
        return asked, None
    if asked == "fp16":
        return "no", "fp16 mixed precision needs a GPU; training in float32 on the CPU"
    if training.device == "cpu" and "mixed_precision" in training.model_fields_set:
        return asked, None
    return "no", (
        'bf16 on the CPU is about half as fast as float32; training in float32 (set training.device = "cpu" '
        'with mixed_precision = "bf16" to keep bf16)'
    )
