"""Step optimisations keep training numerically the same (tiny model, CPU).

Covered: RoPE tables cached per shape and device, no host syncs in the step's forward and backward, one
timestep embedding per forward, LoRA under autocast equal to the plain bf16 formula (what a copy-free LoRA
forward must keep), and ``AnimaDiT.compile_blocks`` equal to eager (traced with aot_eager: Inductor takes
minutes on the CPU; the GPU bench runs the real compiler).
"""

from __future__ import annotations

import pytest
import torch

import anima_core.models.dit as dit_module
from anima_core.config.schema import NetworkTable, TrainingTable
from anima_core.models.dit import AnimaDiT
from anima_core.models.rope import (
    adapter_rope_cos_sin,
    cached_adapter_rope_cos_sin,
    cached_dit_rope_cos_sin,
    dit_rope_cos_sin,
)
from anima_core.models.tiny import TINY_DIT, randomize_norm_weights
from anima_core.training.flow import LOSS_WEIGHTINGS, TIMESTEP_SAMPLERS
from anima_core.training.step import StepInputs, flow_loss, sample_generators
from anima_plugins.lora import create_network
from anima_plugins.lora.module import LoRAModule
from anima_plugins.memory import GradientCheckpointing

LATENT = 8  # 4×4 tokens per image
TEXT = 6


def tiny_dit(device: str = "cpu") -> AnimaDiT:
    torch.manual_seed(0)
    with torch.device(device):
        dit = AnimaDiT(TINY_DIT)
    if device != "meta":
        randomize_norm_weights(dit, torch.Generator().manual_seed(1))
    return dit.requires_grad_(False).train()


def with_lora(dit: AnimaDiT):
    torch.manual_seed(2)
    network = create_network(
        NetworkTable(dim=4, alpha=4, args={"target_preset": "sd-scripts"}), dit=dit, text_encoder=None,
        train_text_encoder=False,
    )
    network.apply_to()
    with torch.no_grad():  # lora_up starts at zero; make the adapters contribute
        for lora in network.loras.values():
            lora.lora_up.weight.normal_(0, 0.1)
    return network


def step_inputs(batch: int = 2, device: str = "cpu") -> StepInputs:
    g = torch.Generator().manual_seed(3)
    adapter = TINY_DIT.llm_adapter
    t5_mask = torch.ones(batch, TEXT, dtype=torch.long)
    t5_mask[:, TEXT - 2 :] = 0
    return StepInputs(
        latents=torch.randn(batch, 16, LATENT, LATENT, generator=g).to(device),
        qwen_states=torch.randn(batch, TEXT, adapter.source_dim, generator=g).to(device),
        qwen_mask=torch.ones(batch, TEXT, dtype=torch.long, device=device),
        t5_ids=(torch.randint(2, 100, (batch, TEXT), generator=g) * t5_mask).to(device),
        t5_mask=t5_mask.to(device),
        loss_weights=torch.ones(batch, device=device),
        alpha_masks=None,
    )


def loss_of(dit: AnimaDiT, inputs: StepInputs, seed: int = 5) -> torch.Tensor:
    cfg = TrainingTable()
    loss, _ = flow_loss(dit, inputs, sampler=TIMESTEP_SAMPLERS["logit_normal"], weighting=LOSS_WEIGHTINGS["uniform"],
                        cfg=cfg, generators=sample_generators(seed, 0, range(inputs.latents.shape[0])))
    return loss


def loss_and_lora_grads(dit: AnimaDiT, network, inputs: StepInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = network.trainable_parameters()
    for p in params:
        p.grad = None
    loss = loss_of(dit, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.fixture(autouse=True)
def empty_rope_caches():
    cached_dit_rope_cos_sin.cache_clear()
    cached_adapter_rope_cos_sin.cache_clear()
    yield


def test_cached_rope_tables_equal_computed_ones():
    cos, sin = cached_dit_rope_cos_sin(32, (1, 4, 6), (1.0, 4.0, 4.0), torch.device("cpu"))
    ref_cos, ref_sin = dit_rope_cos_sin(32, (1, 4, 6), (1.0, 4.0, 4.0))
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    acos, asin = cached_adapter_rope_cos_sin(16, 7, torch.device("cpu"), torch.bfloat16)
    ref = adapter_rope_cos_sin(16, 7)
    assert acos.dtype == torch.bfloat16
    assert torch.equal(acos, ref[0].to(torch.bfloat16)) and torch.equal(asin, ref[1].to(torch.bfloat16))


def test_rope_tables_are_computed_once_per_shape():
    dit, inputs = tiny_dit(), step_inputs()
    with torch.no_grad():
        loss_of(dit, inputs)
        loss_of(dit, inputs, seed=6)
    assert cached_dit_rope_cos_sin.cache_info().misses == 1
    assert cached_dit_rope_cos_sin.cache_info().hits == 1
    assert cached_adapter_rope_cos_sin.cache_info().misses == 1  # target and source have the same length here
    with torch.no_grad():
        loss_of(dit, step_inputs_with_side(12))
    assert cached_dit_rope_cos_sin.cache_info().misses == 2  # a new bucket shape gets its own tables


def step_inputs_with_side(side: int) -> StepInputs:
    inputs = step_inputs()
    inputs.latents = torch.randn(inputs.latents.shape[0], 16, side, side, generator=torch.Generator().manual_seed(4))
    return inputs


def test_step_with_cached_rope_equals_step_without_cache(monkeypatch):
    dit = tiny_dit()
    network = with_lora(dit)
    inputs = step_inputs()
    cached = loss_and_lora_grads(dit, network, inputs)
    loss_and_lora_grads(dit, network, inputs)  # the second step reads the cache
    cached_again = loss_and_lora_grads(dit, network, inputs)

    def uncached(head_dim, grid, ratios, device):
        return dit_rope_cos_sin(head_dim, grid, ratios, device=device)

    monkeypatch.setattr(dit_module, "cached_dit_rope_cos_sin", uncached)
    fresh = loss_and_lora_grads(dit, network, inputs)
    for run in (cached, cached_again):
        assert torch.equal(run[0], fresh[0])
        assert all(torch.equal(a, b) for a, b in zip(run[1], fresh[1]))


def test_tables_cached_while_sampling_train_afterwards():
    dit = tiny_dit()
    network = with_lora(dit)
    inputs = step_inputs()
    with torch.inference_mode():  # previews first fill the cache
        loss_of(dit, inputs)
    loss, grads = loss_and_lora_grads(dit, network, inputs)  # inference tensors could not be saved for backward
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_step_forward_and_backward_read_no_tensor_values():
    """On the meta device every read of a value (.item(), bool(t), .tolist(), nonzero) raises, so a step that
    runs there has no host sync of its own (only the CPU→device copies of the σ and noise it draws)."""
    dit = tiny_dit("meta")
    network = with_lora(dit)
    for p in network.trainable_parameters():
        p.data = torch.empty_like(p, device="meta")
    loss = loss_of(dit, step_inputs(device="meta"))
    loss.backward()
    assert loss.device.type == "meta"
    assert all(p.grad is not None for p in network.trainable_parameters())


def test_timestep_embedding_runs_once_per_forward():
    dit = tiny_dit()
    calls = []
    dit.t_embedder[1].register_forward_hook(lambda *_: calls.append("t"))
    dit.t_embedding_norm.register_forward_hook(lambda *_: calls.append("norm"))
    with torch.no_grad():
        loss_of(dit, step_inputs())
    assert calls == ["t", "norm"]  # not once per block


def test_lora_under_autocast_equals_the_plain_bf16_formula():
    """What a LoRA forward without the float32 copy of its input must keep: bf16 autocast of base + up(down(x))."""
    linear = torch.nn.Linear(32, 24, bias=False).to(torch.bfloat16).requires_grad_(False)
    lora = LoRAModule("lora_unet_x", linear, rank=4, alpha=2.0)
    with torch.no_grad():
        lora.lora_up.weight.normal_(0, 0.1)
    lora.apply_to()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x)
        down, up = lora.lora_down.weight, lora.lora_up.weight
        expected = torch.nn.functional.linear(x, linear.weight) + torch.nn.functional.linear(
            torch.nn.functional.linear(x, down), up
        ) * (2.0 / 4)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(out.dtype))
    grads = torch.autograd.grad(out.float().square().sum(), [down, up])
    expected_grads = torch.autograd.grad(expected.float().square().sum(), [down, up])
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def test_compiled_blocks_under_checkpointing_train_like_eager_blocks():
    """Compiled blocks inside the checkpointing runner (the composition the trainer uses); ~20 s of tracing."""
    inputs = step_inputs()
    runs = []
    for compiled in (False, True):
        dit = tiny_dit()
        keys = list(dit.state_dict())
        GradientCheckpointing(None).apply(dit, device="cpu")
        if compiled:
            torch._dynamo.reset()
            dit.compile_blocks(backend="aot_eager")
            assert all(block._compiled_call_impl is not None for block in dit.blocks)
            assert list(dit.state_dict()) == keys  # checkpoints and LoRA names do not change
        network = with_lora(dit)
        runs.append(loss_and_lora_grads(dit, network, inputs))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = runs
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
