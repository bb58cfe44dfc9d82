"""Selective activation checkpointing: each block keeps its matmul and attention outputs and recomputes the rest.

On the tiny DiT in float32 on the CPU it trains like no checkpointing (the recomputed ops are the same ops on the
same inputs), recomputes elementwise work but no product of the model's width and no attention in backward, and
keeps more than full checkpointing and less than none: measured by the storages still alive after the forward
pass, and predicted by the planner in the same order.
"""

from __future__ import annotations

import dataclasses
import gc
import types
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from anima_core.models.dit import AnimaDiT, DiTConfig
from anima_core.models.tiny import TINY_DIT, randomize_norm_weights
from anima_core.training.memory import apply_memory_strategies
from anima_core.training.planner import Settings, format_plan, plan
from anima_plugins.lora import create_network
from anima_plugins.memory import STRATEGIES, GradientCheckpointing, SelectiveCheckpointing
from anima_plugins.memory.selective import SHORT_REDUCTION
from training_helpers import make_run

RTOL, ATOL = 1e-5, 1e-6
BLOCKS = 3
WIDTH = TINY_DIT.model_channels


def profile(**memory):
    values = dict(gradient_checkpointing=False, cpu_offload_checkpointing=False, unsloth_offload_checkpointing=False,
                  blocks_to_swap=0, fp8_base=False)
    values.update(memory)
    return types.SimpleNamespace(memory=types.SimpleNamespace(**values))


def build(memory: dict, *, fused: bool = False):
    """The tiny DiT with the profile's strategies, then a LoRA network with non-zero up weights (as a run does)."""
    torch.manual_seed(0)
    dit = AnimaDiT(dataclasses.replace(TINY_DIT, num_blocks=BLOCKS))
    randomize_norm_weights(dit, torch.Generator().manual_seed(1))
    dit.requires_grad_(False)
    prof = profile(**memory)
    applied = apply_memory_strategies([cls(prof) for cls in STRATEGIES if cls.enabled(prof)], dit, device="cpu")
    torch.manual_seed(7)
    cfg = types.SimpleNamespace(dim=4, alpha=2.0, dropout=None, weights=None,
                                args={"target_preset": "guide", "fused": fused})
    network = create_network(cfg, dit=dit, text_encoder=None, train_text_encoder=False)
    network.apply_to()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.copy_(0.1 * torch.randn(lora.lora_up.weight.shape, generator=g))
    network.train()
    return dit, network, [s.name for s in applied]


def batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 1, 8, 8, generator=g), torch.rand(2, generator=g),
            torch.randn(2, 12, TINY_DIT.context_dim, generator=g), torch.randn(2, 16, 1, 8, 8, generator=g))


def forward(dit, seed: int = 3):
    x, t, context, target = batch(seed)
    context.requires_grad_()
    return torch.nn.functional.mse_loss(dit(x, t, context), target), context


def step(memory: dict, *, fused: bool = False):
    dit, network, applied = build(memory, fused=fused)
    loss, context = forward(dit)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}
    grads["context"] = context.grad
    return loss.detach(), grads, applied


@pytest.mark.parametrize("fused", [False, True], ids=["plain_lora", "fused_lora"])
@pytest.mark.parametrize("extra", [{}, {"blocks_to_swap": 1}], ids=["alone", "with_block_swap"])
def test_loss_and_lora_gradients_equal_training_without_checkpointing(fused, extra):
    loss, grads, applied = step({"selective_checkpointing": True, **extra}, fused=fused)
    ref_loss, ref_grads, _ = step({}, fused=fused)
    assert "selective_checkpointing" in applied
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys() and len(grads) > 1
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=RTOL, atol=ATOL, msg=name)


class OpCounter(TorchDispatchMode):
    """Counts the forward ops that run: elementwise GELU, attention, and products by their reduction length."""

    def __init__(self):
        super().__init__()
        self.gelu = self.attention = self.wide_products = self.short_products = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "gelu":
            self.gelu += 1
        elif name.startswith("_scaled_dot_product") and "backward" not in name:
            self.attention += 1
        elif name in ("mm", "addmm", "bmm", "baddbmm"):
            if args[-2].shape[-1] >= WIDTH * SHORT_REDUCTION:
                self.wide_products += 1
            else:
                self.short_products += 1
        return func(*args, **(kwargs or {}))


def backward_ops(memory: dict) -> OpCounter:
    dit, _, _ = build(memory)
    loss, _ = forward(dit)
    with OpCounter() as counter:
        loss.backward()
    return counter


def test_backward_recomputes_elementwise_work_but_no_wide_product_and_no_attention():
    none = backward_ops({})
    full = backward_ops({"gradient_checkpointing": True})
    selective = backward_ops({"selective_checkpointing": True})
    # GELU (elementwise) runs again in every block with either checkpointing, never without.
    assert (none.gelu, full.gelu, selective.gelu) == (0, BLOCKS, BLOCKS)
    # Attention forwards (self and cross) run again only under full checkpointing.
    assert (none.attention, full.attention, selective.attention) == (0, 2 * BLOCKS, 0)
    # Products over the model width: backward's own in all three, the recomputed forward's only under full.
    assert selective.wide_products == none.wide_products < full.wide_products
    # Short products (the LoRA up-projections, reduction = rank) are recomputed: cheap, and as large as the layer.
    assert selective.short_products > none.short_products


class NewStorages(TorchDispatchMode):
    """Weak references to the storage of every tensor an op makes during the forward pass."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                self.storages.setdefault(id(storage), (weakref.ref(storage), storage.nbytes()))
        return out


def kept_bytes(memory: dict) -> int:
    """Bytes of the forward pass's tensors still alive when backward could start (only the loss is held)."""
    dit, _, _ = build(memory)
    with torch.no_grad():
        forward(dit)  # RoPE tables and other caches are made here, not counted below
    before = {id(s): s for s in (p.untyped_storage() for p in dit.parameters())}
    with NewStorages() as made:
        loss, _ = forward(dit)
    gc.collect()
    alive = [(ref(), size) for ref, size in made.storages.values()]
    total = sum(size for storage, size in alive if storage is not None and id(storage) not in before)
    loss.backward()  # the graph was complete
    return total


def test_kept_activations_lie_between_full_checkpointing_and_none():
    none = kept_bytes({})
    full = kept_bytes({"gradient_checkpointing": True})
    selective = kept_bytes({"selective_checkpointing": True})
    assert full < selective < none
    # What selective keeps beyond full checkpointing's block inputs is at least the blocks' wide products:
    # four self-attention projections and the MLP's two products over 2 × 32 tokens, float32.
    tokens = 2 * 4 * 4
    per_block = (4 * WIDTH + TINY_DIT.mlp_hidden + WIDTH) * tokens * 4
    assert selective - full >= BLOCKS * per_block


def test_the_profile_field_or_extra_strategies_select_it_and_it_replaces_gradient_checkpointing():
    assert not SelectiveCheckpointing.enabled(profile())  # a profile without the field: off
    on = profile(selective_checkpointing=True, gradient_checkpointing=True)
    assert SelectiveCheckpointing.enabled(on) and not GradientCheckpointing.enabled(on)
    named = profile(gradient_checkpointing=True, extra_strategies=["selective_checkpointing"])
    assert not GradientCheckpointing.enabled(named)  # the trainer applies it by name; plain steps aside
    assert GradientCheckpointing.enabled(profile(gradient_checkpointing=True))
    for offload in ("unsloth_offload_checkpointing", "cpu_offload_checkpointing"):
        problems = SelectiveCheckpointing.validate(profile(selective_checkpointing=True, **{offload: True}))
        assert len(problems) == 1 and offload in problems[0]
    assert SelectiveCheckpointing.validate(on) == []


def test_a_run_naming_it_in_extra_strategies_trains_the_lora_of_a_run_without_checkpointing(tmp_path, tiny_model):
    files = []
    for name, memory in (("selective", {"gradient_checkpointing": True, "extra_strategies": ["selective_checkpointing"]}),
                         ("none", {})):
        result = make_run(tmp_path / name, tiny_model, training={"max_train_steps": 3}, memory=memory).run()
        assert result.status == "finished"
        files.append(load_file(result.lora_path))
        with safe_open(str(result.lora_path), framework="pt") as f:
            assert f.metadata()["ss_gradient_checkpointing"] == str(name == "selective")
        log = (result.run_dir / "train.log").read_text()
        assert ("memory strategy: selective_checkpointing" in log) == (name == "selective")
        assert "memory strategy: gradient_checkpointing" not in log
    selective, none = files
    assert selective.keys() == none.keys()
    for key in none:
        torch.testing.assert_close(selective[key], none[key], rtol=RTOL, atol=ATOL, msg=key)


def planner_profile(memory: dict):
    values = dict(
        memory={**dict(gradient_checkpointing=False, cpu_offload_checkpointing=False,
                       unsloth_offload_checkpointing=False, blocks_to_swap=0, fp8_base=False), **memory},
        model=dict(transformer_dtype=None, vae_dtype="float32"),
        training=dict(mixed_precision="bf16", full_bf16=False),
        dataset=dict(resolution=1024, train_batch_size=1, dataset_config=None),
        network=dict(module="lora_anima", dim=16, alpha=16.0, args={"target_preset": "sd-scripts"}, weights=None,
                     train_unet_only=True),
        caching=dict(cache_latents=True, cache_text_encoder_outputs=True),
        optimizer=dict(optimizer_type="AdamW"),
        sampling=dict(sample_prompts=None),
    )
    return types.SimpleNamespace(**{k: types.SimpleNamespace(**v) for k, v in values.items()})


def activations(memory: dict) -> int:
    p = plan(planner_profile(memory), DiTConfig(), lora_params=1_433_600 * 16)
    return next(ph for ph in p.phases if ph.name == "training").parts["activations"]


def test_the_planner_puts_selective_between_none_and_full_checkpointing():
    none, full = activations({}), activations({"gradient_checkpointing": True})
    selective = activations({"selective_checkpointing": True})
    assert full < selective < none
    assert activations({"extra_strategies": ["selective_checkpointing"]}) == selective
    # 2B at 1024²: 4096 tokens × 2048 × 2 bytes = 16 MiB per unit. No checkpointing keeps 28 blocks' saved
    # tensors P, full checkpointing 28 block inputs and one P; selective keeps 14 units of products and 2 context
    # units (512 × 2048 × 2 bytes) per block, and one recomputed block brings back the rest of its P.
    unit, context = 4096 * 2048 * 2, 512 * 2048 * 2
    saved = (none - full + 28 * unit) / 27
    kept = 14 * unit + 2 * context
    assert none - selective == pytest.approx(27 * (saved - kept), rel=1e-6)
    p = plan(planner_profile({"selective_checkpointing": True}), DiTConfig(), lora_params=0)
    assert p.settings == Settings("selective")
    assert "settings: selective_checkpointing" in format_plan(p)
    assert any("not measured" in note for note in p.notes)
    assert Settings("gradient").overrides(Settings("selective")) == [
        "memory.gradient_checkpointing=true", "memory.selective_checkpointing=false"]
