"""Profile loading: every problem at once, suggestions, overrides, the CLI's validate and show-config."""

import tomllib
from pathlib import Path

import pytest

from anima_core.cli import main
from anima_core.config import load_profile, profile_from_dict, profile_to_toml
from anima_core.config.schema import Profile
from anima_core.errors import ProfileError


@pytest.fixture
def model_files(tmp_path):
    for name in ("dit.safetensors", "qwen3.safetensors", "vae.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "data").mkdir()
    return tmp_path


def minimal(tmp):
    return {
        "model": {"dit": str(tmp / "dit.safetensors"), "qwen3": str(tmp / "qwen3.safetensors"), "vae": str(tmp / "vae.safetensors")},
        "dataset": {"train_data_dir": str(tmp / "data")},
    }


def problems_of(data, **kw):
    with pytest.raises(ProfileError) as info:
        profile_from_dict(data, **kw)
    return info.value.problems


def test_every_field_has_a_default_and_help():
    for table_name, table in Profile.model_fields.items():
        assert table.description, table_name
        for key, field in table.annotation.model_fields.items():
            assert field.description, f"{table_name}.{key} has no help text"
            assert not field.is_required(), f"{table_name}.{key} has no default"


def test_minimal_profile_is_valid(model_files):
    profile = profile_from_dict(minimal(model_files))
    assert profile.training.discrete_flow_shift == 3.0  # the guide's default
    assert profile.network.module == "lora_anima"


def test_all_problems_reported_at_once_with_suggestions(model_files):
    data = minimal(model_files)
    data["training"] = {"lerning_rate": 1e-4, "loss_type": "huber", "huber_schedule": "snr", "seed": "abc"}
    data["optimizer"] = {"learning_rate": -1, "optimizer_type": "AdamWW"}
    data["netwrok"] = {}
    data["dataset"]["resolution"] = 500
    problems = problems_of(data)
    text = "\n".join(problems)
    assert "training.lerning_rate: unknown key; did you mean 'optimizer.learning_rate'?" in text
    assert "netwrok: unknown key; did you mean 'network'?" in text
    assert "optimizer.learning_rate" in text and "greater than or equal to 0" in text
    assert "training.seed" in text
    assert "training.huber_schedule" in text
    assert "dataset.resolution" in text and "multiples of 16" in text
    assert "optimizer.optimizer_type" in text and "'AdamW'" in text
    assert len(problems) >= 7


def test_missing_files_and_incompatible_options(tmp_path):
    data = {
        "model": {"dit": str(tmp_path / "nope.safetensors")},
        "caching": {"cache_text_encoder_outputs": True},
        "optimizer": {"fused_backward_pass": True},
        "memory": {"cpu_offload_checkpointing": True, "unsloth_offload_checkpointing": True},
    }
    text = "\n".join(problems_of(data))
    assert "model.dit" in text and "does not exist" in text
    assert "model.qwen3: required" in text
    assert "dataset: set dataset_config" in text
    assert "train_unet_only" in text
    assert "fused_backward_pass" in text and "Adafactor" in text
    assert "memory:" in text


def test_unknown_plugin_names_are_named(model_files):
    data = minimal(model_files)
    data["network"] = {"module": "networks.lora_anmia"}
    data["training"] = {"loss_weighting": "nope"}
    text = "\n".join(problems_of(data))
    assert "network.module" in text and "lora_anima" in text
    assert "training.loss_weighting" in text


def test_relative_paths_resolve_against_the_profile(model_files):
    path = model_files / "p.toml"
    path.write_text('[model]\ndit = "dit.safetensors"\nqwen3 = "qwen3.safetensors"\nvae = "vae.safetensors"\n[dataset]\ntrain_data_dir = "data"\n')
    profile = load_profile(path)
    assert profile.model.dit == (model_files / "dit.safetensors").resolve()


def test_set_overrides_and_show_config_round_trip(model_files, capsys):
    path = model_files / "p.toml"
    path.write_text(profile_to_toml(profile_from_dict(minimal(model_files))))
    assert main(["show-config", str(path), "--set", "training.seed=7", "--set", "saving.output_name=abc",
                 "--set", "network.args={train_llm_adapter = true}"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["training"]["seed"] == 7 and shown["saving"]["output_name"] == "abc"
    assert shown["network"]["args"] == {"train_llm_adapter": True}
    assert shown["optimizer"]["learning_rate"] == 1e-4  # defaults filled in


def test_validate_command_prints_problems_without_traceback(model_files, capsys):
    path = model_files / "bad.toml"
    path.write_text("[training]\nmax_train_step = 10\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'training.max_train_steps'" in err
    assert "Traceback" not in err
    assert main(["validate", str(model_files / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "profiles").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_profiles_match_the_schema(path):
    data = tomllib.loads(path.read_text())
    Profile.model_validate(data)  # file paths are placeholders; every key and value must still be valid
