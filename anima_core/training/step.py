"""One training step's forward: batch → noised latents → DiT → weighted loss. Fits on a screen.

Every random draw for a sample (caption dropout, σ, noise, input perturbation) comes from that sample's own
generator, seeded by (seed, step, the sample's place among the step's samples). A sample therefore gets the
same draws whichever process trains it, whatever else shares its batch and however the step's samples are
split into accumulated micro-batches: the result does not depend on the number of processes (see
training/distributed.py), and batch 1 × 2 accumulated micro-batches draws what batch 2 draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import random

import numpy as np
import torch

from anima_core.training.flow import elementwise_loss, noisy_latents, sample_losses

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
    prior: torch.Tensor | None = None  # B bool: targets are the base model's prediction (training/prior.py), or None
    dropped: torch.Tensor | None = None  # B bool: the samples whose caption this step dropped, or None

    def rows(self, index: torch.Tensor) -> StepInputs:
        """The inputs of the samples at ``index`` (a LongTensor on the inputs' device)."""
        def pick(t):
            return None if t is None else t.index_select(0, index.to(t.device))

        return StepInputs(pick(self.latents), pick(self.qwen_states), pick(self.qwen_mask), pick(self.t5_ids),
                          pick(self.t5_mask), pick(self.loss_weights), pick(self.alpha_masks), pick(self.prior),
                          pick(self.dropped))


def step_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the global RNG for a micro-step (LoRA dropouts draw from it), the same on every process."""
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_inputs(batch, *, device, vae, text_encoder, text_needs_grad: bool, model_cfg) -> StepInputs:
    """A batch on the device as the step's inputs: cached latents and text outputs, or encoded now (the text
    encoder with grad when its adapters train and grad is on; validation calls this without grad)."""
    if batch.latents is not None:
        latents = batch.latents.to(device, torch.float32)
    else:
        with torch.no_grad():
            latents = vae.encode(batch.pixels.to(device)).float()
    qwen_states, qwen_mask, t5_ids, t5_mask = batch_text(batch, device=device, text_encoder=text_encoder,
                                                         text_needs_grad=text_needs_grad, model_cfg=model_cfg)
    masks = batch.alpha_masks.to(device) if batch.alpha_masks is not None else None
    if masks is not None and masks.dim() == 3:
        masks = masks.unsqueeze(1)
    return StepInputs(latents, qwen_states, qwen_mask, t5_ids, t5_mask, batch.loss_weights.float(), masks,
                      getattr(batch, "prior", None))


def batch_text(batch, *, device, text_encoder, text_needs_grad: bool, model_cfg):
    """(qwen_states, qwen_mask, t5_ids, t5_mask) of a batch: its cached outputs, or its captions encoded now."""
    if batch.text is not None:
        return tuple(t.to(device) for t in batch.text)
    with torch.enable_grad() if text_needs_grad and torch.is_grad_enabled() else torch.no_grad():
        return text_encoder.encode(batch.captions, model_cfg.qwen3_max_token_length, model_cfg.t5_max_token_length)


def sample_generators(seed: int, step: int, places: Iterable[int]) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, step, place among the step's samples: the samples planned
    in the step's earlier micro-batches plus the place in its global batch); SeedSequence mixes them so that
    nearby keys give unrelated streams. (The 0 stands where the micro-batch's number once was: steps of one
    micro-batch keep the draws they had.)"""
    generators = []
    for place in places:
        state = np.random.SeedSequence([seed % 2**64, step, 0, place]).generate_state(2, np.uint32)
        generators.append(torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1))
    return generators


def drop_captions(inputs: StepInputs, rate: float, generators: Sequence[torch.Generator]) -> StepInputs:
    """Embedding-level caption dropout: chosen samples get exactly the empty caption's encoding (spec §3.3)."""
    return without_captions(inputs, caption_drops(rate, generators))


def caption_drops(rate: float, generators: Sequence[torch.Generator]) -> torch.Tensor | None:
    """Which samples lose their caption (one draw per sample's generator), or None without dropout."""
    if rate <= 0:
        return None
    return torch.cat([torch.rand(1, generator=g) for g in generators]) < rate


def without_captions(inputs: StepInputs, drop: torch.Tensor | None) -> StepInputs:
    """The inputs with the ``drop`` samples' captions replaced by the empty caption's encoding."""
    if drop is None or not drop.any():
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
        prior=inputs.prior,
        dropped=drop,
    )


def latent_mask(alpha_masks: torch.Tensor | None, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """Alpha masks are in pixels; the loss lives on the latent grid."""
    if alpha_masks is None:
        return None
    return torch.nn.functional.interpolate(alpha_masks.float(), size=latent_hw, mode="area")


def _perturbation(shape, cfg, generator: torch.Generator) -> torch.Tensor | None:
    """γ·ξ of input perturbation for one sample (γ scaled by U(0, 1) with random strength)."""
    if not cfg.ip_noise_gamma:
        return None
    gamma = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        gamma = gamma * torch.rand((), generator=generator)
    return gamma * torch.randn(shape, generator=generator)


def flow_loss(dit, inputs: StepInputs, *, sampler, weighting, cfg, generators: Sequence[torch.Generator], prior=None):
    """Loss of one batch (mean over its samples), and the σ drawn (named in NaN warnings).
    ``generators``: one per sample (``sample_generators``); ``prior``: see ``noised_loss``."""
    latents = inputs.latents
    batch, _, h, w = latents.shape
    sigmas = torch.cat([sampler(1, cfg, g, (h, w)).float().reshape(1) for g in generators])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    perturbation = torch.stack([_perturbation(latents.shape[1:], cfg, g) for g in generators]) if cfg.ip_noise_gamma else None
    return noised_loss(dit, inputs, sigmas, noise, weighting=weighting, cfg=cfg, perturbation=perturbation,
                       prior=prior), sigmas


def predict(dit, noisy: torch.Tensor, sigmas: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """The DiT's velocity for noised latents B×16×h×w at σ, conditioned on the inputs' text."""
    dtype = next(dit.parameters()).dtype
    return dit(
        noisy.unsqueeze(2).to(dtype),
        sigmas,
        inputs.qwen_states.to(dtype),
        target_input_ids=inputs.t5_ids,
        target_attention_mask=inputs.t5_mask,
        source_attention_mask=inputs.qwen_mask,
    ).squeeze(2)


def noised_loss(dit, inputs: StepInputs, sigmas, noise, *, weighting, cfg, perturbation=None, prior=None):
    """Loss of one batch noised at the given σ with the given noise and input perturbation γ·ξ (validation
    passes fixed ones, and no perturbation, which is a training-time regulariser).

    The samples marked in ``inputs.prior`` take as target the base model's own prediction for the same noised
    input: ``prior`` (a ``prior.PriorPass``) runs the DiT on them first, without grad and with the network's
    adapters off, and records their losses."""
    latents = inputs.latents
    batch, _, h, w = latents.shape
    device = latents.device
    noise, sigmas_dev = noise.to(device), sigmas.to(device)
    perturbation = perturbation.to(device) if perturbation is not None else None
    noisy = noisy_latents(latents, noise, sigmas_dev, perturbation=perturbation)
    target = noise - latents
    rows = None
    if inputs.prior is not None and bool(inputs.prior.any()):
        if prior is None:
            raise ValueError("the batch has prior-preservation samples, but no prior pass was given to compute their targets")
        rows = inputs.prior.nonzero().flatten().to(device)
        whole = len(rows) == batch  # every sample: no copies, and the same shapes as the training forward
        with prior.base_model():
            conditioning = prior.conditioning(inputs)
            if not whole:
                conditioning = conditioning.rows(rows)
            base = predict(dit, noisy if whole else noisy[rows], sigmas_dev if whole else sigmas_dev[rows], conditioning)
        target = base.float() if whole else target.index_copy(0, rows, base.float())
    pred = predict(dit, noisy, sigmas_dev, inputs)
    losses = sample_losses(
        elementwise_loss(pred.float(), target, sigmas_dev, cfg),
        weighting(sigmas_dev),
        latent_mask(inputs.alpha_masks, (h, w)) if inputs.alpha_masks is not None else None,
    )
    if rows is not None:
        prior.record(losses.detach()[rows])
    return (losses * inputs.loss_weights.to(device)).mean()
