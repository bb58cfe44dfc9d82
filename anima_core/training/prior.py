"""Prior-model preservation: samples whose target is the base model's own prediction, not their image's velocity.

A subset marked ``prior_preservation`` in the dataset config (``dataset.reg_prior_preservation`` makes it the
default of every ``is_reg`` subset, the folder form's ``reg_data_dir`` included) is noised like any other, but
the target of its samples is what the DiT predicts for the same noised input and caption with the network's
adapters at multiplier 0. It is computed in the same micro-step, on the one model copy: one extra forward of
those samples without grad (``step.noised_loss``), before the training forward, with the batch's
network_multiplier back before that forward and so before any recompute of gradient checkpointing in backward.
The random state is kept across it, so the training forward draws what it would draw without it. Their loss is
weighted by ``dataset.prior_loss_weight`` (sd-scripts' weight of regularisation images: one option for both)
and reported on its own as the step event's ``prior_loss``: the mean over the step's prior samples, on every
process, of their loss to the base prediction before that weight.

At multiplier 0 a network must be the base model exactly: ``lora_anima`` skips its adapters then, LyCORIS's
LoKr/LoHa/LoCon/full/bypass modules add a zero difference. LyCORIS's DoRA does not: at multiplier 0 it keeps
the trained direction W + ΔW and only returns the magnitude, so it is refused, as are networks without
``set_multiplier`` and full fine-tuning (its base prediction needs a second copy of the model).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from anima_core.errors import AnimaError
from anima_core.plugins import UnknownNameError
from anima_core.training.forward_only import preserved_rng
from anima_core.training.step import StepInputs, batch_text, without_captions
from anima_core.training.targets import NetworkTarget, target_class

MARKED = "dataset config subsets with prior_preservation = true (or is_reg ones with dataset.reg_prior_preservation)"


@contextmanager
def adapters_off(network, back_to: float) -> Iterator[None]:
    """The network's adapters at multiplier 0 inside the block, at ``back_to`` (the batch's value) after it."""
    network.set_multiplier(0.0)
    try:
        yield
    finally:
        network.set_multiplier(back_to)


def _network_class(factory) -> type | None:
    """The class a registered network factory builds, when it says so (a class, or a return annotation)."""
    if isinstance(factory, type):
        return factory
    call = factory if inspect.isfunction(factory) or inspect.ismethod(factory) else getattr(type(factory), "__call__", None)
    try:
        returned = typing.get_type_hints(call).get("return") if call is not None else None
    except Exception:  # noqa: BLE001 - an annotation that does not resolve says nothing
        return None
    return returned if isinstance(returned, type) else None


def switch_off_problem(profile, plugins, network=None) -> str | None:
    """Why the profile's network cannot be switched off to give the base model's prediction ("key: why"), or
    None. ``network``: the built network, when there is one (the run's own check)."""
    module = profile.network.module
    if target_class(profile) is not NetworkTarget:
        return (f"network.module: {module!r} trains the model's own weights, not a network whose adapters switch off, "
                "so the base model's prediction would need a second copy of the model; prior preservation "
                f"({MARKED}) needs a network (lora_anima or lycoris)")
    try:
        factory = plugins.registry("register_networks").get(module)
    except UnknownNameError:
        return None  # the profile checks name it
    own = getattr(factory, "switch_off_problem", None)  # what only the plugin knows (its args)
    why = own(profile.network) if own is not None else None
    if why:
        return why
    cls = type(network) if network is not None else _network_class(factory)
    if cls is not None and not hasattr(cls, "set_multiplier"):
        return (f"network.module: {module!r} cannot scale its adapters (it has no set_multiplier), so it cannot give "
                f"the base model's prediction that prior preservation ({MARKED}) trains toward; use lora_anima or "
                "lycoris, or remove prior_preservation")
    return None


def prior_problems(profile, plugins, datasets) -> list[str]:
    """What `validate` says of prior preservation for the resolved datasets (``DatasetSpec`` list)."""
    subsets = [s for spec in datasets for s in spec.subsets if s.num_repeats > 0]
    if not any(s.prior_preservation for s in subsets):
        return []
    problems = []
    if all(s.prior_preservation for s in subsets):
        problems.append("dataset: every subset is marked prior_preservation, so every target is the base model's own "
                        "prediction and the LoRA learns nothing; keep it off the subsets the LoRA is to learn")
    why = switch_off_problem(profile, plugins)
    if why:
        problems.append(why)
    return problems


class PriorPass:
    """Prior preservation for one batch: the base model (adapters off, no grad, random state kept) and the
    losses of its prior samples, recorded by ``step.noised_loss``."""

    def __init__(self, network, multiplier: float, conditioning=None):
        self.network, self.multiplier = network, multiplier
        self._conditioning = conditioning  # () -> StepInputs with the text encoded with the adapters off
        self.losses: torch.Tensor | None = None

    @contextmanager
    def base_model(self) -> Iterator[None]:
        with torch.no_grad(), preserved_rng(), adapters_off(self.network, self.multiplier):
            yield

    def conditioning(self, inputs: StepInputs) -> StepInputs:
        """The inputs the base model sees: the training inputs, or with the text encoder's adapters off their
        captions encoded again (inside ``base_model``)."""
        return inputs if self._conditioning is None else self._conditioning()

    def record(self, losses: torch.Tensor) -> None:
        self.losses = losses


class PriorPreservation:
    """A run's prior preservation: a ``PriorPass`` for each batch with prior samples, and the sum and count of
    their losses since the last step report (per process; the report adds them over the processes)."""

    def __init__(self, trainer):
        """Built once the training target exists; refuses a target that cannot be switched off when the data
        has prior samples (validate says so before any model loads)."""
        target = trainer.target
        # (validation splits hold no prior samples: data/scan.py never holds them out)
        self.asked = any(s.prior_preservation for ds in getattr(trainer.data, "datasets", ()) for s in ds.spec.subsets)
        self.network = target.module
        if self.asked:
            why = switch_off_problem(trainer.profile, trainer.plugins, network=self.network)
            if why is None and not hasattr(self.network, "set_multiplier"):
                why = "the training target has no set_multiplier to switch its adapters off"
            if why:
                raise AnimaError(f"prior preservation cannot run: {why}")
        self.reencode = target.trains_text_encoder
        self.text_encoder, self.device, self.model_cfg = trainer.text_encoder, trainer.device, trainer.profile.model
        self._sum: torch.Tensor | float = 0.0
        self._count = 0

    def for_batch(self, batch, inputs: StepInputs) -> PriorPass | None:
        """The pass for a batch (None without prior samples). The captions the step dropped (``inputs.dropped``)
        are dropped from the base model's conditioning too."""
        prior = getattr(batch, "prior", None)
        if prior is None or not bool(prior.any()):
            return None
        if not (self.reencode and batch.text is None):
            return PriorPass(self.network, batch.network_multiplier)

        def encoded_off() -> StepInputs:  # the text encoder's adapters change the conditioning too
            qwen_states, qwen_mask, t5_ids, t5_mask = batch_text(
                batch, device=self.device, text_encoder=self.text_encoder, text_needs_grad=False, model_cfg=self.model_cfg)
            base = StepInputs(inputs.latents, qwen_states, qwen_mask, t5_ids, t5_mask, inputs.loss_weights,
                              inputs.alpha_masks, inputs.prior)
            return without_captions(base, inputs.dropped)

        return PriorPass(self.network, batch.network_multiplier, encoded_off)

    def add(self, prior_pass: PriorPass | None) -> None:
        """Count a micro-step's pass (after the executor ran it: a compile failure's rerun is counted once)."""
        if prior_pass is None or prior_pass.losses is None:
            return
        self._sum = self._sum + prior_pass.losses.sum()
        self._count += prior_pass.losses.numel()

    def take(self) -> tuple[float, int]:
        """(sum, count) of the prior losses since the last call, and start again."""
        total, count = float(self._sum), self._count
        self._sum, self._count = 0.0, 0
        return total, count
