"""`anima-train validate`: every problem a run would hit, found without training and reported at once."""

from __future__ import annotations

import tomli_w
from PIL import Image
from safetensors.torch import load_file, save_file
from training_helpers import tiny_profile_data, write_images

from anima_core.cli import main


def _write_profile(path, data) -> str:
    path.write_text(tomli_w.dumps(data))
    return str(path)


def _problems(err: str) -> list[str]:
    return [line.strip()[2:] for line in err.splitlines() if line.strip().startswith("- ")]


def test_model_files_tokenizers_device_and_dataset_values_are_reported_together(tmp_path, tiny_model, capsys):
    write_images(tmp_path / "data")
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    data = tiny_profile_data(tmp_path, tiny_model)
    data["model"].update(dit=str(tiny_model.vae), vae=str(tiny_model.dit), t5_tokenizer=str(empty))
    data["dataset"]["resolution"] = -64
    data["optimizer"]["optimizer_type"] = "AdamW8bit"
    data["model"]["compile_block"] = False  # a misspelt key does not stop the checks of the files
    assert main(["validate", _write_profile(tmp_path / "p.toml", data)]) == 2
    problems = _problems(capsys.readouterr().err)
    assert len(problems) == 6, problems
    assert any(p.startswith("model.compile_block: unknown key") for p in problems)
    dit, vae, tokenizer, optimizer, resolution = (
        next(p for p in problems if p.startswith(key))
        for key in ("model.dit", "model.vae", "model.t5_tokenizer", "optimizer.optimizer_type", "dataset.resolution"))
    assert "not an Anima DiT file" in dit and "looks like a VAE" in dit
    assert "not a Qwen-Image / Wan 2.1 VAE file" in vae and "looks like an Anima DiT" in vae
    assert str(empty) in tokenizer and "spiece.model" in tokenizer
    assert "needs a CUDA GPU" in optimizer and '"AdamW"' in optimizer
    assert "-64" in resolution


def test_block_count_adapter_and_dataset_config_are_read_before_training(tmp_path, tiny_model, capsys):
    weights = load_file(tiny_model.dit)
    no_adapter = tmp_path / "dit_without_adapter.safetensors"
    save_file({k: v for k, v in weights.items() if ".llm_adapter." not in k}, no_adapter)
    images = write_images(tmp_path / "data") / "2_tiny"
    config = tmp_path / "dataset.toml"
    config.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 72\n'
                      f'[[datasets.subsets]]\nimage_dir = "{images}"\n')
    data = tiny_profile_data(tmp_path, tiny_model, memory={"blocks_to_swap": 3})
    data["model"]["dit"] = str(no_adapter)
    data["dataset"] = {"dataset_config": str(config)}
    assert main(["validate", _write_profile(tmp_path / "p.toml", data)]) == 2
    err = capsys.readouterr().err
    problems = _problems(err)
    assert any(p.startswith("model.llm_adapter:") and "holds no LLM adapter" in p for p in problems)
    assert any(p.startswith("memory.blocks_to_swap = 3") and "has 4 blocks, so at most 2" in p for p in problems)
    assert any("resolution (72, 72) must be a multiple of 16" in p for p in problems)


def test_messages_keep_their_brackets(tmp_path, tiny_model, capsys):
    """Rich markup would swallow `[[datasets]]` or `[network]`: messages are printed as plain text."""
    config = tmp_path / "dataset.toml"
    config.write_text('[general]\ncaption_extension = ".txt"\n')
    data = tiny_profile_data(tmp_path, tiny_model)
    data["dataset"] = {"dataset_config": str(config)}
    assert main(["validate", _write_profile(tmp_path / "p.toml", data), "--set", "network.dimm=4"]) == 2
    err = capsys.readouterr().err
    assert "no [[datasets]] table" in err and "network.dimm: unknown key" in err


def test_the_image_scan_reports_each_bad_image_once_and_can_be_skipped(tmp_path, tiny_model, capsys):
    subset = write_images(tmp_path / "data", count=2) / "2_tiny"
    (subset / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(subset / "small.png")
    profile = _write_profile(tmp_path / "p.toml", tiny_profile_data(tmp_path, tiny_model))
    assert main(["validate", profile]) == 0
    err = capsys.readouterr().err
    assert err.count("broken.png") == 1 and err.count("small.png") == 1 and "object at 0x" not in err
    assert "2 image(s)" in err and "4 training image(s) per epoch" in err and "valid" in err
    assert main(["validate", profile, "--no-scan"]) == 0
    err = capsys.readouterr().err
    assert "broken.png" not in err and "not scanned" in err
    assert main(["validate", profile, "--set", "dataset.bad_image_policy='error'"]) == 2
    problems = _problems(capsys.readouterr().err)
    assert problems[0].startswith("dataset:") and any("broken.png" in p for p in problems)


def test_bf16_on_the_cpu_trains_in_float32_unless_asked_for_explicitly(tmp_path, tiny_model, capsys):
    import torch

    from anima_core.config import profile_from_dict
    from anima_core.training.precision import choose_precision

    write_images(tmp_path / "data")

    def precision(training):
        data = tiny_profile_data(tmp_path, tiny_model)
        data["training"] = training
        return choose_precision(profile_from_dict(data).training, torch.device("cpu"))

    assert precision({"mixed_precision": "bf16"})[0] == "no"
    chosen, note = precision({"device": "auto"})  # bf16 is the default
    assert chosen == "no" and "half as fast" in note
    assert precision({"device": "cpu", "mixed_precision": "bf16"}) == ("bf16", None)
    assert precision({"device": "cpu", "mixed_precision": "fp16"})[0] == "no"
    assert choose_precision(profile_from_dict(tiny_profile_data(tmp_path, tiny_model, training={"mixed_precision": "bf16"})).training,
                            torch.device("cuda"))[0] == "bf16"
