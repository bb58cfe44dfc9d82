"""One training step's forward: batch → noised latents → DiT → weighted loss. Fits on a screen."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anima_core.training.flow import elementwise_loss, noisy_latents, reduce_loss

T5_EOS_ID = 1


@dataclass
class StepInputs:
    latents: torch.Tensor  # B×16×h×w, float32
    qwen_states: torch.Tensor
    qwen_mask: torch.Tensor
    t5_ids: torch.Tensor
    t5_mask: torch.Tensor
    loss_weights: torch.Tensor  # B
    alpha_masks: torch.Tensor | None  # B×1×H×W in pixels, or None


def drop_captions(inputs: StepInputs, rate: float, generator: torch.Generator) -> StepInputs:
    """Embedding-level caption dropout: chosen samples get exactly the empty caption's encoding (spec §3.3)."""
    if rate <= 0:
        return inputs
    drop = torch.rand(inputs.latents.shape[0], generator=generator) < rate
    if not drop.any():
        return inputs
    drop = drop.to(inputs.qwen_states.device)
    keep = (~drop).view(-1, 1)
    empty_ids = torch.zeros_like(inputs.t5_ids)
    empty_ids[:, 0] = T5_EOS_ID
    empty_mask = torch.zeros_like(inputs.t5_mask)
    empty_mask[:, 0] = 1
    return StepInputs(
        latents=inputs.latents,
        qwen_states=inputs.qwen_states * keep.unsqueeze(-1).to(inputs.qwen_states.dtype),
        qwen_mask=inputs.qwen_mask * keep.to(inputs.qwen_mask.dtype),
        t5_ids=torch.where(keep, inputs.t5_ids, empty_ids),
        t5_mask=torch.where(keep, inputs.t5_mask, empty_mask),
        loss_weights=inputs.loss_weights,
        alpha_masks=inputs.alpha_masks,
    )


def latent_mask(alpha_masks: torch.Tensor | None, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """Alpha masks are in pixels; the loss lives on the latent grid."""
    if alpha_masks is None:
        return None
    return torch.nn.functional.interpolate(alpha_masks.float(), size=latent_hw, mode="area")


def flow_loss(dit, inputs: StepInputs, *, sampler, weighting, cfg, generator):
    """Loss of one batch, and the σ drawn (named in NaN warnings)."""
    latents = inputs.latents
    batch, _, h, w = latents.shape
    sigmas = sampler(batch, cfg, generator, (h, w)).float()
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    return noised_loss(dit, inputs, sigmas, noise, weighting=weighting, cfg=cfg), sigmas


def noised_loss(dit, inputs: StepInputs, sigmas, noise, *, weighting, cfg, input_perturbation: bool = True):
    """Loss of one batch noised at the given σ with the given noise (validation passes fixed ones, and no
    input perturbation, which is a training-time regulariser drawing from the global generator)."""
    latents = inputs.latents
    _, _, h, w = latents.shape
    device = latents.device
    noise, sigmas_dev = noise.to(device), sigmas.to(device)
    gamma = cfg.ip_noise_gamma if input_perturbation else None
    noisy = noisy_latents(latents, noise, sigmas_dev, ip_noise_gamma=gamma,
                          random_strength=cfg.ip_noise_gamma_random_strength, generator=None)
    dtype = next(dit.parameters()).dtype
    pred = dit(
        noisy.unsqueeze(2).to(dtype),
        sigmas_dev,
        inputs.qwen_states.to(dtype),
        target_input_ids=inputs.t5_ids,
        target_attention_mask=inputs.t5_mask,
        source_attention_mask=inputs.qwen_mask,
    ).squeeze(2)
    target = noise - latents
    return reduce_loss(
        elementwise_loss(pred.float(), target, sigmas_dev, cfg),
        weighting(sigmas_dev),
        inputs.loss_weights.to(device),
        latent_mask(inputs.alpha_masks, (h, w)) if inputs.alpha_masks is not None else None,
    )
