"""norm_modulate: LayerNorm and AdaLN modulation in one function, with the plain expression's numbers.

The reference is the expression the DiT used before, ``F.layer_norm(x) * (1 + scale) + shift``, run by autograd.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from anima_core.models import dit as dit_module
from anima_core.models.dit import AnimaDiT
from anima_core.models.norms import norm_modulate
from anima_core.models.tiny import TINY_DIT, randomize_norm_weights

RTOL = 1e-5
EPS = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def reference(x, shift, scale, eps=EPS):
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def inputs(dtype, mod_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(2, 3, 5, 16, generator=g) + 1
    shift = torch.randn(mod_shape, generator=g)
    scale = 0.5 * torch.randn(mod_shape, generator=g)
    grad = torch.randn(2, 3, 5, 16, generator=g)
    return [t.to(dtype) for t in (x, shift, scale)], grad


def forward_backward(fn, tensors, grad, autocast=False):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("mod_shape", [(2, 3, 1, 16), (2, 1, 1, 16)], ids=["per_frame", "per_sample"])
def test_float32_equals_the_plain_expression_with_gradients(mod_shape):
    tensors, grad = inputs(torch.float32, mod_shape)
    out, grads = forward_backward(norm_modulate, tensors, grad)
    ref, ref_grads = forward_backward(reference, tensors, grad)
    assert out.dtype == torch.float32 and rel(out, ref) <= RTOL
    for name, got, want in zip(("x", "shift", "scale"), grads, ref_grads):
        assert got.shape == want.shape and rel(got, want) <= RTOL, name


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16_autocast"])
def test_bf16_runs_the_same_kernels_and_casts_as_the_plain_expression(autocast):
    """Half precision shows any cast in a different place; here every result is the plain one bit for bit."""
    tensors, grad = inputs(torch.bfloat16, (2, 3, 1, 16), seed=1)
    out, grads = forward_backward(norm_modulate, tensors, grad, autocast)
    ref, ref_grads = forward_backward(reference, tensors, grad, autocast)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    for name, got, want in zip(("x", "shift", "scale"), grads, ref_grads):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def saved_bytes(fn, tensors) -> tuple[int, list[tuple[int, ...]]]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    distinct = {(t.data_ptr(), t.dtype, tuple(t.shape)): t for t in saved}.values()
    return sum(t.numel() * t.element_size() for t in distinct), [tuple(t.shape) for t in distinct]


def test_backward_keeps_x_and_row_statistics_not_the_normalised_tensor():
    tensors, _ = inputs(torch.float32, (2, 3, 1, 16))
    x = tensors[0]
    ours, shapes = saved_bytes(norm_modulate, tensors)
    plain, _ = saved_bytes(reference, tensors)
    full = [s for s in shapes if s == tuple(x.shape)]
    assert full == [tuple(x.shape)]  # x itself; the rest is per row (mean, rstd) or per frame (1 + scale)
    assert ours < plain and plain - ours >= x.numel() * x.element_size()  # the normalised tensor is not kept


def test_no_grad_gives_the_same_values():
    tensors, _ = inputs(torch.float32, (2, 1, 1, 16))
    with torch.no_grad():
        assert torch.equal(norm_modulate(*tensors), reference(*tensors))


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = AnimaDiT(dataclasses.replace(TINY_DIT, num_blocks=2))
    randomize_norm_weights(model, torch.Generator().manual_seed(seed + 1))
    return model


def dit_step(model):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 1, 4, 4, generator=g).requires_grad_()
    context = torch.randn(2, 8, TINY_DIT.context_dim, generator=g).requires_grad_()
    out = model(x, torch.tensor([0.3, 0.8]), context)
    out.backward(torch.randn(out.shape, generator=g))
    grads = {"x": x.grad, "context": context.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return out.detach(), grads, out


def test_the_dit_modulates_through_it_and_trains_as_with_the_plain_expression(monkeypatch):
    out, grads, graph = dit_step(tiny_dit())
    nodes, stack, seen = 0, [graph.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes += type(node).__name__ == "_NormModulateBackward"
        stack += [n for n, _ in node.next_functions]
    assert nodes == 3 * 2 + 1  # three per block and the final layer's

    monkeypatch.setattr(dit_module, "norm_modulate", reference)
    ref, ref_grads, _ = dit_step(tiny_dit())
    assert rel(out, ref) <= RTOL
    for name, want in ref_grads.items():
        if want is not None and want.norm() > 0:
            assert rel(grads[name], want) <= RTOL, name
