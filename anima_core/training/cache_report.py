"""`validate` and `plan`: how much memory the profile's in-memory caches will take, before any run."""

from __future__ import annotations

from pathlib import Path

from anima_core.config.schema import Profile
from anima_core.data import TrainingData, build_training_data
from anima_core.data.memory import place_profile_caches
from anima_core.errors import AnimaError


def cache_memory_report(profile: Profile, data: TrainingData | None = None) -> list[str]:
    """The estimate and, when a cache would not fit, what the run will do. Without `data` (already scanned),
    the dataset is read from image headers only (fast)."""
    from anima_core.plugins import default_plugins
    from anima_core.training.data_phase import data_options
    from anima_core.training.trainer import Trainer

    c = profile.caching
    in_memory = (c.cache_latents and not c.cache_latents_to_disk) or (
        c.cache_text_encoder_outputs and not c.cache_text_encoder_outputs_to_disk
    )
    if not in_memory:
        return []
    if data is None:
        try:
            data = build_training_data(data_options(profile), base_dir=Path.cwd(), on_warning=lambda _: None, decode=False)
        except AnimaError as exc:
            return [f"in-memory cache: not estimated, the dataset cannot be read ({exc})"]
    placement = place_profile_caches(data, profile, text_dtype=Trainer(profile, default_plugins()).text_encoder_dtype)
    return placement.lines + ([f"warning: {placement.switched}"] if placement.switched else [])
