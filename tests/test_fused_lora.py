"""The fused LoRA GEMM (network arg ``fused``): one GEMM of x with [W; down] each way, the plain path's numbers.

Float32 on the CPU: the fused and the plain forward differ only in how the GEMM library blocks a wider matrix,
so outputs and gradients agree to 1e-5 relative. Every fallback is checked to say why it was taken.
"""

from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from anima_core.models.dit import AnimaDiT
from anima_core.models.tiny import TINY_DIT
from anima_core.training.memory import apply_memory_strategies
from anima_plugins.lora import apply_lora_files, create_network
from anima_plugins.lora.args import NetworkArgsError, parse_network_args
from anima_plugins.lora.module import LoRAModule
from anima_plugins.memory import BlockSwap
from anima_plugins.memory.fp8 import quantize_linear
from training_helpers import make_run

RTOL = 1e-5
IN, OUT, RANK = 32, 24, 4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


class Matmuls(TorchDispatchMode):
    """(op, input shapes, output shape) of every matrix product that runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm"):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((name, shapes, tuple(out.shape)))
        return out


def pair(*, bias: bool, fused_kwargs=None, **lora_kwargs):
    """The same frozen Linear and LoRA twice: (linear, fused lora), (linear, plain lora); non-zero lora_up."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(IN, OUT, bias=bias).requires_grad_(False)
    twins = []
    for fused in (True, False):
        layer = copy.deepcopy(linear)
        torch.manual_seed(1)
        lora = LoRAModule("m", layer, rank=RANK, alpha=2.0, multiplier=0.7, fused=fused, **lora_kwargs)
        with torch.no_grad():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=torch.Generator().manual_seed(2)))
        lora.apply_to()
        twins.append((layer, lora))
    return twins


def run(layer, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", [(7, IN), (2, 3, 2, 2, IN)], ids=["2d", "5d"])
def test_fused_forward_and_gradients_equal_the_plain_path(bias, shape):
    (fused_layer, fused), (plain_layer, plain) = pair(bias=bias)
    assert fused.fused_reason is None and fused_layer.weight.data_ptr() == fused._stacked.data_ptr()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    grad_out = torch.randn(*shape[:-1], OUT, generator=torch.Generator().manual_seed(4))
    with Matmuls() as seen:
        y, grad_x = run(fused_layer, x, grad_out)
    y_ref, grad_x_ref = run(plain_layer, x, grad_out)
    assert fused.fused_reason is None
    assert rel(y, y_ref) <= RTOL and rel(grad_x, grad_x_ref) <= RTOL
    for part in ("lora_down", "lora_up"):
        assert rel(getattr(fused, part).weight.grad, getattr(plain, part).weight.grad) <= RTOL, part
    rows = x.numel() // IN
    products = [(shapes, out) for _, shapes, out in seen.calls]
    # Forward: one GEMM gives base output and hidden state together; backward: grad_x in one GEMM with [W; down].
    assert ([(rows, IN), (IN, OUT + RANK)], (rows, OUT + RANK)) in [(s[-2:], o) for s, o in products]
    assert ([(rows, OUT + RANK), (OUT + RANK, IN)], (rows, IN)) in [(s[-2:], o) for s, o in products]
    plain_products = ([(rows, IN), (IN, OUT)], [(rows, OUT), (OUT, IN)])  # the base GEMMs of the plain path
    assert not any(s[-2:] in plain_products for s, _ in products)


def test_the_plain_path_is_not_the_fused_one():
    """The structural check above tells the paths apart: the plain module never multiplies by [W; down]."""
    _, (plain_layer, plain) = pair(bias=False)
    with Matmuls() as seen:
        run(plain_layer, torch.randn(5, IN), torch.randn(5, OUT))
    assert plain.fused_reason == "fused is off" and plain._stacked is None
    assert not any(out[-1] == OUT + RANK or shapes[-2] == (5, OUT + RANK) for _, shapes, out in seen.calls)
    assert any(shapes[-2:] == [(5, IN), (IN, OUT)] for _, shapes, _ in seen.calls)


def test_after_optimizer_steps_the_fused_output_still_equals_the_plain_one():
    (fused_layer, fused), (plain_layer, plain) = pair(bias=True)
    optimizers = [torch.optim.AdamW(lora.parameters(), lr=0.05) for lora in (fused, plain)]
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, grad_out = torch.randn(6, IN, generator=g), torch.randn(6, OUT, generator=g)
        for layer, optimizer in zip((fused_layer, plain_layer), optimizers):
            optimizer.zero_grad()
            run(layer, x, grad_out)
            optimizer.step()
    # An update outside the optimizer (max-norm, EMA, a loaded state) writes lora_down's .data in place.
    with torch.no_grad():
        for lora in (fused, plain):
            lora.lora_down.weight.data.mul_(0.5)
    x = torch.randn(6, IN, generator=g)
    with torch.no_grad():
        assert rel(fused_layer(x), plain_layer(x)) <= RTOL
    assert fused.fused_reason is None
    assert torch.equal(fused._stacked[OUT:], fused.lora_down.weight)  # refreshed before the forward
    assert torch.equal(fused_layer.weight, plain_layer.weight)  # the frozen rows never move


@pytest.mark.parametrize("kwargs, says", [
    (dict(dropout=0.1), "dropout"),
    (dict(rank_dropout=0.5), "dropout"),
    (dict(module_dropout=0.5), "dropout"),
], ids=["dropout", "rank_dropout", "module_dropout"])
def test_dropouts_in_training_take_the_plain_path_and_say_so(kwargs, says):
    (fused_layer, fused), (plain_layer, plain) = pair(bias=False, **kwargs)
    x = torch.randn(4, IN)
    fused.train(), plain.train()
    torch.manual_seed(9)
    y = fused_layer(x)
    torch.manual_seed(9)
    y_ref = plain_layer(x)
    assert says in fused.fused_reason
    assert torch.equal(y, y_ref)  # the very same path, the very same draws
    fused.eval(), plain.eval()
    with torch.no_grad():
        assert rel(fused_layer(x), plain_layer(x)) <= RTOL
    assert fused.fused_reason is None  # without training, dropouts draw nothing: fused again


def test_fp8_and_quantised_or_wrapped_layers_are_not_fused():
    linear = torch.nn.Linear(IN, OUT).to(torch.bfloat16).requires_grad_(False)
    quantize_linear(linear)  # fp8_base: float8 weight and a patched forward
    lora = LoRAModule("m", linear, rank=RANK, alpha=1.0, fused=True)
    lora.apply_to()
    assert "already patched" in lora.fused_reason and lora._stacked is None
    with torch.no_grad():
        lora(torch.randn(2, IN, dtype=torch.bfloat16))
    assert "already patched" in lora.fused_reason

    class OwnForward(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x)

    lora = LoRAModule("m", OwnForward(IN, OUT).requires_grad_(False), rank=RANK, alpha=1.0, fused=True)
    lora.apply_to()
    assert "own forward" in lora.fused_reason

    linear = torch.nn.Linear(IN, OUT).requires_grad_(False)
    linear.weight = torch.nn.Parameter(torch.zeros(OUT, IN, dtype=torch.int8), requires_grad=False)
    lora = LoRAModule("m", linear, rank=RANK, alpha=1.0, fused=True)
    lora.apply_to()
    assert "quantised" in lora.fused_reason

    lora = LoRAModule("m", torch.nn.Linear(IN, OUT), rank=RANK, alpha=1.0, fused=True)  # weight trained
    lora.apply_to()
    assert "base weight is trained" in lora.fused_reason


def test_a_dtype_mismatch_without_autocast_takes_the_plain_path():
    (fused_layer, fused), (plain_layer, plain) = pair(bias=False)
    fused.to(torch.bfloat16), plain.to(torch.bfloat16)  # full_bf16 LoRA on a float32 model
    x = torch.randn(3, IN)
    with torch.no_grad():
        y, y_ref = fused_layer(x), plain_layer(x)
    assert "dtypes differ" in fused.fused_reason
    assert torch.equal(y, y_ref)


def test_under_autocast_a_float32_lora_on_a_bf16_model_is_fused_with_autocasts_casts():
    """The mixed-precision case: bf16 weights, float32 LoRA, bf16 autocast. The down rows of [W; down] hold
    autocast's cast of lora_down, so the forward is the plain path's bf16 GEMMs."""
    (fused_layer, fused), (plain_layer, plain) = pair(bias=True)
    for layer in (fused_layer, plain_layer):
        layer.to(torch.bfloat16)
    x = torch.randn(2, 5, IN)
    grad_out = torch.randn(2, 5, OUT).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grad_x = run(fused_layer, x, grad_out)
        y_ref, grad_x_ref = run(plain_layer, x, grad_out)
    assert fused.fused_reason is None  # restacked in bf16 after the .to()
    assert fused._stacked.dtype == torch.bfloat16 and fused_layer.weight.data_ptr() == fused._stacked.data_ptr()
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert rel(y, y_ref) <= 1e-2 and rel(grad_x, grad_x_ref) <= 1e-2  # bf16 rounding of one sum
    for part in ("lora_down", "lora_up"):
        grad, ref = getattr(fused, part).weight.grad, getattr(plain, part).weight.grad
        assert grad.dtype == torch.float32 and rel(grad, ref) <= 1e-2, part


def test_a_replaced_weight_is_stacked_again_once_then_left_alone():
    (fused_layer, fused), (plain_layer, _) = pair(bias=False)
    x = torch.randn(3, IN)
    first = fused._stacked
    fused_layer.weight.data = fused_layer.weight.data.clone()  # e.g. a .to() that copied the weight
    with torch.no_grad():
        assert rel(fused_layer(x), plain_layer(x)) <= RTOL
    assert fused.fused_reason is None and fused._stacked is not first
    assert fused_layer.weight.data_ptr() == fused._stacked.data_ptr()
    fused_layer.weight.data = fused_layer.weight.data.clone()
    with torch.no_grad():
        assert rel(fused_layer(x), plain_layer(x)) <= RTOL
    assert "keeps being replaced" in fused.fused_reason and fused._stacked is None


def test_inside_torch_compile_the_plain_path_is_traced(monkeypatch):
    (fused_layer, fused), (plain_layer, _) = pair(bias=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert torch.equal(fused_layer(x), plain_layer(x))
    assert "torch.compile" in fused.fused_reason


# --- the network ---------------------------------------------------------------------------------------


def tiny_dit(num_blocks: int | None = None) -> AnimaDiT:
    torch.manual_seed(0)
    config = TINY_DIT if num_blocks is None else dataclasses.replace(TINY_DIT, num_blocks=num_blocks)
    return AnimaDiT(config).requires_grad_(False).eval()


def net_cfg(**args):
    return types.SimpleNamespace(dim=4, alpha=2.0, dropout=None, args=args, weights=None)


def dit_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([0.6]), torch.randn(1, 8, 64, generator=g)


def trained_network(dit, fused):
    """A network with ``fused`` as its arg (None: the arg left out), and random lora_up weights."""
    torch.manual_seed(5)  # lora_down's init draws from the global generator
    args = {"train_llm_adapter": True} if fused is None else {"fused": fused, "train_llm_adapter": True}
    network = create_network(net_cfg(**args), dit=dit, text_encoder=None, train_text_encoder=False)
    network.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.copy_(0.05 * torch.randn(lora.lora_up.weight.shape, generator=g))
    return network


@pytest.mark.parametrize("value, fused", [(True, True), ("true", True), (False, False), ("False", False),
                                          ("auto", None)])
def test_the_fused_arg_parses(value, fused):
    assert parse_network_args({"fused": value}).fused is fused
    assert parse_network_args({}).fused is False  # off unless asked for
    with pytest.raises(NetworkArgsError, match="fused"):
        parse_network_args({"fused": "yes"})


def test_the_fused_arg_selects_the_path_and_auto_is_off_on_the_cpu():
    for value, expect in ((True, True), (False, False), ("auto", False), (None, False)):
        network = trained_network(tiny_dit(), value)
        reasons = {lora.fused_reason for lora in network.loras.values()}
        if expect:
            assert reasons == {None}
            assert f"fused LoRA GEMM: {len(network.loras)} of {len(network.loras)} modules" in "\n".join(network.fused_lines())
        else:
            assert reasons == {"fused is off"} and network.fused_lines() == []
            assert all(lora._stacked is None for lora in network.loras.values())


def test_a_fused_network_keeps_the_model_its_files_merging_and_inference(tmp_path):
    dit, plain_dit = tiny_dit(), tiny_dit()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    network, plain = trained_network(dit, True), trained_network(plain_dit, False)
    assert all(lora.fused_reason is None for lora in network.loras.values())
    # The model's own state: same keys, shapes, dtypes and values; each adapted weight a view of its [W; down].
    state = dit.state_dict()
    assert state.keys() == before.keys()
    assert all(state[k].shape == v.shape and state[k].dtype == v.dtype and torch.equal(state[k], v)
               for k, v in before.items())
    lora = network.loras["lora_unet_blocks_0_mlp_layer1"]
    assert state["blocks.0.mlp.layer1.weight"].data_ptr() == lora._stacked.data_ptr()
    with torch.no_grad():
        out, ref = dit(*dit_inputs()), plain_dit(*dit_inputs())
    assert rel(out, ref) <= RTOL
    # Saved files are the same tensors.
    network.save(tmp_path / "fused.safetensors", dtype=torch.float32)
    plain.save(tmp_path / "plain.safetensors", dtype=torch.float32)
    saved, saved_ref = load_file(tmp_path / "fused.safetensors"), load_file(tmp_path / "plain.safetensors")
    assert saved.keys() == saved_ref.keys() and all(torch.equal(saved[k], saved_ref[k]) for k in saved)
    assert network.self_check(tmp_path / "fused.safetensors").ok
    # Merging writes into the view, so the stacked buffer runs the merged weight; unmerging restores it.
    with torch.no_grad():
        network.merge_into()
        merged = dit(*dit_inputs())
        assert not torch.equal(dit.state_dict()["blocks.0.mlp.layer1.weight"], before["blocks.0.mlp.layer1.weight"])
        network.unmerge()
        restored = dit(*dit_inputs())
    assert rel(merged, ref) <= RTOL and rel(restored, ref) <= RTOL
    # Removing gives every Linear its own storage back, with its values.
    network.remove()
    assert all(lora._stacked is None for lora in network.loras.values())
    state = dit.state_dict()
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in before.items())
    assert state["blocks.0.mlp.layer1.weight"].untyped_storage().nbytes() == before["blocks.0.mlp.layer1.weight"].nbytes
    # The file applied for inference on the plain model gives the trained output.
    applied = apply_lora_files(dit, None, [(tmp_path / "fused.safetensors", 1.0)])
    with torch.no_grad():
        assert rel(dit(*dit_inputs()), ref) <= RTOL
    applied.remove()


def test_block_swapped_blocks_are_not_fused_and_still_train_the_same():
    memory = types.SimpleNamespace(memory=types.SimpleNamespace(blocks_to_swap=2))
    dit, plain_dit = tiny_dit(4), tiny_dit(4)
    apply_memory_strategies([BlockSwap(memory)], dit, device="cpu")
    network, plain = trained_network(dit, True), trained_network(plain_dit, False)
    block = [lora for name, lora in network.loras.items() if "_blocks_" in name and "llm_adapter" not in name]
    others = [lora for name, lora in network.loras.items() if lora not in block]
    assert block and all("blocks_to_swap" in lora.fused_reason for lora in block)
    assert others and all(lora.fused_reason is None for lora in others)  # the adapter is not swapped
    network.train(), plain.train()
    grads = []
    for model, net in ((dit, network), (plain_dit, plain)):
        model(*dit_inputs()).square().mean().backward()
        grads.append({k: p.grad for k, p in net.named_parameters()})
    assert {k for k, g in grads[0].items() if g is None} == {k for k, g in grads[1].items() if g is None}
    compared = [k for k, g in grads[1].items() if g is not None and g.norm() > 0]
    assert any("lora_unet_blocks_3_" in k for k in compared)  # a swapped-in block's LoRA got its gradient
    assert all(rel(grads[0][k], grads[1][k]) <= RTOL for k in compared)


@pytest.mark.parametrize("memory", [{}, {"gradient_checkpointing": True}], ids=["plain", "checkpointing"])
def test_a_short_training_trains_the_same_lora_fused_on_and_off(tmp_path, tiny_model, memory):
    """Text encoder and DiT LoRA trained for a few AdamW steps, with the fused GEMM forced on and off."""
    files, trainers = [], []
    for fused in (True, False):
        trainer = make_run(tmp_path / str(fused), tiny_model, training={"max_train_steps": 4},
                           caching={"cache_text_encoder_outputs": False}, memory=memory,
                           network={"train_unet_only": False, "args": {"fused": fused}})
        result = trainer.run()
        assert result.status == "finished"
        files.append(load_file(result.lora_path))
        trainers.append(trainer)
    loras = trainers[0].network.loras.values()
    assert all(lora.fused_reason is None for lora in loras)
    assert any(lora.name.startswith("lora_te") for lora in loras)  # Qwen3 modules are fused too
    assert all(lora.fused_reason == "fused is off" for lora in trainers[1].network.loras.values())
    fused, plain = files
    assert fused.keys() == plain.keys()
    moved = [k for k in plain if k.endswith("lora_up.weight") and plain[k].abs().sum() > 0]
    assert moved  # the LoRA trained
    for key in plain:
        assert rel(fused[key], plain[key]) <= RTOL, key
