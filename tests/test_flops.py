"""The step's FLOP count, against torch's own counter on a real LoRA training step and against ANCHORS.md."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from anima_core.models.dit import AnimaDiT, DiTConfig
from anima_core.models.llm_adapter import LLMAdapterConfig
from anima_core.training.flops import forward_tflop, step_tflop
from anima_plugins.lora import create_network
from anima_plugins.memory import GradientCheckpointing

SMALL = DiTConfig(model_channels=256, num_blocks=2, num_heads=4, mlp_hidden=1024, adaln_lora_dim=16, context_dim=64,
                  llm_adapter=LLMAdapterConfig(source_dim=64, target_dim=64, model_dim=64, num_layers=1, num_heads=4))


def counted_tflop(checkpointing: bool, side: int, text: int) -> float:
    """One rank-1 LoRA step on sd-scripts' targets, as FlopCounterMode counts it."""
    dit = AnimaDiT(SMALL).requires_grad_(False)
    if checkpointing:
        GradientCheckpointing(SimpleNamespace()).apply(dit, device="cpu")
    cfg = SimpleNamespace(dim=1, alpha=1.0, dropout=None, args={"target_preset": "sd-scripts"}, weights=None)
    network = create_network(cfg, dit=dit, text_encoder=None, train_text_encoder=False)
    network.apply_to()
    ids, mask = torch.randint(0, 100, (1, text)), torch.ones(1, text, dtype=torch.long)
    # The math backend spells attention as matmuls, which the counter sees (the fused CPU kernel it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = dit(torch.randn(1, 16, 1, side, side), torch.tensor([0.5]), torch.randn(1, text, 64),
                  target_input_ids=ids, target_attention_mask=mask, source_attention_mask=mask)
        out.square().mean().backward()
    return counter.get_total_flops() / 1e12


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("side", [16, 32])
def test_step_flops_match_torchs_counter(side, checkpointing):
    expected = step_tflop(SMALL, latent_hw=(side, side), text_tokens=32, batch=1, checkpointing=checkpointing)
    assert counted_tflop(checkpointing, side, 32) == pytest.approx(expected, rel=0.05)


def test_full_model_matches_the_anchor_floor():
    full = DiTConfig()
    plain = step_tflop(full, latent_hw=(128, 128), text_tokens=512, batch=1, checkpointing=False)
    assert plain == pytest.approx(40.7, rel=0.02)
    assert step_tflop(full, latent_hw=(128, 128), text_tokens=512, batch=1, checkpointing=True) == pytest.approx(59.0, rel=0.02)
    assert step_tflop(full, latent_hw=(128, 128), text_tokens=512, batch=4, checkpointing=False) == pytest.approx(4 * plain)


@pytest.mark.parametrize("side", [16, 32])
def test_forward_flops_match_torchs_counter_without_grad(side):
    """A forward without grad (a slider's base-model prediction): no backward counted."""
    dit = AnimaDiT(SMALL).requires_grad_(False)
    ids, mask = torch.randint(0, 100, (1, 32)), torch.ones(1, 32, dtype=torch.long)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        dit(torch.randn(1, 16, 1, side, side), torch.tensor([0.5]), torch.randn(1, 32, 64),
            target_input_ids=ids, target_attention_mask=mask, source_attention_mask=mask)
    expected = forward_tflop(SMALL, latent_hw=(side, side), text_tokens=32, batch=1)
    assert counter.get_total_flops() / 1e12 == pytest.approx(expected, rel=0.05)
