"""DiT and LLM adapter: key layout, config detection, index formulas, RoPE, masks, dtypes, hooks."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from anima_core.models import AnimaDiT, Block, DiTConfig, LLMAdapterTransformerBlock, detect_dit_config, load_dit
from anima_core.models.attention import AttentionBackend
from anima_core.models.dit import patchify, timestep_sinusoid, unpatchify
from anima_core.models.rope import adapter_rope_cos_sin, apply_rope, dit_rope_cos_sin, dit_rope_split
from anima_core.models.tiny import TINY_DIT

# ANIMA.md §1.4 (2B, no prefix).
SPEC_2B_TOP_LEVEL = {
    "x_embedder.proj.1.weight": (2048, 68),
    "t_embedder.1.linear_1.weight": (2048, 2048),
    "t_embedder.1.linear_2.weight": (6144, 2048),
    "t_embedding_norm.weight": (2048,),
    "final_layer.linear.weight": (64, 2048),
    "final_layer.adaln_modulation.1.weight": (256, 2048),
    "final_layer.adaln_modulation.2.weight": (4096, 256),
}
SPEC_2B_BLOCK = {
    "self_attn.q_proj.weight": (2048, 2048),
    "self_attn.k_proj.weight": (2048, 2048),
    "self_attn.v_proj.weight": (2048, 2048),
    "self_attn.output_proj.weight": (2048, 2048),
    "self_attn.q_norm.weight": (128,),
    "self_attn.k_norm.weight": (128,),
    "cross_attn.q_proj.weight": (2048, 2048),
    "cross_attn.k_proj.weight": (2048, 1024),
    "cross_attn.v_proj.weight": (2048, 1024),
    "cross_attn.output_proj.weight": (2048, 2048),
    "cross_attn.q_norm.weight": (128,),
    "cross_attn.k_norm.weight": (128,),
    "mlp.layer1.weight": (8192, 2048),
    "mlp.layer2.weight": (2048, 8192),
    "adaln_modulation_self_attn.1.weight": (256, 2048),
    "adaln_modulation_cross_attn.1.weight": (256, 2048),
    "adaln_modulation_mlp.1.weight": (256, 2048),
    "adaln_modulation_self_attn.2.weight": (6144, 256),
    "adaln_modulation_cross_attn.2.weight": (6144, 256),
    "adaln_modulation_mlp.2.weight": (6144, 256),
}
SPEC_2B_ADAPTER_BLOCK = {
    "norm_self_attn.weight": (1024,),
    "norm_cross_attn.weight": (1024,),
    "norm_mlp.weight": (1024,),
    **{f"{a}.{p}_proj.weight": (1024, 1024) for a in ("self_attn", "cross_attn") for p in "qkvo"},
    **{f"{a}.{p}_norm.weight": (64,) for a in ("self_attn", "cross_attn") for p in "qk"},
    "mlp.0.weight": (4096, 1024),
    "mlp.0.bias": (4096,),
    "mlp.2.weight": (1024, 4096),
    "mlp.2.bias": (1024,),
}
SPEC_2B_ADAPTER_TOP = {
    "embed.weight": (32128, 1024),
    "out_proj.weight": (1024, 1024),
    "out_proj.bias": (1024,),
    "norm.weight": (1024,),
}


def spec_2b_shapes() -> dict[str, tuple[int, ...]]:
    shapes = dict(SPEC_2B_TOP_LEVEL)
    for i in range(28):
        shapes.update({f"blocks.{i}.{k}": v for k, v in SPEC_2B_BLOCK.items()})
    for j in range(6):
        shapes.update({f"llm_adapter.blocks.{j}.{k}": v for k, v in SPEC_2B_ADAPTER_BLOCK.items()})
    shapes.update({f"llm_adapter.{k}": v for k, v in SPEC_2B_ADAPTER_TOP.items()})
    return shapes


def meta_state_dict(config: DiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return AnimaDiT(config).state_dict()


@pytest.fixture(scope="module")
def tiny_dit(tiny_model):
    return load_dit(tiny_model.dit, dtype=torch.float32).eval()


def test_2b_config_has_exactly_the_spec_keys_and_shapes():
    state_dict = meta_state_dict(DiTConfig())
    assert len(state_dict) == 685
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == spec_2b_shapes()
    assert sum(v.numel() for v in state_dict.values()) == 2_091_068_928
    assert not any("pos_embedder" in k for k in state_dict)  # RoPE tables are not weights
    assert detect_dit_config(state_dict) == DiTConfig()


@pytest.mark.parametrize(
    ("width", "blocks", "heads"),
    [(5120, 36, 40), (1280, 20, 20)],
)
def test_other_releases_are_detected_from_shapes(width, blocks, heads):
    config = DiTConfig(model_channels=width, num_blocks=blocks, num_heads=heads, mlp_hidden=4 * width)
    detected = detect_dit_config(meta_state_dict(config))
    assert (detected.model_channels, detected.num_blocks, detected.num_heads) == (width, blocks, heads)
    assert detected.head_dim == width // heads and detected.mlp_hidden == 4 * width
    assert detected.llm_adapter == config.llm_adapter


def test_tiny_file_round_trips_through_the_net_prefix(tiny_model, tiny_dit):
    from safetensors import safe_open

    with safe_open(str(tiny_model.dit), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert all(k.startswith("net.") for k in keys)
    assert tiny_dit.config == TINY_DIT
    assert {f"net.{k}" for k in tiny_dit.state_dict()} == keys


def test_module_paths_and_class_names_match_the_checkpoint(tiny_dit):
    modules = dict(tiny_dit.named_modules())
    for path in ("blocks.3.self_attn.q_proj", "llm_adapter.blocks.0.mlp.0", "final_layer.adaln_modulation.1",
                 "t_embedder.1.linear_1", "x_embedder.proj.1"):  # fmt: skip
        assert isinstance(modules[path], torch.nn.Linear), path
    assert all(type(b) is Block for b in tiny_dit.blocks)
    assert all(type(b) is LLMAdapterTransformerBlock for b in tiny_dit.llm_adapter.blocks)
    assert len(tiny_dit.blocks) == 4


def test_patchify_follows_its_index_formula():
    b, c, t, h, w, p = 2, 17, 1, 6, 8, 2
    x = torch.randn(b, c, t, h, w)
    out = patchify(x, p, 1)
    assert out.shape == (b, t, h // p, w // p, c * p * p)
    for bi, ti, hi, wi, ci, m, n in [(0, 0, 0, 0, 0, 0, 0), (1, 0, 2, 3, 16, 1, 0), (0, 0, 1, 2, 5, 1, 1)]:
        assert out[bi, ti, hi, wi, ci * 4 + m * 2 + n] == x[bi, ci, ti, hi * p + m, wi * p + n]


def test_unpatchify_follows_its_index_formula():
    b, t, hp, wp, c, p = 2, 1, 3, 4, 16, 2
    y = torch.randn(b, t, hp, wp, p * p * c)
    out = unpatchify(y, p, 1, c)
    assert out.shape == (b, c, t, hp * p, wp * p)
    for bi, hi, wi, ci, p1, p2 in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 15, 1, 0), (0, 1, 2, 7, 0, 1), (1, 0, 1, 3, 1, 1)]:
        assert out[bi, ci, 0, hi * p + p1, wi * p + p2] == y[bi, 0, hi, wi, p1 * 32 + p2 * 16 + ci]


def test_rope_is_identity_at_position_zero_and_uses_the_spec_split():
    assert dit_rope_split(128) == (44, 42, 42)
    assert dit_rope_split(32) == (12, 10, 10)
    cos, sin = dit_rope_cos_sin(128, (1, 3, 5))
    x = torch.randn(15, 2, 128)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated[0], x[0])
    assert not torch.allclose(rotated[1:], x[1:])
    # spatial base theta = 10000 * 4^(42/40); second h frequency of the token at h=1, w=0
    theta_h = 10000 * 4 ** (42 / 40)
    angle = torch.atan2(sin[5, 22 + 1], cos[5, 22 + 1])
    assert math.isclose(angle.item(), theta_h ** (-2 / 42), rel_tol=1e-5)
    acos, asin = adapter_rope_cos_sin(64, 4)
    torch.testing.assert_close(apply_rope(x[:1, :, :64], acos[:1], asin[:1]), x[:1, :, :64])


def test_timestep_sinusoid_is_cos_first_on_raw_sigma():
    emb = timestep_sinusoid(torch.tensor([0.5]), 8)
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    torch.testing.assert_close(emb[0], torch.cat([(0.5 * freqs).cos(), (0.5 * freqs).sin()]))


def tiny_inputs(batch=2, t5_len=12, qwen_len=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 1, 8, 12, generator=g)
    sigmas = torch.rand(batch, generator=g)
    qwen = torch.randn(batch, qwen_len, 64, generator=g)
    ids = torch.randint(0, 32100, (batch, t5_len), generator=g)
    t5_mask = torch.ones(batch, t5_len, dtype=torch.long)
    t5_mask[:, t5_len // 2 :] = 0
    qwen_mask = torch.ones(batch, qwen_len, dtype=torch.long)
    qwen_mask[:, qwen_len - 3 :] = 0
    return x, sigmas, qwen, ids, t5_mask, qwen_mask


def test_adapter_zeroes_padded_rows_and_pads_to_512(tiny_dit):
    _, _, qwen, ids, t5_mask, qwen_mask = tiny_inputs()
    with torch.no_grad():
        context = tiny_dit.adapt_context(qwen, ids, t5_mask, qwen_mask)
    assert context.shape == (2, 512, 64)
    assert (context[:, 6:] == 0).all()
    assert (context[:, :6].abs().sum(-1) > 0).all()


def test_empty_caption_gives_zero_cross_attention_and_no_nan(tiny_dit):
    x, sigmas, qwen, ids, t5_mask, qwen_mask = tiny_inputs()
    qwen = torch.zeros_like(qwen)
    qwen_mask = torch.zeros_like(qwen_mask)  # empty caption: no valid source token
    ids = torch.zeros_like(ids)
    ids[:, 0] = 1
    t5_mask = torch.zeros_like(t5_mask)
    t5_mask[:, 0] = 1
    adapter = tiny_dit.llm_adapter
    block = adapter.blocks[0]
    captured = {}
    handle = block.cross_attn.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    try:
        context = tiny_dit.adapt_context(qwen, ids, t5_mask, qwen_mask)
    finally:
        handle.remove()
    assert torch.equal(captured["out"], torch.zeros_like(captured["out"]))
    assert context.isfinite().all() and (context[:, 1:] == 0).all()
    x.requires_grad_(True)
    v = tiny_dit(x, sigmas, qwen, target_input_ids=ids, target_attention_mask=t5_mask, source_attention_mask=qwen_mask)
    v.square().mean().backward()
    assert v.isfinite().all()
    assert all(p.grad is None or p.grad.isfinite().all() for p in tiny_dit.parameters())


def test_forward_with_ids_equals_forward_with_adapted_context(tiny_dit):
    x, sigmas, qwen, ids, t5_mask, qwen_mask = tiny_inputs()
    with torch.no_grad():
        direct = tiny_dit(x, sigmas, qwen, target_input_ids=ids, target_attention_mask=t5_mask,
                          source_attention_mask=qwen_mask)  # fmt: skip
        context = tiny_dit.adapt_context(qwen, ids, t5_mask, qwen_mask)
        via_context = tiny_dit(x, sigmas, context)
        explicit_zero_mask = tiny_dit(x, sigmas, context, padding_mask=torch.zeros(2, 1, 8, 12))
    torch.testing.assert_close(direct, via_context)
    torch.testing.assert_close(via_context, explicit_zero_mask)
    assert direct.shape == x.shape


def test_per_frame_timesteps_match_per_sample_timesteps(tiny_dit):
    x, sigmas, *_ = tiny_inputs()
    context = torch.randn(2, 512, 64)
    with torch.no_grad():
        torch.testing.assert_close(tiny_dit(x, sigmas[:, None], context), tiny_dit(x, sigmas, context))


def test_t5_attn_mask_option(tiny_dit):
    _, _, qwen, ids, t5_mask, qwen_mask = tiny_inputs()
    with torch.no_grad():
        masked = tiny_dit.adapt_context(qwen, ids, t5_mask, qwen_mask)
        unmasked = tiny_dit.adapt_context(qwen, ids, t5_mask, qwen_mask, apply_t5_attn_mask=False)
    assert (unmasked[:, 6:12].abs().sum(-1) > 0).all()  # padding rows are kept
    assert not torch.allclose(masked[:, :6], unmasked[:, :6])  # valid rows attended to the padding too


def test_bf16_forward_and_backward_stay_finite(tiny_model):
    dit = load_dit(tiny_model.dit, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in dit.parameters())
    x, sigmas, qwen, ids, t5_mask, qwen_mask = tiny_inputs()
    v = dit(x, sigmas, qwen.bfloat16(), target_input_ids=ids, target_attention_mask=t5_mask,
            source_attention_mask=qwen_mask)  # fmt: skip
    assert v.dtype == torch.bfloat16 and v.isfinite().all()
    v.float().square().mean().backward()
    assert all(p.grad.isfinite().all() for p in dit.parameters() if p.grad is not None)


def test_block_runner_is_replaceable_and_sees_tensor_args(tiny_dit):
    x, sigmas, *_ = tiny_inputs()
    context = torch.randn(2, 512, 64)
    with torch.no_grad():
        reference = tiny_dit(x, sigmas, context)
    seen = []

    def runner(index, block, hidden, *args):
        seen.append(index)
        assert all(a is None or isinstance(a, torch.Tensor) for a in args)
        return torch.utils.checkpoint.checkpoint(block, hidden, *args, use_reentrant=False)

    tiny_dit.set_block_runner(runner)
    try:
        with torch.no_grad():
            torch.testing.assert_close(tiny_dit(x, sigmas, context), reference)
    finally:
        tiny_dit.set_block_runner(None)
    assert seen == [0, 1, 2, 3]


def test_split_attention_matches_batched_attention(tiny_dit):
    x, sigmas, *_ = tiny_inputs()
    context = torch.randn(2, 512, 64)
    with torch.no_grad():
        reference = tiny_dit(x, sigmas, context)
        tiny_dit.set_attention_backend("sdpa", split=True)
        try:
            torch.testing.assert_close(tiny_dit(x, sigmas, context), reference)
        finally:
            tiny_dit.set_attention_backend("sdpa")


@pytest.mark.parametrize(("name", "pip_name"), [("flash", "flash-attn"), ("xformers", "xformers")])
def test_missing_attention_package_warns_and_falls_back(monkeypatch, caplog, name, pip_name):
    monkeypatch.setattr("anima_core.models.attention.package_available", lambda module: False)
    with caplog.at_level(logging.WARNING):
        backend = AttentionBackend.create(name, split=True)
    assert (backend.name, backend.split) == ("sdpa", True)
    assert f"{pip_name} is not installed" in caplog.text
    assert AttentionBackend.create("torch").name == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        AttentionBackend.create("sageattn")
