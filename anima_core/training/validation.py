"""Validation loss on the held-out split (dataset.validation_split), comparable across evaluations and runs.

Like sd-scripts, each validation batch is evaluated at four fixed noise levels, its timesteps 200, 400, 600
and 800 of 1000, which for flow matching are σ = 0.2, 0.4, 0.6 and 0.8 (no shift: the points stay the same
whatever the training's σ sampling). Unlike sd-scripts, the noise is fixed per image: the held-out batches
are always the same images in the same order (epoch 0 of the split's plan), and each batch's noise is seeded
by the validation seed and its position, the same at every σ. Two evaluations of the same weights therefore
give the same number, and a change between evaluations is the LoRA's doing, not the noise's. Each batch is
evaluated with the LoRA at its dataset's network_multiplier, the strength its images are trained at.

An evaluation changes nothing in training: no gradients, its own generators, the global random streams
restored afterwards, and the one model copy in forward-only mode (training/forward_only.py).
Cadence as in sd-scripts: every `validate_every_n_steps` steps, and at the end of every epoch (or every
`validate_every_n_epochs`-th) when there is a validation split; `max_validation_steps` bounds the batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from anima_core.training.forward_only import forward_only_mode, preserved_rng
from anima_core.training.network import applied_at
from anima_core.training.step import noised_loss

VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)


def sigma_label(sigma: float) -> str:
    return f"{sigma:.1f}"


def noise_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + 7_919 * (batch_index + 1)) % (2**63)


@dataclass
class ValidationResult:
    loss: float  # mean over the σ values of each σ's mean loss per image
    by_sigma: dict[str, float]
    images: int
    batches: int


def evaluate(trainer, data, *, seed: int, max_batches: int | None) -> ValidationResult:
    """Validation loss of the trainer's current weights on ``data`` (a TrainingData): the same batches, σ
    values and noise every time; the EMA weights when optimizer.ema_for_validation asks for them. ``trainer``
    provides ``_inputs``, ``dit``, ``network``, ``strategies``, ``weighting``, ``accelerator``, ``ema_weights``
    and ``profile`` (as the previews use it)."""
    sums = {sigma: 0.0 for sigma in VALIDATION_SIGMAS}
    images = batches = 0
    with preserved_rng(), forward_only_mode(trainer), trainer.ema_weights("validation"), torch.no_grad():
        for index, batch in enumerate(data.epoch_batches(0)):
            if max_batches is not None and index >= max_batches:
                break
            # held-out images of a dataset are judged at the network_multiplier they are trained at
            with applied_at(trainer.network, batch.network_multiplier):
                inputs = trainer._inputs(batch)
                size = inputs.latents.shape[0]
                noise = torch.randn(inputs.latents.shape, generator=torch.Generator().manual_seed(noise_seed(seed, index)))
                for sigma in VALIDATION_SIGMAS:
                    with trainer.accelerator.autocast():
                        loss = noised_loss(trainer.dit, inputs, torch.full((size,), sigma), noise,
                                           weighting=trainer.weighting, cfg=trainer.profile.training)
                    sums[sigma] += float(loss) * size
            images += size
            batches += 1
    by_sigma = {sigma_label(s): total / max(images, 1) for s, total in sums.items()}
    return ValidationResult(sum(by_sigma.values()) / len(by_sigma), by_sigma, images, batches)


class Validation:
    """Built by the trainer when the data has a validation split; ``after_step`` runs the due evaluations."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.data = trainer.data.validation
        logging = trainer.profile.logging
        self.every_steps = logging.validate_every_n_steps
        self.every_epochs = logging.validate_every_n_epochs or 1
        self.max_batches = logging.max_validation_steps
        dataset = trainer.profile.dataset
        self.seed = dataset.validation_seed if dataset.validation_seed is not None else trainer.profile.training.seed

    def due(self, step: int, epoch_completed: int | None) -> bool:
        """``epoch_completed``: the 1-based epoch that just ended at this step, if one did."""
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_epochs = epoch_completed is not None and epoch_completed % self.every_epochs == 0
        return by_steps or by_epochs

    def after_step(self, step: int, epoch: int, epoch_completed: int | None) -> ValidationResult | None:
        if not self.due(step, epoch_completed):
            return None
        trainer = self.trainer
        started = time.monotonic()
        try:
            result = evaluate(trainer, self.data, seed=self.seed, max_batches=self.max_batches)
        except Exception as exc:  # an out-of-memory evaluation must not end the run it only measures
            trainer.warn(f"validation at step {step} skipped: {exc}")
            return None
        trainer.events.emit("validation", step=step, epoch=epoch, loss=result.loss, by_sigma=result.by_sigma,
                            images=result.images, batches=result.batches,
                            seconds=round(time.monotonic() - started, 3))
        trainer.display.message(f"validation loss {result.loss:.4g} at step {step}")
        return result


def build_validation(trainer) -> Validation | None:
    """The run's validation, or None (with a warning when a validation cadence was asked for in vain)."""
    data = trainer.data.validation
    if data is None or data.num_batches_per_epoch == 0:
        logging = trainer.profile.logging
        if logging.validate_every_n_steps or logging.validate_every_n_epochs:
            why = "holds no image" if data is not None else "is not set (dataset.validation_split is 0)"
            trainer.warn(f"no validation loss: the validation split {why}")
        return None
    return Validation(trainer)
