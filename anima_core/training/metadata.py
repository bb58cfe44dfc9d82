"""LoRA file metadata: the sd-scripts `ss_*` keys (spec §8.1), the Anima keys of the guide, ModelSpec."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

from anima_core import __version__
from anima_core.config.schema import Profile

# Ours, beside sd-scripts' keys: the DiT a LoRA was trained on (``lora-info`` shows it).
DIT_KEY, DIT_BLOCKS_KEY = "anima_dit", "anima_dit_blocks"
ESSENTIAL_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def _text(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _resolution(profile: Profile) -> str:
    res = profile.dataset.resolution
    if res is None:
        return "1024x1024"
    if isinstance(res, int):
        return f"{res}x{res}"
    return f"{res[0]}x{res[-1]}"


def training_metadata(profile: Profile, *, data_metadata: dict, total_steps: int, num_epochs: int,
                      started_at: float, dit_config=None, session_id: str | None = None) -> dict[str, str]:
    """Keys fixed at the start of a run; `finish_metadata` adds the per-save ones. ``dit_config``, the trained
    DiT's detected config, names the model the LoRA was made for (Anima 2B or 2.9B: their block counts differ)."""
    t, o, d, m, c = profile.training, profile.optimizer, profile.dataset, profile.memory, profile.caching
    ss = {
        "ss_session_id": session_id or uuid.uuid4().hex[:16],
        "ss_training_started_at": started_at,
        "ss_output_name": profile.saving.output_name,
        "ss_learning_rate": o.learning_rate,
        "ss_text_encoder_lr": o.text_encoder_lr,
        "ss_unet_lr": o.unet_lr,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": m.gradient_checkpointing or m.unsloth_offload_checkpointing or m.cpu_offload_checkpointing
        or bool(getattr(m, "selective_checkpointing", False)) or "selective_checkpointing" in getattr(m, "extra_strategies", ()),
        "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "ss_max_train_steps": total_steps,
        "ss_lr_warmup_steps": o.lr_warmup_steps,
        "ss_lr_scheduler": o.lr_scheduler,
        "ss_mixed_precision": t.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": False,
        "ss_base_model_version": "anima",
        "ss_clip_skip": None,
        "ss_max_token_length": profile.model.qwen3_max_token_length,
        "ss_cache_latents": c.cache_latents or c.cache_latents_to_disk,
        "ss_seed": t.seed,
        "ss_lowram": False,
        "ss_noise_offset": None,
        "ss_multires_noise_iterations": None,
        "ss_multires_noise_discount": None,
        "ss_adaptive_noise_scale": None,
        "ss_zero_terminal_snr": False,
        "ss_training_comment": profile.saving.training_comment,
        "ss_sd_scripts_commit_hash": f"anima-train {__version__}",
        "ss_optimizer": o.optimizer_type + (f"({json.dumps(o.optimizer_args)})" if o.optimizer_args else ""),
        "ss_max_grad_norm": o.max_grad_norm,
        "ss_caption_dropout_rate": t.caption_dropout_rate or d.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": d.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": d.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": d.prior_loss_weight,
        "ss_min_snr_gamma": None,
        "ss_scale_weight_norms": o.scale_weight_norms,
        "ss_max_validation_steps": profile.logging.max_validation_steps,
        "ss_ip_noise_gamma": t.ip_noise_gamma,
        "ss_debiased_estimation": False,
        "ss_noise_offset_random_strength": False,
        "ss_ip_noise_gamma_random_strength": t.ip_noise_gamma_random_strength,
        "ss_loss_type": t.loss_type,
        "ss_huber_schedule": t.huber_schedule,
        "ss_huber_scale": t.huber_scale,
        "ss_huber_c": t.huber_c,
        "ss_fp8_base": m.fp8_base,
        "ss_fp8_base_unet": m.fp8_base_unet,
        "ss_validation_seed": d.validation_seed,
        "ss_validation_split": d.validation_split,
        "ss_resize_interpolation": d.resize_interpolation,
        # Anima keys: the guide's (first release) and current sd-scripts'.
        "ss_apply_t5_attn_mask": profile.model.apply_t5_attn_mask,
        "ss_weighting_scheme": t.weighting_scheme,
        "ss_discrete_flow_shift": t.discrete_flow_shift,
        "ss_timestep_sample_method": t.timestep_sampling,
        "ss_timestep_sampling": t.timestep_sampling,
        "ss_sigmoid_scale": t.sigmoid_scale,
        "ss_logit_mean": t.logit_mean,
        "ss_logit_std": t.logit_std,
        "ss_mode_scale": t.mode_scale,
        "ss_sd_model_name": profile.model.dit.name if profile.model.dit else None,
        "ss_vae_name": profile.model.vae.name if profile.model.vae else None,
    }
    ss.update(data_metadata)
    if dit_config is not None:
        from anima_core.models.dit_loading import describe_dit

        ss[DIT_KEY] = describe_dit(dit_config)
        ss[DIT_BLOCKS_KEY] = dit_config.num_blocks
    return {k: _text(v) for k, v in ss.items()}


def modelspec(profile: Profile) -> dict[str, str]:
    s = profile.saving
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "anima-preview/lora",
        "modelspec.implementation": "https://huggingface.co/circlestone-labs/Anima",
        "modelspec.title": s.metadata_title or s.output_name,
        "modelspec.resolution": _resolution(profile),
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # sd-scripts writes "epsilon" for every non-Flux model; tools that read Anima LoRAs expect its value.
        "modelspec.prediction_type": "epsilon",
        "modelspec.implementation_version": f"anima-train/{__version__}",
    }
    for key in ("author", "description", "license", "tags"):
        value = getattr(s, f"metadata_{key}")
        if value:
            spec[f"modelspec.{key}"] = value
    return spec


def save_metadata(profile: Profile, base: dict[str, str], network_metadata: dict[str, str], *, step: int, epoch: int) -> dict[str, str]:
    """The metadata written into one saved LoRA file."""
    full = {**base, **network_metadata,
            "ss_training_finished_at": _text(time.time()), "ss_steps": _text(step), "ss_epoch": _text(epoch)}
    if profile.saving.no_metadata:
        full = {k: v for k, v in full.items() if k in ESSENTIAL_KEYS}
    return {**full, **modelspec(profile)}
