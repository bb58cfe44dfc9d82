"""The rough edges a new user meets in the first hour: each command says plainly what it did and where."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import tomli_w
from PIL import Image
from safetensors import safe_open
from training_helpers import make_run, tiny_profile_data, write_images

from anima_core.cli import build_parser, main
from anima_core.config.load import _resolve_paths
from anima_core.config.schema import Profile

FAST = "--w 64 --h 64 --s 1"


def test_import_kohya_paths_mean_what_the_command_meant_wherever_the_profile_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("cmd.txt").write_text('python anima_train_network.py --dit_path="models/dit.safetensors" '
                               '--dataset_config="my_dataset.toml" --output_dir="out" --vae_path="/abs/vae.safetensors"')
    assert main(["import-kohya", "cmd.txt", "-o", "profiles/x.toml"]) == 0
    written = Path("profiles/x.toml").read_text()
    data = tomllib.loads(written)
    assert data["dataset"]["dataset_config"] == "../my_dataset.toml" and data["model"]["dit"] == "../models/dit.safetensors"
    assert data["model"]["vae"] == "/abs/vae.safetensors"
    notes = re.sub(r"\n#\s*", " ", written)  # the header's wrapped comment lines, joined
    assert "were relative to the folder the command ran in" in notes and "relative to this profile's folder" in notes
    # Read as a profile is read (against its own folder), it names the files the command named.
    profile = Profile.model_validate(data)
    _resolve_paths(profile, (tmp_path / "profiles").resolve())
    assert profile.dataset.dataset_config == (tmp_path / "my_dataset.toml").resolve()
    assert profile.saving.output_dir == (tmp_path / "out").resolve()
    capsys.readouterr()
    assert main(["import-kohya", "cmd.txt"]) == 0  # printed: it may be saved anywhere, so absolute
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["dataset"]["dataset_config"] == str((tmp_path / "my_dataset.toml").resolve())


def test_ctl_on_a_folder_that_is_not_a_run_says_so(tmp_path, capsys):
    assert main(["ctl", str(tmp_path), "stop"]) == 1
    err = capsys.readouterr().err
    assert "is not a run directory" in err and "died" not in err
    assert not (tmp_path / "control").exists()


def test_make_tiny_model_prints_every_path_it_writes(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split(":", 1)[0] for line in lines]
    assert labels == ["DiT", "Qwen3", "VAE", "Qwen3 tokenizer", "T5 tokenizer"]
    assert all(Path(line.split(":", 1)[1].strip()).exists() for line in lines)


def test_sample_writes_the_file_it_is_given(tiny_model, tmp_path, capsys):
    base = ["sample", "--dit", str(tiny_model.dit), "--qwen3", str(tiny_model.qwen3), "--vae", str(tiny_model.vae),
            "--device", "cpu"]
    assert main([*base, "--prompt", f"a cat {FAST} --d 3", "-o", str(tmp_path / "cat.png")]) == 0
    assert Image.open(tmp_path / "cat.png").size == (64, 64)
    assert main([*base, "--prompt", f"a cat {FAST} --d 3", "--prompt", f"a dog {FAST} --d 4",
                 "-o", str(tmp_path / "many")]) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["sample_00_3.png", "sample_01_4.png"]
    sample_parser = build_parser()._subparsers._group_actions[0].choices["sample"]
    undocumented = [a.dest for a in sample_parser._actions if not a.help]
    assert undocumented == []


def test_show_config_lists_every_key_and_marks_overridden_ones(tmp_path, tiny_model, capsys):
    write_images(tmp_path / "data")
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
    data = tiny_profile_data(tmp_path, tiny_model, training={"max_train_epochs": 3})
    data["dataset"] = {"dataset_config": str(config)}
    data["network"].pop("alpha")
    (tmp_path / "p.toml").write_text(tomli_w.dumps(data))
    assert main(["show-config", str(tmp_path / "p.toml")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("# alpha = (not set)") for line in lines)
    assert any(line.startswith("max_train_steps = 6 ") and "overridden by training.max_train_epochs" in line
               for line in lines)
    assert any(line.startswith("train_batch_size =") and "dataset config's batch_size" in line for line in lines)
    assert not any(line.startswith("min_bucket_reso") and "overridden" in line for line in lines)
    shown = tomllib.loads(out)  # still a profile
    assert shown["training"]["max_train_epochs"] == 3


def test_extending_a_finished_run_keeps_its_final_lora_as_its_step_file(tmp_path, tiny_model):
    first = make_run(tmp_path, tiny_model, training={"max_train_steps": 2}, logging={"run_name": "a"}).run()
    assert first.status == "finished"
    final = first.lora_path
    with safe_open(str(final), framework="pt") as f:
        first_tensors = {k: f.get_tensor(k) for k in f.keys()}
    second = make_run(tmp_path, tiny_model, resume=str(first.run_dir), training={"max_train_steps": 3},
                      logging={"run_name": "b"}).run()
    assert second.status == "finished" and second.lora_path == final
    kept = final.with_name("lora-step00000002.safetensors")
    with safe_open(str(kept), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "2"
        assert all((f.get_tensor(k) == v).all() for k, v in first_tensors.items())
    with safe_open(str(final), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "3"


def test_demo_talks_from_the_start_and_names_its_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    folder = tmp_path / "anima-demo"
    assert lines[0].startswith("anima-train demo:") and str(folder) in lines[0] and "the default" in lines[0]
    assert f"building the tiny random model in {folder / 'tiny-model'}" in err
    lora = next(line for line in lines if line.startswith("LoRA:")).split(":", 1)[1].strip()
    assert Path(lora).is_file() and Path(lora).is_relative_to(folder)  # whole on one line although piped


def test_plan_uses_the_named_files_and_the_dataset_configs_resolution_and_batch(tmp_path, tiny_model, capsys):
    from safetensors.torch import load_file

    from anima_core.config import load_profile
    from anima_core.training.planner import dit_config_from_file, plan

    write_images(tmp_path / "data")
    config = tmp_path / "dataset.toml"
    config.write_text(f'[[datasets]]\nresolution = 128\nbatch_size = 3\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
    data = tiny_profile_data(tmp_path, tiny_model, caching={"cache_latents": True, "cache_text_encoder_outputs": True})
    data["dataset"] = {"dataset_config": str(config), "resolution": 64, "train_batch_size": 1}
    (tmp_path / "p.toml").write_text(tomli_w.dumps(data))
    profile = load_profile(tmp_path / "p.toml")
    result = plan(profile, dit_config_from_file(profile.model.dit))
    assert "128×128 × batch 3" in result.summary
    vae_params = sum(t.numel() for t in load_file(tiny_model.vae).values())
    qwen_params = sum(t.numel() for t in load_file(tiny_model.qwen3 / "model.safetensors").values())
    phases = {p.name: p.parts for p in result.phases}
    assert phases["caching latents"]["VAE weights"] == vae_params * 4  # float32 VAE, the file's size
    assert phases["caching text"]["Qwen3 weights"] == qwen_params * 2
    assert main(["plan", str(tmp_path / "p.toml")]) == 0
    assert "dataset config's largest dataset" in capsys.readouterr().out
