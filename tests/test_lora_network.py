"""The LoRA network in use: forward, dropouts, learning-rate groups, files, ComfyUI key map, applying files."""

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3Model

from anima_core.errors import AnimaError
from anima_core.models.dit import AnimaDiT
from anima_core.models.tiny import TINY_DIT
import anima_plugins.lora as lora_plugin
from anima_plugins.lora import apply_lora_files, create_network, lora_info, self_check
from anima_plugins.lora.files import LoRAFileError, addnet_hashes
from anima_plugins.lora.keymap import comfy_key_map, structural_address
from anima_plugins.lora.module import LoRAModule


def tiny_dit():
    torch.manual_seed(0)
    return AnimaDiT(TINY_DIT).eval()


def tiny_text_encoder():
    torch.manual_seed(1)
    config = Qwen3Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128,
    )  # fmt: skip
    return SimpleNamespace(model=Qwen3Model(config).eval())


def net_cfg(args=None, **over):
    return SimpleNamespace(**{"dim": 4, "alpha": 2.0, "dropout": None, "args": args or {}, "weights": None, **over})


def opt_cfg(**over):
    names = ("unet_lr", "text_encoder_lr", "self_attn_lr", "cross_attn_lr", "mlp_lr", "mod_lr", "llm_adapter_lr")
    return SimpleNamespace(**{"learning_rate": 1e-4, **{n: None for n in names}, **over})


def dit_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([0.6]), torch.randn(1, 8, 64, generator=g)


def te_inputs():
    return torch.arange(6)[None] % 128


def train_a_little(network):
    """Stand-in for training: random lora_up weights, so the LoRA changes the model."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.copy_(0.05 * torch.randn(lora.lora_up.weight.shape, generator=g))


def outputs(dit, te):
    with torch.no_grad():
        return dit(*dit_inputs()), te.model(input_ids=te_inputs()).last_hidden_state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A network over DiT, adapter and Qwen3, 'trained', saved; with the outputs it produces."""
    dit, te = tiny_dit(), tiny_text_encoder()
    args = {"train_llm_adapter": "true", "emb_dims": "[4,4,4]"}
    network = create_network(net_cfg(args), dit=dit, text_encoder=te, train_text_encoder=True)
    network.apply_to()
    train_a_little(network)
    network.eval()
    path = tmp_path_factory.mktemp("lora") / "trained.safetensors"
    network.save(path, metadata={"ss_output_name": "trained", "modelspec.title": "t"}, dtype=torch.float32)
    return SimpleNamespace(network=network, dit=dit, te=te, path=path, outputs=outputs(dit, te), args=args)


def test_plugin_registers_under_both_names():
    registered = []
    lora_plugin.register_networks(register=lambda name, obj, aliases=(): registered.append((name, obj, list(aliases))))
    assert registered == [("lora_anima", create_network, ["networks.lora_anima"])]


def test_forward_is_base_at_init_and_follows_the_multiplier():
    dit, te = tiny_dit(), tiny_text_encoder()
    base = outputs(dit, te)
    network = create_network(net_cfg(), dit=dit, text_encoder=te, train_text_encoder=True)
    network.apply_to()
    network.eval()
    assert all(torch.equal(a, b) for a, b in zip(outputs(dit, te), base))  # lora_up starts at zero
    train_a_little(network)
    changed = outputs(dit, te)
    assert not torch.allclose(changed[0], base[0]) and not torch.allclose(changed[1], base[1])
    network.set_multiplier(0.0)
    assert all(torch.equal(a, b) for a, b in zip(outputs(dit, te), base))
    network.set_multiplier(1.0)
    network.remove()
    assert all(torch.equal(a, b) for a, b in zip(outputs(dit, te), base))


def test_lora_module_formula_and_rank_dropout_on_5d_input():
    linear = torch.nn.Linear(8, 6)
    lora = LoRAModule("x", linear, rank=2, alpha=1.0, multiplier=0.5, rank_dropout=0.5)
    torch.nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(3, 2, 2, 2, 8)  # [B, T, H, W, D] like the DiT MLP input
    lora.eval()
    expected = torch.nn.functional.linear(x, linear.weight, linear.bias) + 0.5 * 0.5 * (
        x @ lora.lora_down.weight.T @ lora.lora_up.weight.T
    )
    assert torch.allclose(linear(x), expected, atol=1e-6)
    lora.train()
    torch.manual_seed(0)
    out = linear(x)
    assert out.shape == (3, 2, 2, 2, 6)
    # the mask is per sample and rank: within a sample every token sees the same ranks
    delta = (out - torch.nn.functional.linear(x, linear.weight, linear.bias)) / (0.5 * 0.5 * 2)
    hidden = x @ lora.lora_down.weight.T
    for b in range(3):
        kept = [torch.allclose(delta[b], hidden[b] * keep @ lora.lora_up.weight.T, atol=1e-5) for keep in
                (torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))]  # fmt: skip
        assert any(kept)


def test_adapters_are_made_on_the_targets_device_and_keep_their_dropouts_there():
    """A model already on its device (the meta device stands in for a GPU here) gets its adapters there, and the
    rank-dropout mask is drawn there too."""
    linear = torch.nn.Linear(8, 6, device="meta")
    lora = LoRAModule("x", linear, rank=2, alpha=1.0, rank_dropout=0.5)
    assert (lora.lora_down.weight.device.type, lora.lora_up.weight.device.type) == ("meta", "meta")
    lora.apply_to()
    lora.train()
    assert linear(torch.randn(3, 8, device="meta")).device.type == "meta"


def test_init_is_sd_scripts_kaiming_uniform_down_and_zero_up():
    """lora_down starts as kaiming_uniform_(a=sqrt(5)): uniform in ±1/sqrt(in_features); lora_up at zero."""
    lora = LoRAModule("x", torch.nn.Linear(256, 4), rank=64, alpha=1.0)
    bound, w = 1 / 256**0.5, lora.lora_down.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert float(w.abs().mean()) == pytest.approx(bound / 2, rel=0.03)  # the mean |U(-b, b)| is b / 2
    assert not lora.lora_up.weight.any()


def test_remove_restores_the_forward_that_was_there_and_apply_works_again():
    linear = torch.nn.Linear(8, 6)
    lora = LoRAModule("x", linear, rank=2, alpha=2.0)
    torch.nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(3, 8)
    base = linear(x)
    lora.apply_to()
    lora.remove()
    assert "forward" not in linear.__dict__ and torch.equal(linear(x), base)
    lora.apply_to()  # a second apply after remove patches again
    assert not torch.allclose(linear(x), base)
    lora.remove()
    own = lambda t: torch.nn.functional.linear(t, linear.weight, linear.bias) * 2  # noqa: E731 - a patched forward
    linear.forward = own
    lora.apply_to()
    lora.remove()
    assert linear.__dict__["forward"] is own


def test_removing_an_adapter_under_another_names_it():
    linear = torch.nn.Linear(8, 6)
    first, second = LoRAModule("first", linear, rank=2, alpha=1.0), LoRAModule("second", linear, rank=2, alpha=1.0)
    first.apply_to()
    second.apply_to()
    with pytest.raises(RuntimeError, match="LoRA first: another adapter"):
        first.remove()


def test_multiplier_zero_in_training_still_backpropagates_zero_gradients():
    """As sd-scripts: a batch at network_multiplier 0 runs the branch, so backward gives zero gradients."""
    linear = torch.nn.Linear(8, 6)
    linear.requires_grad_(False)
    lora = LoRAModule("x", linear, rank=2, alpha=1.0, multiplier=0.0)
    lora.apply_to()
    lora.train()
    out = linear(torch.randn(3, 8))
    assert out.requires_grad
    out.sum().backward()
    assert lora.lora_up.weight.grad is not None and not lora.lora_up.weight.grad.any()


def test_a_bf16_layer_with_a_float32_lora_gives_bf16_outputs():
    """The LoRA runs in its own dtype (float32 here) on a bf16 model and hands the model its dtype back."""
    linear = torch.nn.Linear(8, 6).to(torch.bfloat16)
    lora = LoRAModule("x", linear, rank=2, alpha=1.0)
    torch.nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = linear(x)
    expected = torch.nn.functional.linear(x, linear.weight, linear.bias).float() + 0.5 * lora.lora_up(lora.lora_down(x.float()))
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, atol=0.05)


def test_dropouts_in_training_mode_run_through_the_dit():
    dit = tiny_dit()
    args = {"rank_dropout": "0.5", "module_dropout": 0.2, "target_preset": "sd-scripts"}
    network = create_network(net_cfg(args, dropout=0.1), dit=dit, text_encoder=None, train_text_encoder=False)
    network.apply_to()
    train_a_little(network)
    network.train()
    out = dit(*dit_inputs())
    out.square().mean().backward()
    assert out.shape == (1, 16, 1, 4, 4)
    assert any(p.grad is not None for p in network.trainable_parameters())


def test_saved_file_names_metadata_and_hashes(trained):
    with safe_open(str(trained.path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert "lora_unet_blocks_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_blocks_3_adaln_modulation_mlp_2.alpha" in keys
    assert "lora_unet_llm_adapter_blocks_1_mlp_0.lora_up.weight" in keys
    assert "lora_unet_t_embedder_1_linear_1.lora_up.weight" in keys
    assert "text_encoders.qwen3_06b.transformer.model.layers.1.mlp.gate_proj.lora_down.weight" in keys
    assert not any(k.startswith("lora_te") for k in keys)
    assert len(keys) == 3 * len(trained.network.targets)
    assert metadata["ss_network_module"] == "networks.lora_anima"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert '"train_llm_adapter": "true"' in metadata["ss_network_args"]
    assert metadata["modelspec.title"] == "t" and metadata["ss_output_name"] == "trained"
    expected = addnet_hashes(tensors, {k: v for k, v in metadata.items() if not k.startswith("sshs_")})
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == expected
    assert not list(trained.path.parent.glob("*.tmp"))


def test_every_saved_key_maps_by_comfyui_rule(trained):
    key_map = comfy_key_map(trained.dit, trained.te.model)
    with safe_open(str(trained.path), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:
        module_key = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        part, path = key_map[module_key]
        root = trained.dit if part == "dit" else trained.te.model
        assert isinstance(root.get_submodule(path), torch.nn.Linear)
        if part == "dit":  # lora-info without a model must reach the same conclusion
            assert structural_address(module_key) == (part, path)


def test_file_reloads_and_reproduces_the_trained_output(trained):
    dit, te = tiny_dit(), tiny_text_encoder()
    base = outputs(dit, te)
    applied = apply_lora_files(dit, te, [(trained.path, 1.0)])
    reloaded = outputs(dit, te)
    for got, want in zip(reloaded, trained.outputs):
        assert torch.allclose(got, want, atol=1e-5)
    applied.remove()
    assert all(torch.equal(a, b) for a, b in zip(outputs(dit, te), base))
    half = apply_lora_files(dit, te, [(trained.path, 0.5)])
    assert not torch.allclose(outputs(dit, te)[0], trained.outputs[0], atol=1e-5)
    half.remove()

    # network_weights: continue training from the file
    continued = create_network(
        net_cfg(trained.args, weights=str(trained.path)), dit=dit, text_encoder=te, train_text_encoder=True
    )
    continued.apply_to()
    continued.eval()
    for got, want in zip(outputs(dit, te), trained.outputs):
        assert torch.allclose(got, want, atol=1e-5)
    continued.remove()


def test_load_weights_is_strict(trained):
    dit, te = tiny_dit(), tiny_text_encoder()
    with pytest.raises(LoRAFileError, match="fit no selected module") as err:
        create_network(net_cfg(weights=str(trained.path)), dit=dit, text_encoder=None, train_text_encoder=False)
    assert "llm_adapter" in str(err.value) or "text_encoders" in str(err.value)
    with pytest.raises(LoRAFileError, match="rank"):
        create_network(
            net_cfg(trained.args, dim=8, weights=str(trained.path)), dit=dit, text_encoder=te, train_text_encoder=True
        )


def test_state_dict_round_trip(trained):
    dit, te = tiny_dit(), tiny_text_encoder()
    other = create_network(net_cfg(trained.args), dit=dit, text_encoder=te, train_text_encoder=True)
    other.load_state_dict(copy.deepcopy(trained.network.state_dict()))
    other.apply_to()
    other.eval()
    for got, want in zip(outputs(dit, te), trained.outputs):
        assert torch.allclose(got, want, atol=1e-6)
    other.remove()


def test_merge_matches_the_patched_forward(trained):
    dit = tiny_dit()
    base = dit.state_dict()
    network = create_network(net_cfg(), dit=dit, text_encoder=None, train_text_encoder=False)
    network.apply_to()
    train_a_little(network)
    network.eval()
    with torch.no_grad():
        patched = dit(*dit_inputs())
        network.merge_into()
        merged = dit(*dit_inputs())
        merged_weight = dit.state_dict()["blocks.0.mlp.layer1.weight"].clone()
        network.unmerge()
        restored = dit(*dit_inputs())
        network.remove()
    assert torch.allclose(merged, patched, atol=1e-5)
    assert not torch.allclose(merged_weight, base["blocks.0.mlp.layer1.weight"])
    assert all(torch.allclose(dit.state_dict()[k], v, atol=1e-6) for k, v in base.items())
    assert torch.allclose(restored, patched, atol=1e-5)


def test_component_learning_rates_loraplus_and_freezing(trained):
    dit, te = tiny_dit(), tiny_text_encoder()
    args = {"train_llm_adapter": True, "emb_dims": [4, 0, 0], "loraplus_unet_lr_ratio": 4, "loraplus_text_encoder_lr_ratio": 2}
    network = create_network(net_cfg(args), dit=dit, text_encoder=te, train_text_encoder=True)
    cfg = opt_cfg(unet_lr=3e-4, text_encoder_lr=5e-5, self_attn_lr=2e-4, mlp_lr=0, mod_lr=1e-5, llm_adapter_lr=7e-5)
    groups = network.param_groups(cfg)
    by_name = {g["name"]: g for g in groups}
    assert {n: g["lr"] for n, g in by_name.items()} == pytest.approx(
        {
            "self_attn": 2e-4, "self_attn lora_up (LoRA+ x4)": 8e-4,
            "cross_attn": 3e-4, "cross_attn lora_up (LoRA+ x4)": 12e-4,
            "mod": 1e-5, "mod lora_up (LoRA+ x4)": 4e-5,
            "llm_adapter": 7e-5, "llm_adapter lora_up (LoRA+ x4)": 28e-5,
            "unet": 3e-4, "unet lora_up (LoRA+ x4)": 12e-4,
            "text_encoder": 5e-5, "text_encoder lora_up (LoRA+ x2)": 1e-4,
        }
    )  # fmt: skip
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    loras = network.loras
    assert id(loras["lora_unet_x_embedder_proj_1"].lora_down.weight) in ids["unet"]
    assert id(loras["lora_unet_blocks_2_adaln_modulation_self_attn_1"].lora_down.weight) in ids["mod"]
    assert id(loras["lora_unet_blocks_2_self_attn_v_proj"].lora_up.weight) in ids["self_attn lora_up (LoRA+ x4)"]
    assert id(loras["lora_unet_llm_adapter_blocks_0_self_attn_q_proj"].lora_down.weight) in ids["llm_adapter"]
    assert id(loras["lora_te_layers_0_self_attn_q_proj"].lora_up.weight) in ids["text_encoder lora_up (LoRA+ x2)"]
    mlp = loras["lora_unet_blocks_1_mlp_layer1"]
    assert not mlp.lora_down.weight.requires_grad
    all_ids = set().union(*ids.values())
    assert id(mlp.lora_down.weight) not in all_ids and id(mlp.lora_up.weight) not in all_ids
    assert id(mlp.lora_down.weight) not in {id(p) for p in network.trainable_parameters()}
    # the adapter's mlp belongs to the llm_adapter group, not to the frozen mlp
    assert id(loras["lora_unet_llm_adapter_blocks_0_mlp_0"].lora_down.weight) in ids["llm_adapter"]
    text = network.describe_groups()
    assert "self_attn lora_up (LoRA+ x4)" in text and "frozen (lr 0)" in text


def test_reg_lrs_override_and_verbose_table():
    dit = tiny_dit()
    args = {"train_llm_adapter": "true", "network_reg_lrs": ".*llm_adapter.*=5e-5,blocks\\.0\\..*=0", "verbose": "true"}
    network = create_network(net_cfg(args), dit=dit, text_encoder=None, train_text_encoder=False)
    groups = {g["name"]: g for g in network.param_groups(opt_cfg(llm_adapter_lr=1.0))}
    assert groups["network_reg_lrs[0] .*llm_adapter.*"]["lr"] == 5e-5
    assert "llm_adapter" not in groups
    assert not network.loras["lora_unet_blocks_0_mlp_layer2"].lora_up.weight.requires_grad
    assert network.loras["lora_unet_blocks_1_mlp_layer2"].lora_up.weight.requires_grad
    text = network.describe_groups()
    assert "lora_unet_blocks_3_adaln_modulation_mlp_2" in text and "rank" in text
    plain = create_network(net_cfg(), dit=dit, text_encoder=None, train_text_encoder=False)
    with pytest.raises(AnimaError, match="learning rate of 0"):
        plain.param_groups(opt_cfg(unet_lr=0.0))


def test_self_check_and_lora_info(trained, tmp_path):
    probe_input = dit_inputs()
    own = trained.network.self_check(trained.path)
    assert own.ok and f"{own.modules} modules" in own.summary
    dit, te = tiny_dit(), tiny_text_encoder()
    result = self_check(trained.path, dit, te, probe=lambda: dit(*probe_input))
    assert result.ok and result.output_changed and result.changed_modules == result.modules
    assert result.as_event()["ok"] is True

    # an sd-scripts style text-encoder name: ComfyUI would not load it
    with safe_open(str(trained.path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prefix = "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.q_proj"
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        tensors["lora_te_layers_0_self_attn_q_proj" + suffix] = tensors.pop(prefix + suffix)
    kohya_te = tmp_path / "kohya_te.safetensors"
    save_file(tensors, str(kohya_te))
    bad = self_check(kohya_te, dit, te)
    assert not bad.ok and "lora_te_layers_0_self_attn_q_proj.lora_up.weight" in bad.unmatched_keys
    applied = apply_lora_files(dit, te, [(kohya_te, 1.0)])  # our own loader still accepts sd-scripts names
    applied.remove()

    info = lora_info(trained.path)
    assert "lora_unet_blocks_0_self_attn_q_proj" in info and "ComfyUI would load every key." in info
    assert "ss_network_module = networks.lora_anima" in info
    row = next(line for line in info.splitlines() if line.startswith("lora_unet_blocks_0_mlp_layer1 "))
    assert row.split()[1:4] == ["4", "2", "256x64"] and row.split()[-1] == "yes"
    info_bad = lora_info(kohya_te)
    assert "ComfyUI would NOT load 3 key(s)" in info_bad and "lora_te_*" in info_bad


def test_apply_lora_files_accepts_comfyui_generic_names_without_alpha(trained, tmp_path):
    dit = tiny_dit()
    base = dit(*dit_inputs()).detach()
    g = torch.Generator().manual_seed(5)
    tensors = {
        "diffusion_model.blocks.1.cross_attn.q_proj.lora_A.weight": torch.randn(2, 64, generator=g),
        "diffusion_model.blocks.1.cross_attn.q_proj.lora_B.weight": torch.randn(64, 2, generator=g),
    }
    path = tmp_path / "peft.safetensors"
    save_file(tensors, str(path))
    applied = apply_lora_files(dit, None, [(path, 1.0)])
    layer = dit.get_submodule("blocks.1.cross_attn.q_proj")
    x = torch.randn(3, 64)
    delta = layer(x) - torch.nn.functional.linear(x, layer.weight)
    # no alpha: factor 1.0 (ComfyUI's rule)
    want = x @ tensors["diffusion_model.blocks.1.cross_attn.q_proj.lora_A.weight"].T
    want = want @ tensors["diffusion_model.blocks.1.cross_attn.q_proj.lora_B.weight"].T
    assert torch.allclose(delta, want, atol=1e-4)
    assert not torch.allclose(dit(*dit_inputs()), base)
    applied.remove()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"diffusion_model.blocks.9.mlp.layer1.lora_A.weight": torch.zeros(2, 64),
               "diffusion_model.blocks.9.mlp.layer1.lora_B.weight": torch.zeros(256, 2)}, str(wrong))  # fmt: skip
    with pytest.raises(LoRAFileError, match="blocks.9.mlp.layer1"):
        apply_lora_files(dit, None, [(wrong, 1.0)])


def test_self_check_tolerates_frozen_modules_but_not_an_inert_file(tmp_path):
    dit = tiny_dit()
    network = create_network(net_cfg({"target_preset": "sd-scripts"}), dit=dit, text_encoder=None, train_text_encoder=False)
    network.apply_to()
    untouched = tmp_path / "untrained.safetensors"
    network.save(untouched, metadata={})
    inert = self_check(untouched, dit, None)
    assert not inert.ok and inert.changed_modules == 0

    network.param_groups(opt_cfg(mlp_lr=0))
    with torch.no_grad():
        for param in network.trainable_parameters():
            if param.shape[1] == 4:  # lora_up
                param.normal_()
    path = tmp_path / "frozen_mlp.safetensors"
    network.save(path, metadata={}, dtype="bf16")
    result = self_check(path, dit, None)
    assert result.ok and result.changed_modules == result.modules - 2 * TINY_DIT.num_blocks
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("lora_unet_blocks_0_mlp_layer1.alpha").dtype == torch.bfloat16
    network.remove()
