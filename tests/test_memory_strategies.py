"""Every memory strategy trains exactly like plain training on the tiny DiT (CPU, float32).

Tolerance: rtol 1e-5 / atol 1e-6 on the loss and on every gradient. Checkpointing recomputes the same
float32 ops on the same CPU, so results agree to rounding; fp8 is compared against plain training with the
same dequantised weights.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from anima_core.models import load_dit
from anima_core.models.dit import AnimaDiT
from anima_core.models.tiny import TINY_DIT, randomize_norm_weights
from anima_core.training.memory import MemoryStrategyError, apply_memory_strategies
from anima_plugins.lora.module import LoRAModule
from anima_plugins.memory import (
    STRATEGIES,
    BlockSwap,
    CpuOffloadCheckpointing,
    Fp8Base,
    GradientCheckpointing,
    SelectiveCheckpointing,
    UnslothOffloadCheckpointing,
    dequantize_weight,
    quantize_weight,
)

RTOL, ATOL = 1e-5, 1e-6
LORA_TARGETS = ("self_attn.q_proj", "self_attn.output_proj", "cross_attn.k_proj", "mlp.layer1", "mlp.layer2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a busy 2-core machine run ~10x faster single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def profile(**memory):
    values = dict(
        gradient_checkpointing=False,
        cpu_offload_checkpointing=False,
        unsloth_offload_checkpointing=False,
        blocks_to_swap=0,
        fp8_base=False,
    )
    values.update(memory)
    return SimpleNamespace(
        memory=SimpleNamespace(**values),
        model=SimpleNamespace(transformer_dtype=None),
        training=SimpleNamespace(mixed_precision="bf16"),
    )


def build_dit(num_blocks: int = 4, seed: int = 0) -> AnimaDiT:
    config = dataclasses.replace(TINY_DIT, num_blocks=num_blocks)
    torch.manual_seed(seed)
    dit = AnimaDiT(config)
    randomize_norm_weights(dit, torch.Generator().manual_seed(seed + 1))
    dit.requires_grad_(False)
    return dit


def attach_lora(dit: AnimaDiT, blocks=None) -> dict[str, LoRAModule]:
    """LoRA on several Linears per block, created after the strategies like the run does; non-zero up weights
    so every LoRA matrix gets a gradient."""
    loras = {}
    torch.manual_seed(7)  # lora_down's default init draws from the global generator
    generator = torch.Generator().manual_seed(7)
    for index, block in enumerate(dit.blocks):
        if blocks is not None and index not in blocks:
            continue
        for path in LORA_TARGETS:
            linear = block.get_submodule(path)
            lora = LoRAModule(f"blocks.{index}.{path}", linear, rank=2, alpha=2.0)
            with torch.no_grad():
                lora.lora_up.weight.copy_(0.1 * torch.randn(lora.lora_up.weight.shape, generator=generator))
            lora.apply_to()
            loras[lora.name] = lora
    return loras


def batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 16, 1, 8, 8, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 12, TINY_DIT.context_dim, generator=g),
        torch.randn(2, 16, 1, 8, 8, generator=g),
    )


def train_step(dit, loras, *, context_grad: bool = True, seed: int = 3):
    x, t, context, target = batch(seed)
    context.requires_grad_(context_grad)
    loss = torch.nn.functional.mse_loss(dit(x, t, context), target)
    loss.backward()
    grads = {
        f"{name}.{part}": getattr(lora, part).weight.grad.clone()
        for name, lora in loras.items()
        for part in ("lora_down", "lora_up")
    }
    if context_grad:
        grads["context"] = context.grad.clone()
    for lora in loras.values():
        lora.zero_grad()
    return loss.detach(), grads


def run_with(memory: dict, *, num_blocks: int = 4, steps: int = 1, lora_blocks=None, context_grad=True):
    dit = build_dit(num_blocks)
    prof = profile(**memory)
    strategies = [cls(prof) for cls in STRATEGIES if cls.enabled(prof)]
    applied = apply_memory_strategies(strategies, dit, device="cpu")
    loras = attach_lora(dit, lora_blocks)
    results = [train_step(dit, loras, context_grad=context_grad, seed=3 + s) for s in range(steps)]
    return dit, applied, results


def assert_same(result, reference):
    loss, grads = result
    ref_loss, ref_grads = reference
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=RTOL, atol=ATOL, msg=name)


CASES = {
    "gradient_checkpointing": dict(gradient_checkpointing=True),
    "cpu_offload_checkpointing": dict(cpu_offload_checkpointing=True),
    "unsloth_offload_checkpointing": dict(unsloth_offload_checkpointing=True),
    "swap": dict(blocks_to_swap=2),
    "swap+checkpointing": dict(gradient_checkpointing=True, blocks_to_swap=2),
    "swap+cpu_offload": dict(cpu_offload_checkpointing=True, blocks_to_swap=2),
    "swap+unsloth": dict(unsloth_offload_checkpointing=True, blocks_to_swap=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_strategy_matches_plain_training(case):
    _, _, reference = run_with({}, steps=2)
    _, applied, results = run_with(CASES[case], steps=2)
    assert applied, "the profile enabled no strategy"
    for result, ref in zip(results, reference):
        assert_same(result, ref)


@pytest.mark.parametrize("case", ["unsloth_offload_checkpointing", "swap+unsloth", "swap+checkpointing"])
def test_strategy_matches_when_early_blocks_are_not_trained(case):
    """Blocks 0-1 without LoRA and a context without grad: their inputs need no grad, so the autograd
    bookkeeping (anchor, backward swap hooks) has to cope with parts of the graph that never run backward."""
    _, _, reference = run_with({}, num_blocks=6, steps=2, lora_blocks={2, 3, 4, 5}, context_grad=False)
    memory = dict(CASES[case])
    if "blocks_to_swap" in memory:
        memory["blocks_to_swap"] = 4
    _, _, results = run_with(memory, num_blocks=6, steps=2, lora_blocks={2, 3, 4, 5}, context_grad=False)
    for result, ref in zip(results, reference):
        assert_same(result, ref)


def test_checkpointing_strategies_exclude_each_other():
    assert GradientCheckpointing.enabled(profile(gradient_checkpointing=True))
    # The offloading variants turn checkpointing on by themselves and replace the plain one.
    assert not GradientCheckpointing.enabled(profile(gradient_checkpointing=True, unsloth_offload_checkpointing=True))
    assert not GradientCheckpointing.enabled(profile(gradient_checkpointing=True, cpu_offload_checkpointing=True))
    both = profile(cpu_offload_checkpointing=True, unsloth_offload_checkpointing=True)
    errors = [e for cls in STRATEGIES if cls.enabled(both) for e in cls.validate(both)]
    assert len(errors) == 1 and "unsloth_offload_checkpointing" in errors[0]


def test_swap_combines_with_activation_offload_without_errors():
    prof = profile(unsloth_offload_checkpointing=True, blocks_to_swap=2)
    assert [e for cls in STRATEGIES if cls.enabled(prof) for e in cls.validate(prof)] == []


def test_too_many_swapped_blocks_is_refused_with_the_limit():
    dit = build_dit(4)
    with pytest.raises(MemoryStrategyError, match="at most 2"):
        BlockSwap(profile(blocks_to_swap=3)).apply(dit, device="cpu")


def test_unsloth_does_not_keep_the_graph_of_the_block():
    """Forward under the unsloth function keeps no block-internal autograd graph: the output's grad_fn is the
    offload function itself."""
    dit = build_dit(4)
    UnslothOffloadCheckpointing(profile(unsloth_offload_checkpointing=True)).apply(dit, device="cpu")
    attach_lora(dit)
    seen = []
    runner = dit.block_runner

    def recording(index, block, x, *args):
        out = runner(index, block, x, *args)
        seen.append(type(out.grad_fn).__name__)
        return out

    dit.set_block_runner(recording)
    x, t, context, _ = batch()
    dit(x, t, context)
    assert seen == ["_OffloadedBlockBackward"] * 4


def test_cpu_offload_keeps_block_inputs_in_cpu_memory():
    """Each block runs on the CPU copy the checkpoint keeps, not on the tensor it was given."""
    dit = build_dit(4)
    given, ran_on = [], []

    def innermost(index, block, x, *args):
        ran_on.append(x)
        return block(x, *args)

    dit.set_block_runner(innermost)
    CpuOffloadCheckpointing(profile(cpu_offload_checkpointing=True)).apply(dit, device="cpu")
    offloading = dit.block_runner

    def outermost(index, block, x, *args):
        given.append(x)
        return offloading(index, block, x, *args)

    dit.set_block_runner(outermost)
    attach_lora(dit)
    x, t, context, target = batch()
    loss = torch.nn.functional.mse_loss(dit(x, t, context), target)
    assert len(given) == len(ran_on) == 4
    for original, kept in zip(given, ran_on):
        assert kept.device.type == "cpu" and kept.data_ptr() != original.data_ptr()
        assert torch.equal(kept, original)
    loss.backward()
    assert len(ran_on) == 8  # recomputed in backward from the kept copies


def test_fp8_stores_linear_weights_as_float8_and_keeps_names():
    dit = build_dit(4)
    names_before = list(dict(dit.named_parameters()))
    Fp8Base(profile(fp8_base=True)).apply(dit, device="cpu")
    params = dict(dit.named_parameters())
    assert list(params) == names_before
    assert params["blocks.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert params["blocks.3.mlp.layer2.weight"].dtype == torch.float8_e4m3fn
    assert params["llm_adapter.blocks.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    for kept in (
        "blocks.0.adaln_modulation_self_attn.1.weight",
        "blocks.0.self_attn.q_norm.weight",
        "x_embedder.proj.1.weight",
        "t_embedder.1.linear_1.weight",
        "final_layer.linear.weight",
        "llm_adapter.embed.weight",
    ):
        assert params[kept].dtype == torch.float32, kept
    assert "blocks.0.self_attn.q_proj.weight_scale" not in dit.state_dict()


def test_fp8_training_matches_plain_training_on_the_dequantised_weights():
    dit = build_dit(4)
    Fp8Base(profile(fp8_base=True)).apply(dit, device="cpu")
    reference = build_dit(4)
    with torch.no_grad():
        for name, module in dit.named_modules():
            if hasattr(module, "weight_scale"):
                reference.get_submodule(name).weight.copy_(
                    dequantize_weight(module.weight, module.weight_scale, torch.float32)
                )
    assert_same(train_step(dit, attach_lora(dit)), train_step(reference, attach_lora(reference)))


def test_fp8_round_trip_is_within_e4m3_error():
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitude, each with a few outliers, like trained Linear weights.
    weight = torch.randn(64, 256, generator=g) * torch.logspace(-4, 1, 64)[:, None]
    weight[:, :3] *= 8
    q, scale = quantize_weight(weight)
    restored = dequantize_weight(q, scale, torch.float32)
    # e4m3: 3 mantissa bits (half a step = 2^-4 relative) for normal values; subnormal step 2^-9 (times the scale).
    bound = torch.maximum(weight.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((restored - weight).abs() <= bound).all()
    assert (scale * 448 >= weight.abs().amax(dim=1, keepdim=True) * (1 - 1e-6)).all()
    assert (restored - weight).abs().max() > 0  # it really is 8-bit


def test_fp8_base_refuses_float32_compute():
    prof = profile(fp8_base=True)
    prof.training.mixed_precision = "no"
    assert Fp8Base.validate(prof) and "float32" in Fp8Base.validate(prof)[0]
    assert Fp8Base.validate(profile(fp8_base=True)) == []


def test_fp8_with_block_swap_and_checkpointing_matches_fp8_alone():
    _, _, reference = run_with(dict(fp8_base=True), num_blocks=6, steps=2)
    memory = dict(fp8_base=True, blocks_to_swap=4, gradient_checkpointing=True)
    _, applied, results = run_with(memory, num_blocks=6, steps=2)
    assert [s.name for s in applied] == ["fp8_base", "gradient_checkpointing", "blocks_to_swap"]
    for result, ref in zip(results, reference):
        assert_same(result, ref)


def test_builtin_plugin_registers_every_strategy():
    import anima_plugins.memory as plugin

    registered = {}
    plugin.register_memory_strategies(register=lambda name, obj, aliases=(): registered.setdefault(name, obj))
    assert registered == {
        "fp8_base": Fp8Base,
        "gradient_checkpointing": GradientCheckpointing,
        "selective_checkpointing": SelectiveCheckpointing,
        "cpu_offload_checkpointing": CpuOffloadCheckpointing,
        "unsloth_offload_checkpointing": UnslothOffloadCheckpointing,
        "blocks_to_swap": BlockSwap,
    }


def test_strategies_on_the_loaded_tiny_model(tiny_model):
    """The released-format tiny file through load_dit: every strategy at once (unsloth + swap + fp8 is the
    combination with the most moving parts) against fp8 alone; checkpointing + swap against plain."""

    def step(memory):
        dit = load_dit(tiny_model.dit, dtype=torch.float32).requires_grad_(False)
        prof = profile(**memory)
        apply_memory_strategies([cls(prof) for cls in STRATEGIES if cls.enabled(prof)], dit, device="cpu")
        return train_step(dit, attach_lora(dit))

    assert_same(step(dict(gradient_checkpointing=True, blocks_to_swap=2)), step({}))
    everything = dict(fp8_base=True, unsloth_offload_checkpointing=True, blocks_to_swap=2)
    assert_same(step(everything), step(dict(fp8_base=True)))


def test_fp8_computes_in_bf16():
    dit = build_dit(4).to(torch.bfloat16)
    Fp8Base(profile(fp8_base=True)).apply(dit, device="cpu")
    reference = build_dit(4).to(torch.bfloat16)
    with torch.no_grad():
        for name, module in dit.named_modules():
            if hasattr(module, "weight_scale"):
                reference.get_submodule(name).weight.copy_(
                    dequantize_weight(module.weight, module.weight_scale, torch.bfloat16)
                )
    x, t, context, _ = batch()
    with torch.no_grad():
        out = dit(x.bfloat16(), t, context.bfloat16())
        expected = reference(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16
    # Same bf16 weights and ops: identical up to bf16 rounding of the dequantisation product.
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("memory, enabled", [
    ({}, []),
    ({"gradient_checkpointing": True}, ["gradient_checkpointing"]),
    ({"selective_checkpointing": True}, ["selective_checkpointing"]),
    ({"cpu_offload_checkpointing": True}, ["cpu_offload_checkpointing"]),
    ({"unsloth_offload_checkpointing": True}, ["unsloth_offload_checkpointing"]),
    ({"blocks_to_swap": 2}, ["blocks_to_swap"]),
    ({"fp8_base": True}, ["fp8_base"]),
    ({"fp8_base_unet": True}, ["fp8_base"]),  # sd-scripts' name for the same thing
], ids=["none", "gradient_checkpointing", "selective_checkpointing", "cpu_offload_checkpointing", "unsloth_offload_checkpointing",
        "blocks_to_swap", "fp8_base", "fp8_base_unet"])
def test_each_memory_key_of_a_profile_enables_its_strategy(memory, enabled):
    """The strategies a run applies are those whose key the profile sets (the trainer asks each `enabled`)."""
    from anima_core.config.schema import Profile

    prof = Profile.model_validate({"memory": memory})
    chosen = [cls(prof) for cls in STRATEGIES if cls.enabled(prof)]
    assert sorted(s.name for s in chosen) == enabled
    if enabled == ["fp8_base"]:
        dit = build_dit(2)
        apply_memory_strategies(chosen, dit, device="cpu")
        assert dict(dit.named_parameters())["blocks.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    if enabled in ([], ["gradient_checkpointing"]):  # checkpointing runs each block again in backward
        dit, runs = build_dit(2), []

        def innermost(index, block, x, *args):
            runs.append(index)
            return block(x, *args)

        dit.set_block_runner(innermost)
        apply_memory_strategies(chosen, dit, device="cpu")
        train_step(dit, attach_lora(dit))
        assert runs == ([0, 1, 1, 0] if enabled else [0, 1])
