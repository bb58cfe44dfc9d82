"""What `validate` checks of a `[slider]` section: every problem at once, each naming its key.

A slider trains from prompt pairs only (anima_core/training/slider.py), so the keys that need images, a text
encoder LoRA or a weight that cannot be scaled by a strength are refused next to it."""

from __future__ import annotations

from anima_core.config.full_rules import FULL
from anima_core.config.schema import Profile


def is_slider(profile: Profile) -> bool:
    """A profile with any ``[[slider.pairs]]`` trains a slider."""
    return bool(profile.slider.pairs)


def _resolution_problems(resolution) -> list[str]:
    sides = [resolution] if isinstance(resolution, int) else list(resolution)
    if len(sides) not in (1, 2):
        return [f"slider.resolution: give one int or [width, height] (got {resolution!r})"]
    if any(side < 16 or side % 16 for side in sides):
        return [f"slider.resolution: {resolution} must be multiples of 16 of at least 16 (the DiT patches 2×2 "
                "latents of an 8× VAE)"]
    return []


def slider_problems(profile: Profile) -> list[str]:
    slider = profile.slider
    given = [key for key, info in type(slider).model_fields.items()  # keys set to other than their defaults
             if key != "pairs" and getattr(slider, key) != info.get_default(call_default_factory=True)]
    if not slider.pairs:
        if given:
            return [f"slider: sets {', '.join(given)} but has no [[slider.pairs]]; add a pair (target, positive, "
                    "negative) or remove the [slider] table"]
        return []
    problems = _resolution_problems(slider.resolution)
    for i, pair in enumerate(slider.pairs):
        where = f"slider.pairs.{i}"
        if not pair.target.strip():
            problems.append(f"{where}.target: empty; name the prompt the slider acts on")
        if pair.positive.strip() == pair.negative.strip():
            problems.append(f"{where}: positive and negative are the same prompt, so the slider's direction "
                            "(positive − negative) is zero")
    if not slider.preview_strengths:
        problems.append("slider.preview_strengths: empty; give the strengths previews are rendered at, e.g. [-1, 0, 1]")
    data = profile.dataset
    for key in ("dataset_config", "train_data_dir", "reg_data_dir"):
        if getattr(data, key) is not None:
            problems.append(f"dataset.{key}: a slider trains from its prompt pairs, not images; remove it (or the "
                            "[[slider.pairs]])")
    if data.validation_split:
        problems.append("dataset.validation_split: a slider has no images to hold out; remove it")
    for key in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        if getattr(profile.logging, key):
            problems.append(f"logging.{key}: a slider has no held-out images to validate on; remove it")
    if profile.network.module == FULL:
        problems.append("network.module: a slider trains the LoRA at strength +1 and -1 against the base model at 0, "
                        "which full fine-tuning has no strength for; use lora_anima or lycoris")
    elif not profile.network.train_unet_only:
        problems.append("network.train_unet_only: a slider encodes its prompts once, so Qwen3 cannot get a LoRA; set "
                        "it to true")
    training = profile.training
    if training.caption_dropout_rate:
        problems.append("training.caption_dropout_rate: a slider's prompts are its pairs and are never dropped; set "
                        "it to 0")
    if training.ip_noise_gamma:
        problems.append("training.ip_noise_gamma: a slider's targets are the base model's predictions on the same "
                        "state, which input perturbation has no meaning for; remove it")
    return problems
