"""The lycoris network plugin on the tiny model: LoKr, LoHa, LoCon, LoCon+DoRA and full train, save files ComfyUI
loads (checked by ComfyUI's key forms and reconstruction rule), continue from a file, resume bit for bit."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_resume import StopAtStep, assert_same_lora, losses
from test_tui_editor import checked, row
from textual.widgets import Input
from training_helpers import make_run, read_events, tiny_profile_data

from anima_core.config import profile_from_dict
from anima_core.errors import ProfileError
from anima_core.kohya import import_command_line
from anima_core.plugins import build_plugins
from anima_plugins.lora import apply_lora_files
from anima_plugins.lora.files import LoRAFileError
from anima_plugins.lora.keymap import comfy_key_map
from anima_plugins.lycoris.args import parse_lycoris_args
from anima_plugins.lycoris.formats import SUFFIXES, comfy_difference, comfy_weight, group_modules
from anima_plugins.lycoris.info import is_lycoris_file, lycoris_info
from anima_tui.app import AnimaApp

pytest.importorskip("lycoris", reason="lycoris-lora is in the test extra")

ALGORITHMS = {
    "lokr": {"algo": "lokr", "factor": 4},
    "loha": {"algo": "loha"},
    "locon": {"algo": "locon"},
    "locon+dora": {"algo": "locon", "dora_wd": True},
    "full": {"algo": "full"},
}
# Every suffix ComfyUI reads for each format (comfy/weight_adapter and comfy/lora.py), alpha and dora_scale included.
COMFY_SUFFIXES = {algo: {s[1:] for s in suffixes} | {"alpha", "dora_scale"} for algo, suffixes in SUFFIXES.items()}
EXPECTED_KEYS = {
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "locon": {"lora_up.weight", "lora_down.weight", "alpha"},
    "locon+dora": {"lora_up.weight", "lora_down.weight", "alpha", "dora_scale"},
    "full": {"diff"},  # the tiny model's Linears have no bias, so no diff_b
}


def lycoris_run(root, tiny_model, name, args, *, stop_at=None, resume=None, **tables):
    plugins = build_plugins(entry_points=False, extra=(StopAtStep(stop_at),) if stop_at else ())
    network = {"module": "lycoris", "args": args, **tables.pop("network", {})}
    trainer = make_run(root, tiny_model, images=3, plugins=plugins, resume=resume, network=network,
                       logging={"run_name": name}, training={"max_train_steps": 4, **tables.pop("training", {})},
                       saving={"output_dir": str(root / "out" / name)}, **tables)
    return trainer, trainer.run()


@pytest.fixture(scope="module", params=list(ALGORITHMS))
def trained(request, tmp_path_factory, tiny_model):
    """(algo name, root, trainer, result) of a 4-step run with module and rank dropout."""
    root = tmp_path_factory.mktemp(f"lycoris_{request.param.replace('+', '_')}")
    args = {**ALGORITHMS[request.param], "rank_dropout": 0.1, "module_dropout": 0.1}
    trainer, result = lycoris_run(root, tiny_model, "reference", args)
    return request.param, root, args, trainer, result


def test_run_trains_saves_and_self_checks_against_comfyui(trained):
    name, _, _, trainer, result = trained
    assert result.status == "finished" and result.lora_path.exists()
    messages = [e.get("message", "") for e in read_events(result.run_dir) if e["type"] in ("log", "warning")]
    assert any("LyCORIS self-check ok" in m for m in messages), messages[-5:]
    check = trainer.network.self_check(result.lora_path)
    assert check.ok, check.summary
    assert check.changed_modules == check.modules == len(trainer.network.targets) > 0
    assert check.worst_relative_error < 1e-3


def test_every_key_is_a_form_comfyui_maps(trained):
    name, _, _, trainer, result = trained
    tensors = load_file(result.lora_path)
    modules, stray = group_modules(tensors)
    assert stray == []
    key_map = comfy_key_map(trainer.dit, None)
    algo = "locon" if name.startswith("locon") else name
    for module in modules:
        assert module.algo == algo
        assert key_map[module.key][0] == "dit", module.key
        assert set(module.tensors) == EXPECTED_KEYS[name], module.key
        assert set(module.tensors) <= COMFY_SUFFIXES[algo]
    assert len(modules) == len(trainer.network.targets)


def test_metadata_names_the_lycoris_network_as_sd_scripts_writes_it(trained):
    name, _, args, _, result = trained
    with open(result.lora_path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
    assert header["ss_network_module"] == "lycoris.kohya"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "4.0")
    written = json.loads(header["ss_network_args"])
    assert written["algo"] == args["algo"] and all(isinstance(v, str) for v in written.values())
    if name == "locon+dora":
        assert written["dora_wd"] == "True"


def test_self_check_fails_when_comfyui_would_rebuild_another_weight(trained, tmp_path):
    _, _, _, trainer, result = trained
    tensors = load_file(result.lora_path)
    suffix = ".diff" if trained[0] == "full" else ".alpha"  # full has no alpha: double the difference itself
    doubled = next(k for k in tensors if k.endswith(suffix))
    tensors[doubled] = tensors[doubled] * 2
    save_file(tensors, tmp_path / "doubled.safetensors")
    check = trainer.network.self_check(tmp_path / "doubled.safetensors")
    assert not check.ok and check.mismatches and doubled[: -len(suffix)] in check.mismatches[0]
    tensors[doubled] = tensors[doubled] / 2
    tensors["lora_unet_blocks_0_not_a_layer.alpha"] = torch.tensor(1.0)
    save_file(tensors, tmp_path / "stray_key.safetensors")
    check = trainer.network.self_check(tmp_path / "stray_key.safetensors")
    assert not check.ok and "lora_unet_blocks_0_not_a_layer.alpha" in check.unmatched_keys


def test_comfyui_rule_for_dora_uses_the_input_column_norm(trained):
    """The DoRA file's weight, rebuilt by the rule, has dora_scale as its column norms (what DoRA trains)."""
    name, _, _, trainer, result = trained
    if name != "locon+dora":
        pytest.skip("DoRA only")
    modules, _ = group_modules(load_file(result.lora_path))
    key_map = comfy_key_map(trainer.dit, None)
    for module in modules[:4]:
        weight = trainer.dit.get_submodule(key_map[module.key][1]).weight
        rebuilt = comfy_weight(module, weight)
        assert module.tensors["dora_scale"].shape == (1, weight.shape[1])
        torch.testing.assert_close(rebuilt.norm(dim=0, keepdim=True), module.tensors["dora_scale"], rtol=1e-5, atol=1e-6)


def test_stopped_and_resumed_run_ends_with_the_same_file(trained, tiny_model):
    _, root, args, _, reference = trained
    _, first = lycoris_run(root, tiny_model, "first", args, stop_at=2)
    assert first.status == "stopped" and first.step == 2
    _, resumed = lycoris_run(root, tiny_model, "resumed", args, resume=str(first.run_dir))
    assert resumed.status == "finished" and resumed.step == 4
    assert losses(first) | losses(resumed) == losses(reference)
    assert_same_lora(resumed.lora_path, reference.lora_path)


def test_network_weights_continue_from_the_file(trained, tiny_model):
    name, root, args, trainer, result = trained
    cfg = profile_from_dict(tiny_profile_data(root, tiny_model, network={
        "module": "lycoris", "args": args, "weights": str(result.lora_path)})).network
    plugin = build_plugins(entry_points=False).registry("register_networks").get("lycoris")
    continued = plugin(cfg, dit=trainer.dit, text_encoder=None, train_text_encoder=False)
    saved = load_file(result.lora_path)
    for key, tensor in continued.file_tensors().items():
        assert torch.equal(tensor, saved[key]), key
    other = {**args, "algo": "loha" if name != "loha" else "lokr"}
    other.pop("dora_wd", None), other.pop("factor", None)
    wrong = cfg.model_copy(update={"args": other})
    with pytest.raises(LoRAFileError, match="trains algo="):
        plugin(wrong, dit=trainer.dit, text_encoder=None, train_text_encoder=False)


def test_lora_info_reads_the_format(trained):
    name, _, _, _, result = trained
    assert is_lycoris_file(result.lora_path) == (name != "locon")  # plain LoCon files are plain LoRA files
    text = lycoris_info(result.lora_path)
    assert "ComfyUI would load every key." in text and "lycoris.kohya" in text
    assert " NO" not in text


def test_text_encoder_modules_use_comfyui_names_and_self_check(tmp_path, tiny_model):
    trainer, result = lycoris_run(tmp_path, tiny_model, "te", {"algo": "loha"}, training={"max_train_steps": 2},
                                  network={"train_unet_only": False}, caching={"cache_text_encoder_outputs": False})
    keys = load_file(result.lora_path)
    assert any(k.startswith("text_encoders.qwen3_06b.transformer.model.layers.0.") for k in keys)
    check = trainer.network.self_check(result.lora_path)
    assert check.ok, check.summary


@pytest.mark.parametrize("algo", ["lokr", "locon"])
def test_bypass_mode_with_network_dropout_trains_and_self_checks(tmp_path, tiny_model, algo):
    trainer, result = lycoris_run(tmp_path, tiny_model, algo, {"algo": algo, "bypass_mode": True},
                                  network={"dropout": 0.2}, training={"max_train_steps": 2})
    assert all(m.bypass_mode for m in trainer.network.loras.values())
    check = trainer.network.self_check(result.lora_path)
    assert check.ok, check.summary
    with open(result.lora_path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
    assert header["ss_network_dropout"] == "0.2"


@pytest.mark.parametrize("algo", ["lokr", "loha", "locon"])
def test_scale_weight_norms_keeps_every_saved_difference_within_the_norm(tmp_path, tiny_model, algo):
    trainer, result = lycoris_run(tmp_path, tiny_model, algo, {"algo": algo}, training={"max_train_steps": 3},
                                  optimizer={"learning_rate": 1e-2, "scale_weight_norms": 0.05})
    modules, _ = group_modules(load_file(result.lora_path))
    norms = [comfy_difference(m).norm().item() for m in modules]
    assert max(norms) <= 0.05 * (1 + 1e-4) and sum(n > 0.049 for n in norms) > 0  # some were scaled back
    assert trainer.network.self_check(result.lora_path).ok


def test_loraplus_and_component_rates_group_the_parameters(trained, tiny_model):
    name, root, _, trainer, _ = trained
    if name != "locon":
        pytest.skip("LoRA+ applies to LoCon only (the other algorithms refuse it)")
    profile = profile_from_dict(tiny_profile_data(root, tiny_model, optimizer={"learning_rate": 1e-3, "mlp_lr": 0},
                                                  network={"module": "lycoris", "args": {"algo": "locon", "loraplus_lr_ratio": 4}}))
    plugin = build_plugins(entry_points=False).registry("register_networks").get("lycoris")
    network = plugin(profile.network, dit=trainer.dit, text_encoder=None, train_text_encoder=False)
    groups = {g["name"]: g for g in network.param_groups(profile.optimizer)}
    assert groups["self_attn lora_up (LoRA+ x4)"]["lr"] == pytest.approx(4e-3)
    assert groups["self_attn"]["lr"] == pytest.approx(1e-3)
    assert all(p.shape[1] == 4 for p in groups["self_attn lora_up (LoRA+ x4)"]["params"])  # (out, rank): up only
    assert not any(group.startswith("mlp") for group in groups)
    mlp = [network.loras[t.name] for t in network.targets if ".mlp." in t.path]
    assert mlp and not any(p.requires_grad for m in mlp for p in m.parameters())
    assert "frozen (lr 0)" in network.describe_groups()


def validate(tmp_path, tiny_model, optimizer=None, **network) -> list[str]:
    data = tiny_profile_data(tmp_path, tiny_model, network={"module": "lycoris", **network}, optimizer=optimizer or {})
    (tmp_path / "data").mkdir(exist_ok=True)
    try:
        profile_from_dict(data, plugins=build_plugins(entry_points=False))
    except ProfileError as err:
        return err.problems
    return []


def test_missing_package_is_a_validate_error_naming_the_extra(tmp_path, tiny_model, monkeypatch):
    assert validate(tmp_path, tiny_model, args={"algo": "lokr"}) == []
    monkeypatch.setitem(sys.modules, "lycoris", None)  # `import lycoris` now fails as if not installed
    problems = validate(tmp_path, tiny_model, args={"algo": "lokr"})
    assert len(problems) == 1 and problems[0].startswith("network.module:")
    assert "anima-train[lycoris]" in problems[0]


@pytest.mark.parametrize("network, expected", [
    ({"args": {"algo": "ia3"}}, "algo='ia3' is not supported"),
    ({"args": {"algo": "lokr", "conv_dim": 4}}, "no convolution for conv_dim"),
    ({"args": {"algo": "locon", "dora_wd": True, "wd_on_output": True}}, "untrained weight's norm"),
    ({"args": {"algo": "lokr", "loraplus_lr_ratio": 4}}, "algo=lokr has no such matrix"),
    ({"args": {"algo": "loha", "factor": 4}}, "factor do nothing for algo=loha"),
    ({"args": {"algo": "lokr", "factor": "x"}}, "factor='x'"),
    ({"args": {"algo": "lokr", "colour": 1}}, "unknown network arg(s) colour"),
    ({"args": {"algo": "lokr", "target_preset": "all"}}, "target_preset='all'"),
    ({"args": {"algo": "lokr"}, "dropout": 0.1}, "network.dropout: LyCORIS modules apply network_dropout only with"),
    ({"args": {"algo": "locon", "dora_wd": True, "bypass_mode": True}}, "skips the DoRA decomposition"),
    ({"args": {"algo": "full", "bypass_mode": True}}, "bypass_mode do nothing for algo=full"),
    ({"args": {"algo": "full"}, "optimizer": {"scale_weight_norms": 1.0}}, "no max-norm for algo=full"),
])
def test_args_lycoris_cannot_honour_are_validate_errors(tmp_path, tiny_model, network, expected):
    problems = validate(tmp_path, tiny_model, **network)
    assert len(problems) == 1 and expected in problems[0], problems


def test_import_kohya_maps_the_lycoris_network():
    result = import_command_line(
        'python anima_train_network.py --network_module=lycoris.kohya --network_dim 16 --network_alpha 8 '
        '--network_args "algo=lokr" "factor=8" "use_tucker=True" "preset=attn-mlp" --network_dropout 0.1')
    network = result.data["network"]
    assert network["module"] == "lycoris" and "dropout" not in network
    assert network["args"]["include_patterns"] == [".*"]
    assert {k: network["args"][k] for k in ("algo", "factor")} == {"algo": "lokr", "factor": 8}
    assert "use_tucker" not in network["args"] and "preset" not in network["args"]
    parsed = parse_lycoris_args(network["args"])
    assert (parsed.algo, parsed.factor, parsed.selection.include_patterns) == ("lokr", 8, (".*",))
    for text in ("use_tucker", "preset=attn-mlp", "--network_dropout"):
        assert any(text in w for w in result.warnings), text


def test_profile_editor_shows_the_algorithms_args_with_help(tmp_path):
    asyncio.run(_editor_arg_help(tmp_path))


async def _editor_arg_help(tmp_path):
    path = tmp_path / "lokr.toml"
    path.write_text('[network]\nmodule = "lycoris"\nargs = { algo = "lokr", factor = 8 }\n')
    app = AnimaApp(path)
    async with app.run_test(size=(120, 60)) as pilot:
        args_row = await row(pilot, "network", "args")
        await checked(pilot)  # the help comes with the editor's check, which runs in the background
        shown = args_row.query_one(".field-arg-help")
        assert shown.display and "factor: LoKr" in str(shown.content) and "dora_wd:" in str(shown.content)
        args_row.query_one(Input).value = '{ algo = "full" }'
        await checked(pilot)
        assert "factor:" not in str(shown.content) and "algo:" in str(shown.content)
        module_row = await row(pilot, "network", "module")
        module_row.query_one(Input).value = "lora_anima"
        await checked(pilot)
        assert not shown.display  # lora_anima documents its args in the field's own help


def test_sampling_merges_the_file_as_comfyui_and_removes_it_exactly(trained):
    name, _, _, trainer, result = trained
    dit = trainer.dit
    trainer.network.remove()  # the plain model, as `anima-train sample` loads it
    try:
        before = {k: v.clone() for k, v in dit.state_dict().items()}
        applied = apply_lora_files(dit, None, [(result.lora_path, 0.5)])
        assert len(applied.adapters) == len(trainer.network.targets)
        modules, _ = group_modules(load_file(result.lora_path))
        key_map = comfy_key_map(dit, None)
        for module in modules:
            path = key_map[module.key][1]
            original = before[path + ".weight"]
            expected = original + 0.5 * (comfy_weight(module, original) - original)
            layer, x = dit.get_submodule(path), torch.randn(3, original.shape[1])
            # plain LoCon files go through the LoRA forward patch, the others are merged: same output either way
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected, layer.bias), rtol=1e-5, atol=1e-6)
        applied.remove()
        after = dit.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    finally:
        trainer.network.apply_to()


# arg -> (algo, value in the profile, the LyCORIS module keyword it must become)
LIBRARY_KWARGS = {
    "factor": ("lokr", 2, {"factor": 2}),
    "decompose_both": ("lokr", True, {"decompose_both": True}),
    "full_matrix": ("lokr", True, {"full_matrix": True}),
    "unbalanced_factorization": ("lokr", True, {"unbalanced_factorization": True}),
    "use_scalar": ("locon", True, {"use_scalar": True}),
    "rs_lora": ("locon", True, {"rs_lora": True}),
    "rank_dropout_scale": ("locon", True, {"rank_dropout_scale": True}),
}


def module_signature(module) -> tuple:
    """What the args decide: the tensors' shapes, the scale, the trained scalar and the rank-dropout rescaling."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    scalar = getattr(module, "scalar", None)
    return (shapes, float(getattr(module, "scale", 0.0)), getattr(module, "rank_dropout_scale", None),
            None if scalar is None else (float(scalar.detach()), scalar.requires_grad))


def test_lycoris_args_change_the_modules(tiny_model):
    """Each LyCORIS arg reaches the library's module as the keyword LyCORIS itself takes: the network's module
    equals one the library builds with that keyword, and differs from the one it builds without."""
    from anima_core.config.schema import NetworkTable
    from anima_core.models import load_dit
    from anima_plugins.lycoris.network import create_network
    from anima_plugins.lycoris.package import module_classes

    dit = load_dit(tiny_model.dit, dtype=torch.float32)
    for arg, (algo, value, library_kwargs) in LIBRARY_KWARGS.items():
        network = create_network(NetworkTable(module="lycoris", dim=4, alpha=2.0, args={"algo": algo, arg: value}),
                                 dit=dit, text_encoder=None, train_text_encoder=False)
        target = network.targets[-1]
        built = network.loras[target.name]
        library = module_classes()[algo]
        reference = library(target.name, target.module, multiplier=1.0, lora_dim=target.rank, alpha=2.0, **library_kwargs)
        plain = library(target.name, target.module, multiplier=1.0, lora_dim=target.rank, alpha=2.0)
        assert module_signature(built) == module_signature(reference), arg
        assert module_signature(built) != module_signature(plain), f"{arg} changes nothing on {target.name}"
