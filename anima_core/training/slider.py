"""Slider LoRAs (Concept Sliders, Gandikota et al. 2023): a LoRA whose strength moves one attribute both ways,
trained from prompt pairs with the base model's own predictions as targets; no images.

The arithmetic, in velocity space. The paper states its target for an ε-predicting model: at the slider's
+1 the prediction on the target prompt should be ε* = ε(neutral) + η·(ε(positive) − ε(negative)). Anima predicts
the rectified-flow velocity v = ε − x₀ of x_σ = (1 − σ)·x₀ + σ·ε, and at one state x_σ each prediction is tied to
its ε estimate by the same affine map, ε̂ = x_σ + (1 − σ)·v̂. Putting it into the ε target:

    x_σ + (1 − σ)·v* = x_σ + (1 − σ)·v(neutral) + η·(1 − σ)·(v(positive) − v(negative))

and x_σ and (1 − σ) cancel (σ < 1), so with the same η:

    v₊ = v(neutral) + η·(v(positive) − v(negative))      the target at strength +1
    v₋ = v(neutral) − η·(v(positive) − v(negative))      the target at strength −1

(the coefficients 1, +η, −η sum to 1, so the x₀ estimates x̂₀ = x_σ − σ·v̂ give the same combination too). Every
v is the base model's prediction (the network at multiplier 0, no grad) at the same x_σ and σ, and η is the
pair's guidance scale. The LoRA is trained at multiplier +1 toward v₊ and at −1 toward v₋ on the target prompt,
both in every step, with the profile's loss type and σ weighting; one backward each (the network's multiplier
stays at the pass's value through its backward, where checkpointing recomputes the forward).

The state x_σ: σ from the profile's timestep sampler, and either x_σ = (1 − σ)·x₀ + σ·ε with random x₀ ~ N(0, I)
(``slider.denoise_steps = 0``), or N Euler steps of the base model on the target prompt from pure noise (σ = 1)
down to σ along equal steps of σ (states that sampling the target prompt reaches; N more forwards).
Every draw of a sample comes from its own generator (step.sample_generators), so results do not depend on
the number of processes or the accumulation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from anima_core.errors import AnimaError
from anima_core.training.flow import elementwise_loss, reduce_loss
from anima_core.training.step import sample_generators, step_seed

STRENGTHS = (1.0, -1.0)  # the strengths every step trains, in this order
BASE = 0.0  # the network's multiplier for the base model's predictions


@dataclass
class SliderInputs:
    """One slider batch on the device: per role ("target", "neutral", "positive", "negative") the stacked text
    outputs (qwen_states, qwen_mask, t5_ids, t5_mask), and per sample η and the loss weight."""

    text: dict[str, tuple[torch.Tensor, ...]]
    etas: torch.Tensor  # B
    loss_weights: torch.Tensor  # B
    latent_hw: tuple[int, int]


def slider_targets(neutral: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                   etas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v₊, v₋) = v(neutral) ± η·(v(positive) − v(negative)), η per sample (see the module docstring)."""
    eta = etas.to(neutral.dtype).view(-1, *([1] * (neutral.dim() - 1)))
    direction = eta * (positive - negative)
    return neutral + direction, neutral - direction


def _predict(dit, x: torch.Tensor, sigmas: torch.Tensor, text: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The DiT's velocity for B×16×h×w states (float32 out), as the training step calls it."""
    dtype = next(dit.parameters()).dtype
    states, mask, ids, t5_mask = text
    return dit(x.unsqueeze(2).to(dtype), sigmas, states.to(dtype), target_input_ids=ids,
               target_attention_mask=t5_mask, source_attention_mask=mask).squeeze(2).float()


def _cat(texts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*texts))


def draws(inputs: SliderInputs, *, sampler, cfg, generators) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, from its generator in this order: σ (the profile's sampler), the noise ε and the random x₀."""
    h, w = inputs.latent_hw
    sigmas = torch.cat([sampler(1, cfg, g, (h, w)).float().reshape(1) for g in generators])
    noise = torch.stack([torch.randn((16, h, w), generator=g, dtype=torch.float32) for g in generators])
    x0 = torch.stack([torch.randn((16, h, w), generator=g, dtype=torch.float32) for g in generators])
    return sigmas, noise, x0


def noised_state(dit, network_at, inputs: SliderInputs, sigmas, noise, x0, *, denoise_steps: int) -> torch.Tensor:
    """x_σ: random x₀ noised to σ, or ``denoise_steps`` Euler steps of the base model (``network_at(BASE)``) on the
    target prompt from ε at σ = 1 down to σ, in equal steps of σ: x ← x + (s' − s)·v(x, s), since dx/dσ = v."""
    device = sigmas.device
    if denoise_steps <= 0:
        sigma = sigmas.view(-1, 1, 1, 1)
        return (1 - sigma) * x0.to(device) + sigma * noise.to(device)
    x = noise.to(device)
    with torch.no_grad(), network_at(BASE):
        for i in range(denoise_steps):
            s = 1 - (1 - sigmas) * (i / denoise_steps)
            s_next = 1 - (1 - sigmas) * ((i + 1) / denoise_steps)
            v = _predict(dit, x, s, inputs.text["target"])
            x = x + (s_next - s).view(-1, 1, 1, 1) * v
    return x


def base_targets(dit, network_at, inputs: SliderInputs, x: torch.Tensor, sigmas: torch.Tensor):
    """The base model's (v₊, v₋) at the state: one forward of neutral, positive and negative stacked, at the
    network's multiplier 0 and without grad."""
    b = x.shape[0]
    with torch.no_grad(), network_at(BASE):
        text = _cat([inputs.text[role] for role in ("neutral", "positive", "negative")])
        v = _predict(dit, x.repeat(3, 1, 1, 1), sigmas.repeat(3), text)
    return slider_targets(v[:b], v[b:2 * b], v[2 * b:], inputs.etas)


def direction_loss(dit, inputs: SliderInputs, x, sigmas, target, *, weighting, cfg) -> torch.Tensor:
    """The LoRA's prediction on the target prompt (at whatever multiplier is set) against one target."""
    pred = _predict(dit, x, sigmas, inputs.text["target"])
    return reduce_loss(elementwise_loss(pred, target, sigmas, cfg), weighting(sigmas), inputs.loss_weights)


def slider_inputs(batch, device) -> SliderInputs:
    return SliderInputs(text={role: tuple(t.to(device) for t in text) for role, text in batch.text.items()},
                        etas=batch.etas.to(device), loss_weights=batch.loss_weights.to(device),
                        latent_hw=batch.latent_hw)


def slider_network_problems(profile, plugins, network=None) -> list[str]:
    """Why the profile's network cannot give a slider's targets: they are the network at multiplier 0, which must
    be the base model (prior preservation's condition, training/prior.py), and it is trained at +1 and -1 through
    set_multiplier. Full fine-tuning is named by the profile checks (config/slider_rules.py)."""
    from anima_core.config.full_rules import FULL
    from anima_core.training.prior import switch_off_problem

    if profile.network.module == FULL:
        return []
    why = switch_off_problem(profile, plugins, network=network)
    if why is None:
        return []
    key, _, detail = why.partition(": ")
    return [f"{key}: a slider's targets are the network's predictions at multiplier 0, which must be the base model, "
            f"and this network's are not (what refuses prior preservation too: {detail})"]


def refuse_unfit_networks(trainer) -> None:
    """The run's own check of the built network, once (a Python caller may skip validate)."""
    if getattr(trainer, "slider_network_checked", False):
        return
    module = getattr(trainer.target, "module", None)
    if not hasattr(module, "set_multiplier"):
        raise AnimaError("a slider needs a network whose strength can be set (set_multiplier), to train it at +1 and -1 "
                         "against the base model at 0; use network.module = 'lora_anima' or 'lycoris'")
    problems = slider_network_problems(trainer.profile, trainer.plugins, network=module)
    if problems:
        raise AnimaError("the slider cannot run: " + "; ".join(problems))
    trainer.slider_network_checked = True


def slider_micro_step(trainer, batch, step: int, micro: int, first_place: int, planned: int):
    """The trainer's micro-step for a slider batch (same contract as ``Trainer._micro_step``): this process's
    slice of a global batch of ``planned`` samples, forward and backward at +1 and -1, the loss (mean of the
    two directions) scaled by the slice's share. Returns (the scaled loss, [(pair label, σ)])."""
    t = trainer.profile.training
    refuse_unfit_networks(trainer)
    denoise_steps = trainer.profile.slider.denoise_steps
    accum = t.gradient_accumulation_steps

    def forward_backward():  # seeded from the top, so a compile failure's eager rerun draws the same
        torch.manual_seed(step_seed(t.seed, step, micro))
        generators = sample_generators(t.seed, step, [first_place + p for p in batch.positions])
        inputs = slider_inputs(batch, trainer.device)
        sigmas, noise, x0 = (d.to(trainer.device) for d in draws(inputs, sampler=trainer.sampler, cfg=t,
                                                                  generators=generators))
        share = len(batch.positions) / planned
        at = trainer.target.batch_multiplier
        with trainer.accelerator.autocast():
            x = noised_state(trainer.dit, at, inputs, sigmas, noise, x0, denoise_steps=denoise_steps)
            targets = base_targets(trainer.dit, at, inputs, x, sigmas)
        total = torch.zeros((), device=trainer.device)
        for strength, target in zip(STRENGTHS, targets):
            with at(strength):  # backward inside: checkpointing recomputes at this strength
                with trainer.accelerator.autocast():
                    loss = direction_loss(trainer.dit, inputs, x, sigmas, target, weighting=trainer.weighting, cfg=t)
                trainer.accelerator.backward(loss * (share / (len(STRENGTHS) * accum)))
            total = total + loss.detach()
        return inputs, total / len(STRENGTHS) * share, sigmas

    torch.manual_seed(step_seed(t.seed, step, micro))
    inputs, loss, sigmas = trainer.executor.run(forward_backward, trainer.params)
    trainer.tflop_done += slider_tflop(trainer, inputs, len(batch.positions), denoise_steps)
    return loss, list(zip(batch.labels, sigmas.tolist()))


def slider_tflop(trainer, inputs: SliderInputs, batch: int, denoise_steps: int) -> float:
    """The step's model math as the speed report counts it: two trained passes (forward and backward) plus the
    base model's forwards (3 for the targets, one per denoise step), each a forward of the floor's count."""
    from anima_core.training.flops import forward_tflop, step_tflop

    text_tokens = inputs.text["target"][2].shape[1]
    trained = step_tflop(trainer.dit.config, latent_hw=inputs.latent_hw, text_tokens=text_tokens, batch=batch,
                         checkpointing=trainer.checkpointing)
    forward = forward_tflop(trainer.dit.config, latent_hw=inputs.latent_hw, text_tokens=text_tokens, batch=batch)
    return len(STRENGTHS) * trained + (3 + denoise_steps) * forward


def slider_caching(trainer) -> tuple[None, object]:
    """The caching phase of a slider run: the text encoder encodes every prompt of the pairs once, then leaves
    the device (the slider trains the DiT only). No VAE: there are no images, and previews load their own.
    Returns (the VAE: None, the text encoder), as caching_phase.run_caching does."""
    from anima_core.training.devices import free_memory

    model, data = trainer.profile.model, trainer.data
    text_encoder = trainer.models.load_text_encoder(model, dtype=trainer.text_encoder_dtype, device=trainer.device)
    trainer.log(f"encoding the slider's {len(data.prompts)} prompt(s)")
    data.cache_text(text_encoder, qwen_max_length=model.qwen3_max_token_length, t5_max_length=model.t5_max_token_length,
                    batch_size=trainer.profile.caching.text_encoder_batch_size)
    text_encoder.model.to("cpu")
    free_memory(trainer.device)
    return None, text_encoder


def slider_summary(profile) -> list[str]:
    """What `validate` says a slider profile will train: the pairs, and steps per epoch and in all."""
    from anima_core.data.slider_data import build_slider_data

    training = profile.training
    data = build_slider_data(profile, SimpleNamespace(num_processes=training.num_processes, index=0))
    per_epoch = -(-data.num_batches_per_epoch // training.gradient_accumulation_steps)
    total = training.max_train_epochs * per_epoch if training.max_train_epochs else training.max_train_steps
    lines = data.bucket_report()
    lines[0] += f", {per_epoch} step(s) per epoch, {total} step(s) in all"
    return lines
