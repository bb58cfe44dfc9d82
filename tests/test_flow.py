"""Each timestep sampler, weighting and loss type against its formula (spec §5)."""

import math
from types import SimpleNamespace

import pytest
import torch

from anima_core.training import flow


def cfg(**kw):
    base = dict(sigmoid_scale=1.0, discrete_flow_shift=1.0, weighting_scheme="uniform", logit_mean=0.0,
                logit_std=1.0, mode_scale=1.29, loss_type="l2", huber_schedule="constant", huber_c=0.1, huber_scale=1.0)
    return SimpleNamespace(**{**base, **kw})


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shift_formula():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(flow.shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))
    assert torch.equal(flow.shift_sigmas(s, 1.0), s)


def test_logit_normal_is_shifted_sigmoid_of_scaled_normal_then_clamped():
    c = cfg(sigmoid_scale=1.5, discrete_flow_shift=3.0)
    got = flow.sample_logit_normal(1000, c, gen(1))
    n = torch.randn(1000, generator=gen(1))
    expected = flow.shift_sigmas(torch.sigmoid(1.5 * n), 3.0).clamp(1e-5, 1 - 1e-5)
    assert torch.allclose(got, expected)
    assert got.min() >= 1e-5 and got.max() <= 1 - 1e-5


def test_uniform_shifts_only_when_shift_is_not_one():
    assert torch.allclose(flow.sample_uniform(8, cfg(), gen(2)), torch.rand(8, generator=gen(2)).clamp(1e-5, 1 - 1e-5))
    u = torch.rand(8, generator=gen(2))
    assert torch.allclose(flow.sample_uniform(8, cfg(discrete_flow_shift=2.0), gen(2)), flow.shift_sigmas(u, 2.0).clamp(1e-5, 1 - 1e-5))


def test_sigmoid_and_shift_have_no_clamp():
    n = torch.randn(16, generator=gen(3))
    assert torch.allclose(flow.sample_sigmoid(16, cfg(sigmoid_scale=2.0), gen(3)), torch.sigmoid(2 * n))
    assert torch.allclose(flow.sample_shift(16, cfg(discrete_flow_shift=3.0), gen(3)), flow.shift_sigmas(torch.sigmoid(n), 3.0))


def test_flux_shift_at_the_line_endpoints():
    # 64×64 latents = 1024 tokens... use the endpoints: 256 tokens → μ = 0.5, 4096 tokens → μ = 1.15.
    assert flow.flux_mu(32, 32) == pytest.approx(0.5)
    assert flow.flux_mu(128, 128) == pytest.approx(1.15)
    n = torch.randn(8, generator=gen(4))
    s0 = torch.sigmoid(n)
    expected = math.exp(1.15) / (math.exp(1.15) + (1 / s0 - 1))
    assert torch.allclose(flow.sample_flux_shift(8, cfg(), gen(4), (128, 128)), expected)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_sigma_table_sampling(scheme):
    c = cfg(weighting_scheme=scheme, discrete_flow_shift=3.0)
    got = flow.sample_sigma_table(64, c, gen(5))
    u = flow.density_samples(64, c, gen(5))
    index = (u * 1000).long().clamp(0, 999)
    expected = flow.shift_sigmas(1 - index.float() / 1000, 3.0)
    assert torch.allclose(got, expected)


def test_mode_density_formula():
    r = torch.rand(32, generator=gen(6))
    expected = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    assert torch.allclose(flow.density_samples(32, cfg(weighting_scheme="mode"), gen(6)), expected)


def test_weightings():
    s = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow.weight_sigma_sqrt(s), s**-2)
    assert torch.allclose(flow.weight_cosmap(s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    for name in ("uniform", "none", "logit_normal", "mode"):
        assert torch.equal(flow.LOSS_WEIGHTINGS[name](s), torch.ones(3))


def test_noising_and_input_perturbation():
    x0, eps, s = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.2, 0.7])
    expected = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    assert torch.allclose(flow.noisy_latents(x0, eps, s), expected)
    xi = torch.randn(x0.shape)
    perturbed = flow.noisy_latents(x0, eps, s, perturbation=0.1 * xi)
    assert torch.allclose(perturbed, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * (eps + 0.1 * xi))


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential"])
def test_loss_types(loss_type, schedule):
    p, y, s = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([0.3, 0.8])
    c = cfg(loss_type=loss_type, huber_schedule=schedule, huber_c=0.2, huber_scale=1.5)
    got = flow.elementwise_loss(p, y, s, c)
    if schedule == "constant":
        cc = torch.full((2,), 0.2 * 1.5)
    else:
        cc = torch.exp(math.log(0.2) / 1000 * s) * 1.5
    cc = cc.view(-1, 1, 1)
    expected = {
        "l2": (p - y) ** 2,
        "l1": (p - y).abs(),
        "huber": 2 * cc * (torch.sqrt((p - y) ** 2 + cc**2) - cc),
        "smooth_l1": 2 * (torch.sqrt((p - y) ** 2 + cc**2) - cc),
    }[loss_type]
    assert torch.allclose(got, expected)


def test_huber_snr_is_refused():
    with pytest.raises(ValueError, match="snr"):
        flow.huber_c(torch.tensor([0.5]), cfg(huber_schedule="snr"))


def test_reduce_loss_weights_then_masks_then_means():
    el = torch.arange(8.0).view(2, 1, 2, 2)
    w, lw = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.5])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]]).expand(2, 1, 2, 2)
    per_sample = (el * w.view(-1, 1, 1, 1) * mask).flatten(1).mean(1)
    assert flow.reduce_loss(el, w, lw, mask) == pytest.approx(float((per_sample * lw).mean()))



def test_the_guide_clamp_holds_sigma_inside_both_ends():
    """sigmoid(scale * n) reaches exactly 0 and 1 in float32 for a large scale: the guide's samplers clamp both ends."""
    got = flow.sample_logit_normal(4000, cfg(sigmoid_scale=60.0), gen(3))
    assert float(got.min()) == pytest.approx(1e-5, rel=1e-3) and float(got.max()) == pytest.approx(1 - 1e-5, abs=1e-7)
    assert (got == got.min()).sum() > 100 and (got == got.max()).sum() > 100  # many samples sit on each bound


def test_logit_normal_density_is_sigmoid_of_mean_plus_std_times_the_normal():
    c = cfg(weighting_scheme="logit_normal", logit_mean=0.7, logit_std=1.8)
    assert torch.allclose(flow.density_samples(64, c, gen(4)), torch.sigmoid(0.7 + 1.8 * torch.randn(64, generator=gen(4))))


def test_sigma_table_indices_stay_in_the_table_at_both_ends():
    """u = 1 (a logit_normal density far to the right) is the table's last entry, u ~ 0 its first (σ = 1)."""
    high = flow.sample_sigma_table(8, cfg(weighting_scheme="logit_normal", logit_mean=40.0), gen(1))
    low = flow.sample_sigma_table(8, cfg(weighting_scheme="logit_normal", logit_mean=-40.0), gen(1))
    assert torch.allclose(high, torch.full((8,), 1 - 999 / 1000)) and torch.equal(low, torch.ones(8))


def test_exponential_huber_c_is_c_to_the_power_sigma_over_1000_times_the_scale():
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    got = flow.huber_c(sigmas, cfg(huber_schedule="exponential", huber_c=0.1, huber_scale=2.0))
    assert torch.allclose(got, 2.0 * 0.1 ** (sigmas / 1000), rtol=1e-7)
    with pytest.raises(ValueError, match="huber_schedule 'snr' is not defined for flow matching"):
        flow.huber_c(sigmas, cfg(huber_schedule="snr"))


def test_sample_losses_are_each_samples_own_weighted_mean():
    elementwise = torch.stack([torch.full((2, 3, 3), 1.0), torch.full((2, 3, 3), 4.0)])
    got = flow.sample_losses(elementwise, torch.tensor([1.0, 0.5]))
    assert torch.allclose(got, torch.tensor([1.0, 2.0]))
