"""The preview sampler's math against its formulas, with the real tiny DiT as the velocity model."""

from __future__ import annotations

import pytest
import torch

from anima_core.models import load_dit
from anima_core.sampling.sampler import (
    euler_step,
    flow_sigmas,
    guided_velocity,
    initial_noise,
    sample_latents,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dit(tiny_model):
    return load_dit(tiny_model.dit, dtype=torch.float32).eval()


def contexts(dit, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 512, dit.config.context_dim, generator=generator)


def velocity(dit, x, sigma, context):
    with torch.no_grad():
        return dit(x.unsqueeze(2), torch.tensor([sigma]), context).squeeze(2)


def test_euler_step_moves_along_velocity():
    x, v = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    assert torch.equal(euler_step(x, v, 0.75, 0.5), x + (0.5 - 0.75) * v)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_shifted_schedule_matches_formula(shift):
    sigmas = flow_sigmas(10, shift)
    t = torch.linspace(1, 0, 11)
    assert sigmas.shape == (11,)
    torch.testing.assert_close(sigmas, shift * t / (1 + (shift - 1) * t))
    assert sigmas[0] == 1 and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    if shift > 1:  # the shift keeps more of the steps at high noise
        assert torch.all(sigmas[1:-1] > t[1:-1])


def test_guidance_matches_formula_in_float32():
    cond = torch.randn(2, 3).to(torch.bfloat16)
    uncond = torch.randn(2, 3).to(torch.bfloat16)
    out = guided_velocity(cond, uncond, 4.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, uncond.float() + 4.5 * (cond.float() - uncond.float()))


def test_noise_depends_only_on_seed():
    torch.manual_seed(123)
    a = initial_noise(7, (1, 16, 8, 8))
    torch.manual_seed(456)
    assert torch.equal(a, initial_noise(7, (1, 16, 8, 8)))
    assert not torch.equal(a, initial_noise(8, (1, 16, 8, 8)))
    assert a.dtype == torch.float32


def test_one_step_without_guidance_is_one_euler_step(dit):
    context = contexts(dit, 0)
    out = sample_latents(
        dit, context, None, width=64, height=64, steps=1, scale=1.0, flow_shift=3.0, seed=5, device=CPU
    )
    noise = initial_noise(5, (1, 16, 8, 8))
    expected = noise + (0.0 - 1.0) * velocity(dit, noise, 1.0, context)
    torch.testing.assert_close(out, expected)


def test_two_steps_with_guidance_follow_the_shifted_schedule(dit):
    cond, uncond = contexts(dit, 0), contexts(dit, 1)
    scale, shift = 4.0, 3.0
    out = sample_latents(
        dit, cond, uncond, width=64, height=80, steps=2, scale=scale, flow_shift=shift, seed=9, device=CPU
    )
    x = initial_noise(9, (1, 16, 10, 8))
    sigmas = [1.0, shift * 0.5 / (1 + (shift - 1) * 0.5), 0.0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        c, u = velocity(dit, x, sigma, cond), velocity(dit, x, sigma, uncond)
        x = x + (sigma_next - sigma) * (u + scale * (c - u))
    torch.testing.assert_close(out, x)


def test_scale_one_skips_the_unconditional_pass(dit):
    cond, uncond = contexts(dit, 0), contexts(dit, 1)
    kwargs = dict(width=64, height=64, steps=2, scale=1.0, flow_shift=3.0, seed=3, device=CPU)
    torch.testing.assert_close(sample_latents(dit, cond, uncond, **kwargs), sample_latents(dit, cond, None, **kwargs))
