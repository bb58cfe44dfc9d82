"""The preview sampler: Euler on the rectified-flow ODE with a shifted σ schedule and classifier-free guidance.

The DiT predicts v = ε − x₀ at x_σ = (1 − σ)·x₀ + σ·ε, so integrating dx/dσ = v from σ = 1 (pure noise)
to σ = 0 gives the image latents (spec §1.5, §6). Both entry points (previews during training and
`anima-train sample`) render through :func:`render_prompt`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from anima_core.sampling.prompts import SamplePrompt
from anima_core.training.flow import shift_sigmas

LATENT_CHANNELS = 16
VAE_FACTOR = 8


@dataclass
class TextConditioning:
    """What the text encoder gives for one prompt (batch of 1): the DiT's LLM adapter turns it into a context."""

    qwen_states: torch.Tensor
    qwen_mask: torch.Tensor
    t5_ids: torch.Tensor
    t5_mask: torch.Tensor

    def to(self, device) -> TextConditioning:
        return TextConditioning(*(t.to(device) for t in (self.qwen_states, self.qwen_mask, self.t5_ids, self.t5_mask)))


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 values from 1 to 0: linspace passed through σ ← s·σ / (1 + (s − 1)·σ)."""
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32), shift)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * velocity


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in float32: uncond + scale·(cond − uncond)."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Drawn on the CPU in float32 from its own generator: the same image for a seed on any device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def adapt_context(dit, cond: TextConditioning) -> torch.Tensor:
    """The adapted cross-attention context, computed once per prompt instead of at every step.

    The T5 mask is always given; the DiT's own ``apply_t5_attn_mask`` (set from the profile) decides its use.
    """
    dtype = next(dit.parameters()).dtype
    return dit.adapt_context(cond.qwen_states.to(dtype), cond.t5_ids, cond.t5_mask, cond.qwen_mask)


def _autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision as in training when the DiT runs in half precision on a GPU."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@torch.no_grad()
def sample_latents(
    dit,
    context: torch.Tensor,
    uncond_context: torch.Tensor | None,
    *,
    width: int,
    height: int,
    steps: int,
    scale: float,
    flow_shift: float,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Latents 1×16×h×w (float32). With ``scale`` > 1 and an ``uncond_context``, two passes per step and CFG."""
    x = initial_noise(seed, (1, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR)).to(device)
    guided = scale > 1.0 and uncond_context is not None
    sigmas = flow_sigmas(steps, flow_shift).tolist()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        timestep = torch.full((1,), sigma, dtype=torch.float32, device=device)
        velocity = dit(x.unsqueeze(2), timestep, context).squeeze(2).float()
        if guided:
            uncond = dit(x.unsqueeze(2), timestep, uncond_context).squeeze(2)
            velocity = guided_velocity(velocity, uncond, scale)
        x = euler_step(x, velocity, sigma, sigma_next)
    return x


def latents_to_image(vae, latents: torch.Tensor) -> Image.Image:
    pixels = vae.decode(latents)[0]  # 3×H×W in [-1, 1]
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


Encoder = Callable[[str], TextConditioning]


def render_prompt(
    dit,
    vae,
    encode: Encoder,
    prompt: SamplePrompt,
    *,
    seed: int,
    device: torch.device,
) -> Image.Image:
    """One preview image: encode (cached by the caller's ``encode``), adapt, sample, decode."""
    with torch.no_grad(), _autocast(device, next(dit.parameters()).dtype):
        context = adapt_context(dit, encode(prompt.prompt).to(device))
        uncond = None
        if prompt.scale > 1.0:
            uncond = adapt_context(dit, encode(prompt.negative_prompt).to(device))
        latents = sample_latents(
            dit, context, uncond, width=prompt.width, height=prompt.height, steps=prompt.sample_steps,
            scale=prompt.scale, flow_shift=prompt.flow_shift, seed=seed, device=device,
        )  # fmt: skip
    del context, uncond
    return latents_to_image(vae, latents)
