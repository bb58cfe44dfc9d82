"""Rectified-flow math as pure functions: σ sampling, noising, loss weights and loss types.

x_σ = (1 − σ)·x₀ + σ·ε, the model predicts v = ε − x₀ (spec §5).
"""

from __future__ import annotations

import math

import torch

SIGMA_CLAMP = 1e-5


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ ← s·σ / (1 + (s − 1)·σ); moves mass toward high noise when s > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _normal(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch_size, generator=generator)


def _guide_finish(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The guide's methods shift when s ≠ 1 and then clamp away from 0 and 1."""
    if shift != 1.0:
        sigmas = shift_sigmas(sigmas, shift)
    return sigmas.clamp(SIGMA_CLAMP, 1 - SIGMA_CLAMP)


def sample_logit_normal(batch_size, cfg, generator, latent_hw=None):
    return _guide_finish(torch.sigmoid(cfg.sigmoid_scale * _normal(batch_size, generator)), cfg.discrete_flow_shift)


def sample_uniform(batch_size, cfg, generator, latent_hw=None):
    return _guide_finish(torch.rand(batch_size, generator=generator), cfg.discrete_flow_shift)


def sample_sigmoid(batch_size, cfg, generator, latent_hw=None):
    return torch.sigmoid(cfg.sigmoid_scale * _normal(batch_size, generator))


def sample_shift(batch_size, cfg, generator, latent_hw=None):
    return shift_sigmas(sample_sigmoid(batch_size, cfg, generator), cfg.discrete_flow_shift)


def flux_mu(latent_h: int, latent_w: int) -> float:
    """μ on the line through (256, 0.5) and (4096, 1.15), evaluated at the DiT token count."""
    tokens = latent_h * latent_w / 4
    slope = (1.15 - 0.5) / (4096 - 256)
    return slope * tokens + (0.5 - slope * 256)


def sample_flux_shift(batch_size, cfg, generator, latent_hw):
    sigmas = sample_sigmoid(batch_size, cfg, generator)
    mu = flux_mu(*latent_hw)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def density_samples(batch_size, cfg, generator) -> torch.Tensor:
    """u in [0, 1] drawn from the weighting scheme's density (SD3-style)."""
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * _normal(batch_size, generator))
    if cfg.weighting_scheme == "mode":
        r = torch.rand(batch_size, generator=generator)
        return 1 - r - cfg.mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    return torch.rand(batch_size, generator=generator)


def sample_sigma_table(batch_size, cfg, generator, latent_hw=None):
    """σ from a 1000-entry table shift(1 − i/1000), indexed by the density sample."""
    u = density_samples(batch_size, cfg, generator)
    index = (u * 1000).long().clamp(0, 999)
    table = shift_sigmas(1 - torch.arange(1000, dtype=torch.float32) / 1000, cfg.discrete_flow_shift)
    return table[index]


TIMESTEP_SAMPLERS = {
    "logit_normal": sample_logit_normal,
    "uniform": sample_uniform,
    "sigmoid": sample_sigmoid,
    "shift": sample_shift,
    "flux_shift": sample_flux_shift,
    "sigma": sample_sigma_table,
}


def weight_uniform(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(sigmas)


def weight_sigma_sqrt(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas.pow(-2.0)


def weight_cosmap(sigmas: torch.Tensor) -> torch.Tensor:
    return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))


LOSS_WEIGHTINGS = {
    "uniform": weight_uniform,
    "none": weight_uniform,
    "logit_normal": weight_uniform,
    "mode": weight_uniform,
    "sigma_sqrt": weight_sigma_sqrt,
    "cosmap": weight_cosmap,
}


def noisy_latents(latents, noise, sigmas, *, perturbation=None):
    """x_σ = (1 − σ)·x₀ + σ·(ε + γ·ξ) with ``perturbation`` = γ·ξ (input perturbation); the target stays ε − x₀."""
    sigma = sigmas.view(-1, *([1] * (latents.dim() - 1)))
    perturbed = noise if perturbation is None else noise + perturbation
    return (1 - sigma) * latents + sigma * perturbed


def huber_c(sigmas: torch.Tensor, cfg) -> torch.Tensor:
    """Per-sample huber threshold; σ ∈ [0, 1] plays the role of the timestep (as in sd-scripts for Anima)."""
    if cfg.huber_schedule == "constant":
        return torch.full_like(sigmas, cfg.huber_c * cfg.huber_scale)
    if cfg.huber_schedule == "exponential":
        return torch.exp(math.log(cfg.huber_c) / 1000 * sigmas) * cfg.huber_scale
    raise ValueError("huber_schedule 'snr' is not defined for flow matching")


def elementwise_loss(pred, target, sigmas, cfg) -> torch.Tensor:
    if cfg.loss_type == "l2":
        return (pred - target) ** 2
    if cfg.loss_type == "l1":
        return (pred - target).abs()
    c = huber_c(sigmas, cfg).view(-1, *([1] * (pred.dim() - 1)))
    smooth = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * smooth if cfg.loss_type == "huber" else 2 * smooth


def sample_losses(elementwise, weights, mask=None) -> torch.Tensor:
    """Each sample's loss: weight per sample, apply the alpha mask, mean over non-batch dims (B values)."""
    shape = (-1,) + (1,) * (elementwise.dim() - 1)
    loss = elementwise * weights.view(shape)
    if mask is not None:
        loss = loss * mask
    return loss.flatten(1).mean(dim=1)


def reduce_loss(elementwise, weights, loss_weights, mask=None) -> torch.Tensor:
    """Weight per sample, apply the alpha mask, mean over non-batch dims, × per-sample loss weight, mean."""
    return (sample_losses(elementwise, weights, mask) * loss_weights).mean()
