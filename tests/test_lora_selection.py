"""Which modules the LoRA network selects, with which rank, for the guide's and sd-scripts' network args."""

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3Config, Qwen3Model

from anima_core.errors import AnimaError
from anima_core.models.dit import AnimaDiT
from anima_core.models.tiny import TINY_DIT
from anima_plugins.lora import create_network
from anima_plugins.lora.args import NetworkArgsError, parse_block_indices, parse_network_args
from anima_plugins.lora.selection import EmptySelectionError

BLOCKS = TINY_DIT.num_blocks  # 4
ADAPTER_BLOCKS = TINY_DIT.llm_adapter.num_layers  # 2
ATTN = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "output_proj")]
MLP = ["mlp.layer1", "mlp.layer2"]
MOD = [f"adaln_modulation_{k}.{i}" for k in ("self_attn", "cross_attn", "mlp") for i in (1, 2)]
ADAPTER = [f"{a}.{p}_proj" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["mlp.0", "mlp.2"]
TE = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return AnimaDiT(TINY_DIT)


@pytest.fixture(scope="module")
def text_encoder():
    config = Qwen3Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128,
    )  # fmt: skip
    return SimpleNamespace(model=Qwen3Model(config))


def build(dit, args=None, *, dim=None, text_encoder=None):
    cfg = SimpleNamespace(dim=dim, alpha=None, dropout=None, args=args or {}, weights=None)
    return create_network(cfg, dit=dit, text_encoder=text_encoder, train_text_encoder=text_encoder is not None)


def ranks(network):
    return {t.path: t.rank for t in network.targets}


def per_block(suffixes, blocks=range(BLOCKS), rank=4):
    return {f"blocks.{i}.{s}": rank for i in blocks for s in suffixes}


def test_guide_default_is_16_modules_per_block_with_adaln(dit):
    net = build(dit)
    assert ranks(net) == per_block(ATTN + MLP + MOD)
    assert len(net.targets) == 16 * BLOCKS
    assert {t.name for t in net.targets} >= {"lora_unet_blocks_0_adaln_modulation_self_attn_1"}
    assert all(float(lora.alpha) == 1.0 for lora in net.loras.values())


def test_sd_scripts_default_is_10_modules_per_block(dit):
    net = build(dit, {"target_preset": "sd-scripts"})
    assert ranks(net) == per_block(ATTN + MLP)


def test_llm_adapter_blocks_join_with_train_llm_adapter(dit):
    net = build(dit, {"target_preset": "sd-scripts", "train_llm_adapter": "true"})
    adapter = {f"llm_adapter.blocks.{j}.{s}": 4 for j in range(ADAPTER_BLOCKS) for s in ADAPTER}
    assert ranks(net) == {**per_block(ATTN + MLP), **adapter}
    assert "llm_adapter.out_proj" not in ranks(net)


def test_component_dims_of_the_guide(dit):
    net = build(dit, {"self_attn_dim": "8", "cross_attn_dim": 0, "mlp_dim": 2, "mod_dim": "3"})
    expected = {}
    for i in range(BLOCKS):
        expected |= {f"blocks.{i}.self_attn.{p}": 8 for p in ("q_proj", "k_proj", "v_proj", "output_proj")}
        expected |= {f"blocks.{i}.{s}": 2 for s in MLP}
        expected |= {f"blocks.{i}.{s}": 3 for s in MOD}
    assert ranks(net) == expected


def test_llm_adapter_dim_and_emb_dims(dit):
    net = build(dit, {"train_llm_adapter": True, "llm_adapter_dim": 6, "emb_dims": "[8,0,2]", "mod_dim": 5}, dim=3)
    got = ranks(net)
    assert got["llm_adapter.blocks.1.mlp.0"] == 6
    assert got["x_embedder.proj.1"] == 8
    assert not any(p.startswith("t_embedder") for p in got)
    # final_layer.adaln_modulation follows the final_layer rank, not mod_dim
    assert {p: r for p, r in got.items() if p.startswith("final_layer")} == {
        "final_layer.linear": 2,
        "final_layer.adaln_modulation.1": 2,
        "final_layer.adaln_modulation.2": 2,
    }
    assert got["blocks.0.adaln_modulation_mlp.2"] == 5
    assert got["blocks.0.self_attn.q_proj"] == 3


def test_train_block_indices(dit):
    net = build(dit, {"train_block_indices": "0,2-3", "train_llm_adapter": "True"})
    blocks = {int(p.split(".")[1]) for p in ranks(net) if p.startswith("blocks.")}
    assert blocks == {0, 2, 3}
    # adapter blocks are not filtered by the DiT indices
    assert sum(p.startswith("llm_adapter.") for p in ranks(net)) == len(ADAPTER) * ADAPTER_BLOCKS
    only_emb = build(dit, {"train_block_indices": "none", "emb_dims": [0, 4, 0]})
    assert ranks(only_emb) == {"t_embedder.1.linear_1": 4, "t_embedder.1.linear_2": 4}
    with pytest.raises(NetworkArgsError, match="0-3"):
        build(dit, {"train_block_indices": "0-9"})


def test_block_index_syntax():
    assert parse_block_indices("all", 5) == {0, 1, 2, 3, 4}
    assert parse_block_indices(" none ", 5) == set()
    assert parse_block_indices("0-1, 4", 5) == {0, 1, 4}
    for bad in ("3-1", "x", "1-", "5"):
        with pytest.raises(NetworkArgsError):
            parse_block_indices(bad, 5)


def test_selecting_nothing_is_an_error(dit):
    with pytest.raises(EmptySelectionError):
        build(dit, {"train_block_indices": "none"})
    with pytest.raises(EmptySelectionError):
        build(dit, {"self_attn_dim": 0, "cross_attn_dim": 0, "mlp_dim": 0, "mod_dim": 0})
    assert issubclass(EmptySelectionError, AnimaError)


def test_sd_scripts_patterns_and_reg_dims(dit):
    with_mod = build(dit, {"target_preset": "sd-scripts", "mod_dim": 4})
    assert ranks(with_mod) == per_block(ATTN + MLP + MOD)
    included = build(dit, {"target_preset": "sd-scripts", "include_patterns": "['.*adaln_modulation_mlp.*']"})
    assert ranks(included) == per_block(ATTN + MLP + ["adaln_modulation_mlp.1", "adaln_modulation_mlp.2"])
    excluded = build(dit, {"exclude_patterns": [".*mlp.*"]})
    assert ranks(excluded) == per_block(ATTN + [m for m in MOD if "mlp" not in m])
    reg = build(dit, {"target_preset": "sd-scripts", "network_reg_dims": r".*self_attn.*=16,.*mlp.*=0"})
    assert ranks(reg) == {
        **per_block([a for a in ATTN if a.startswith("self")], rank=16),
        **per_block([a for a in ATTN if a.startswith("cross")]),
    }


def test_text_encoder_modules(dit, text_encoder):
    net = build(dit, {"target_preset": "sd-scripts"}, text_encoder=text_encoder)
    te = {t.path: t.rank for t in net.targets if t.part == "te"}
    assert te == {f"layers.{i}.{s}": 4 for i in range(2) for s in TE}
    assert net.trains_text_encoder
    assert "lora_te_layers_1_mlp_down_proj" in net.loras
    assert not build(dit).trains_text_encoder


def test_lora_modules_are_not_registered_in_the_models(dit, text_encoder):
    keys = set(dit.state_dict())
    te_keys = set(text_encoder.model.state_dict())
    net = build(dit, {"train_llm_adapter": True}, text_encoder=text_encoder)
    net.apply_to()
    try:
        assert set(dit.state_dict()) == keys
        assert set(text_encoder.model.state_dict()) == te_keys
    finally:
        net.remove()


def test_arg_errors():
    with pytest.raises(NetworkArgsError, match="self_atn_dim"):
        parse_network_args({"self_atn_dim": 4})
    with pytest.raises(NetworkArgsError, match="train_llm_adapter"):
        parse_network_args({"llm_adapter_dim": 4})
    with pytest.raises(NetworkArgsError, match="emb_dims"):
        parse_network_args({"emb_dims": "[1,2]"})
    with pytest.raises(NetworkArgsError, match="rank_dropout"):
        parse_network_args({"rank_dropout": "1.5"})
    with pytest.raises(NetworkArgsError, match="exclude_patterns"):
        parse_network_args({"exclude_patterns": "['(']"})
    with pytest.raises(NetworkArgsError, match="target_preset"):
        parse_network_args({"target_preset": "kohya"})


def test_arg_forms_of_both_generations():
    args = parse_network_args(
        {
            "verbose": "True",
            "train_llm_adapter": "TRUE",
            "loraplus_lr_ratio": "4",
            "network_reg_lrs": ".*llm_adapter.*=5e-5",
            "network_reg_dims": ["blocks\\.0\\..*=8"],
            "emb_dims": [1, 2, 3],
        }
    )
    assert args.verbose and args.train_llm_adapter
    assert args.loraplus_lr_ratio == 4.0
    assert args.reg_lrs == ((".*llm_adapter.*", 5e-5),)
    assert args.reg_dims == (("blocks\\.0\\..*", 8),)
    assert args.emb_dims == {"x_embedder": 1, "t_embedder": 2, "final_layer": 3}


def test_an_explicit_rank_of_one_lifts_the_preset_exclusion(dit):
    """Any explicit rank above 0 (1 included) brings back what the preset leaves out: mod_dim for the AdaLN linears
    under sd-scripts, an emb_dims entry for an embedder under the guide."""
    assert ranks(build(dit, {"target_preset": "sd-scripts", "mod_dim": 1})) == {
        **per_block(ATTN + MLP), **per_block(MOD, rank=1)}
    emb = ranks(build(dit, {"emb_dims": [1, 0, 0]}))
    assert {p: r for p, r in emb.items() if p.startswith("x_embedder")} == {"x_embedder.proj.1": 1}


def test_an_embedder_brought_in_by_include_patterns_gets_the_network_dim(dit):
    included = ranks(build(dit, {"target_preset": "sd-scripts", "include_patterns": ["x_embedder.*"]}, dim=8))
    assert included == {**per_block(ATTN + MLP, rank=8), "x_embedder.proj.1": 8}


def test_each_module_left_out_is_listed_with_its_reason(dit):
    """The verbose table's 'skipped' lines: part, module path and why, for each rule that leaves a module out."""
    net = build(dit, {"target_preset": "sd-scripts", "exclude_patterns": [r"blocks\.0\.mlp.*"],
                      "train_block_indices": "0-2", "network_reg_dims": r"blocks\.1\.cross_attn\..*=0"})
    why = {(s.part, s.path): s.reason for s in net.skipped}
    assert why[("dit", "blocks.0.adaln_modulation_mlp.1")] == "excluded by target_preset=sd-scripts"
    assert why[("dit", "blocks.0.mlp.layer1")] == "excluded by exclude_patterns"
    assert why[("dit", "blocks.3.self_attn.q_proj")] == "block not in train_block_indices"
    assert why[("dit", "blocks.1.cross_attn.k_proj")] == "rank 0"
    assert len(net.skipped) + len(net.targets) == sum(
        1 for p, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and dit_target(p))


def dit_target(path: str) -> bool:
    from anima_plugins.lora.names import DIT_TARGET_PATH

    return DIT_TARGET_PATH.fullmatch(path) is not None


def test_selecting_nothing_says_which_args_did_it(dit):
    with pytest.raises(EmptySelectionError) as err:
        build(dit, {"train_block_indices": "none"})
    assert ("the network args select no module at all, so the LoRA would be empty. target_preset=guide, "
            "train_block_indices='none', ranks=default, emb_dims=unset, exclude_patterns=[]") in str(err.value)
    with pytest.raises(EmptySelectionError) as err:
        build(dit, {"self_attn_dim": 0, "cross_attn_dim": 0, "mlp_dim": 0, "mod_dim": 0, "emb_dims": [0, 0, 0]})
    assert "ranks={'self_attn': 0, 'cross_attn': 0, 'mlp': 0, 'mod': 0}" in str(err.value)
    assert "emb_dims={'x_embedder': 0, 't_embedder': 0, 'final_layer': 0}" in str(err.value)
