"""The training step against the spec's formulas, written out here rather than taken from our code:
x_σ = (1 − σ)·x₀ + σ·ε, target v = ε − x₀, loss = mean over samples of loss_weight × mean(w(σ) × mask × (pred − v)²)
with the alpha mask area-resized to the latent grid (spec §5, sd-scripts' masked loss); a dropped caption is
exactly what the text encoder makes of the empty caption (spec §3.3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anima_core.config.schema import TrainingTable
from anima_core.models import load_dit, load_text_encoder
from anima_core.training.flow import weight_cosmap
from anima_core.training.step import StepInputs, drop_captions, flow_loss, sample_generators


class Recording(nn.Module):
    """The DiT, remembering what the step fed it."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit
        self.calls = []

    def forward(self, x, timesteps, context, **masks):
        self.calls.append((x.detach().clone(), timesteps.detach().clone()))
        return self.dit(x, timesteps, context, **masks)


def padded(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.fixture(scope="module")
def dit(tiny_model):
    return load_dit(tiny_model.dit, dtype=torch.float32)


def test_flow_loss_is_the_spec_formula(dit):
    g = torch.Generator().manual_seed(0)
    batch, h, w, length = 2, 8, 8, 6
    latents = torch.randn(batch, 16, h, w, generator=g)
    qwen_mask = padded(batch, length, [6, 3])
    t5_mask = padded(batch, length, [5, 2])
    inputs = StepInputs(
        latents=latents,
        qwen_states=torch.randn(batch, length, 64, generator=g) * qwen_mask[..., None],
        qwen_mask=qwen_mask,
        t5_ids=torch.randint(2, 200, (batch, length), generator=g) * t5_mask,
        t5_mask=t5_mask,
        loss_weights=torch.tensor([1.0, 0.5]),
        alpha_masks=torch.rand(batch, 1, 8 * h, 8 * w, generator=g),
    )
    sigmas = torch.tensor([0.3, 0.8])
    recording = Recording(dit)
    per_sample = iter(sigmas.clone())  # the sampler is asked once per sample
    loss, drawn = flow_loss(recording, inputs, sampler=lambda n, cfg, gen, hw: next(per_sample).reshape(n),
                            weighting=weight_cosmap, cfg=TrainingTable(loss_type="l2"),
                            generators=sample_generators(3, 0, range(batch)))
    (x, timesteps), = recording.calls
    assert torch.equal(drawn, sigmas) and torch.equal(timesteps, sigmas)
    x_sigma, s = x.squeeze(2), sigmas.view(-1, 1, 1, 1)
    noise = (x_sigma - (1 - s) * latents) / s  # the ε the step drew, read back from x_σ
    assert 0.8 < noise.std() < 1.2 and noise.mean().abs() < 0.1
    with torch.no_grad():
        pred = dit(x, sigmas, inputs.qwen_states, target_input_ids=inputs.t5_ids, target_attention_mask=t5_mask,
                   source_attention_mask=qwen_mask).squeeze(2)
    cosmap = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    mask = nn.functional.interpolate(inputs.alpha_masks, size=(h, w), mode="area")
    per_sample = (cosmap * mask * (pred - (noise - latents)) ** 2).mean(dim=(1, 2, 3)) * inputs.loss_weights
    torch.testing.assert_close(loss.detach(), per_sample.mean(), rtol=1e-5, atol=1e-7)


def test_the_text_masks_reach_the_dit(dit):
    """Padding must not change the prediction the loss is taken from: the same captions padded further give
    the same loss only because the masks are passed."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    states, ids = torch.randn(1, 4, 64, generator=g), torch.randint(2, 200, (1, 4), generator=g)

    def loss_with_padding(extra: int):
        mask = torch.cat([torch.ones(1, 4), torch.zeros(1, extra)], dim=1).long()
        inputs = StepInputs(latents, torch.cat([states, torch.randn(1, extra, 64, generator=g)], dim=1), mask,
                            torch.cat([ids, torch.randint(2, 200, (1, extra), generator=g)], dim=1), mask,
                            torch.ones(1), None)
        return flow_loss(dit, inputs, sampler=lambda n, cfg, gen, hw: torch.tensor([0.5]),
                         weighting=weight_cosmap, cfg=TrainingTable(), generators=sample_generators(2, 0, [0]))[0]

    torch.testing.assert_close(loss_with_padding(2), loss_with_padding(5), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def text_encoder(tiny_model):
    return load_text_encoder(tiny_model.qwen3, tokenizer_path=tiny_model.qwen_tokenizer,
                             t5_tokenizer_path=tiny_model.t5_tokenizer, dtype=torch.float32)


def test_a_dropped_caption_is_the_empty_captions_encoding(text_encoder):
    captions = [f"1girl, tag{i}, simple background" for i in range(8)]
    states, qwen_mask, t5_ids, t5_mask = text_encoder.encode(captions, 16, 16)
    empty = text_encoder.encode([""], 16, 16)
    inputs = StepInputs(torch.zeros(8, 16, 2, 2), states, qwen_mask, t5_ids, t5_mask, torch.ones(8), None)
    out = drop_captions(inputs, 0.5, sample_generators(0, 0, range(8)))
    fields = ("qwen_states", "qwen_mask", "t5_ids", "t5_mask")
    dropped = [i for i in range(8) if not torch.equal(out.t5_ids[i], t5_ids[i])]
    assert 0 < len(dropped) < 8  # each sample decided by itself
    for i in range(8):
        for name, reference in zip(fields, empty if i in dropped else (states, qwen_mask, t5_ids, t5_mask)):
            row = reference[0] if i in dropped else reference[i]
            assert torch.equal(getattr(out, name)[i], row), (i, name)
    assert torch.equal(drop_captions(inputs, 0.0, sample_generators(0, 0, range(8))).t5_ids, t5_ids)


@pytest.mark.parametrize("random_strength", [False, True])
def test_input_perturbation_strength_is_gamma_or_uniform_below_it(random_strength):
    """ip_noise_gamma adds γ·ξ to the noise the DiT sees (ξ standard normal); with
    ip_noise_gamma_random_strength, γ is scaled per sample by u ~ U(0, 1) (sd-scripts' `torch.rand`).
    Each sample's perturbation has standard deviation γ·u, so over many samples u must look uniform."""
    from anima_core.training.step import _perturbation

    gamma = 0.4
    cfg = TrainingTable(ip_noise_gamma=gamma, ip_noise_gamma_random_strength=random_strength)
    strengths = []
    for seed in range(400):
        generator = torch.Generator().manual_seed(seed)
        strengths.append(float(_perturbation((16, 16, 16), cfg, generator).std()) / gamma)
    u = torch.tensor(sorted(strengths))
    if not random_strength:
        assert torch.allclose(u, torch.ones_like(u), atol=0.08)
        return
    uniform = (torch.arange(400) + 0.5) / 400
    assert (u - uniform).abs().max() < 0.1  # the empirical quantiles follow U(0, 1)
    assert u.min() >= 0 and u.max() < 1.05 and abs(float(u.mean()) - 0.5) < 0.05
