"""The guide's example command line, pointed at tiny files: import-kohya, one validate naming every problem, run."""

import re
import tomllib
from pathlib import Path

from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_kohya_import import GUIDE_COMMAND
from training_helpers import read_events, write_images

from anima_core.cli import main

DATASET_CONFIG = """
[general]
shuffle_caption = false
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 1
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 16

  [[datasets.subsets]]
  image_dir = "{images}"
  num_repeats = 1
"""


def _problems(err: str) -> list[str]:
    return [line.strip()[2:] for line in err.splitlines() if line.strip().startswith("- ")]


def test_guide_example_reports_every_problem_in_one_validate_then_trains_on_the_first_run(
        tmp_path, tiny_model, capsys, monkeypatch):
    """The guide's command, run from the dataset's folder, pointed at the tiny model and a dataset with one problem
    of each kind: one `validate` names them all; fixed, the first `run` trains."""
    monkeypatch.chdir(tmp_path)
    images = write_images(tmp_path / "data", count=1) / "2_tiny"
    (images / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(images / "small.png")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "latin1.png")
    (images / "latin1.txt").write_bytes("caf\xe9, 1girl".encode("latin-1"))
    Path("my_anima_dataset_config.toml").write_text(DATASET_CONFIG.format(images="data/2_tiny"))
    adapter = tmp_path / "llm_adapter.safetensors"
    dit_weights = load_file(tiny_model.dit)
    save_file({k.removeprefix("net."): v for k, v in dit_weights.items() if k.startswith("net.llm_adapter.")}, adapter)
    paths = {"<path to Anima DiT model>": tiny_model.dit, "<path to Qwen3-0.6B model or directory>": tiny_model.qwen3,
             "<path to WanVAE model>": tiny_model.vae, "<path to LLM adapter model>": tiny_model.vae,  # wrong kind
             "<output directory>": "out"}
    text = GUIDE_COMMAND
    for placeholder, path in paths.items():
        text = text.replace(placeholder, str(path))
    Path("command.sh").write_text(text)
    assert main(["import-kohya", "command.sh", "-o", "profiles/guide.toml"]) == 0
    profile = "profiles/guide.toml"
    data = tomllib.loads(Path(profile).read_text())
    assert data["dataset"]["dataset_config"] == "../my_anima_dataset_config.toml"
    assert data["training"]["timestep_sampling"] == "logit_normal" and data["training"]["discrete_flow_shift"] == 3.0
    assert data["memory"]["blocks_to_swap"] == 18 and data["network"]["dim"] == 8
    capsys.readouterr()

    # One validate: the adapter file is a VAE, 18 of 4 blocks swapped, an 8-bit optimizer without a GPU, and the
    # dataset's undecodable, too small and non-UTF-8-captioned images.
    assert main(["validate", profile]) == 2
    err = capsys.readouterr().err
    problems = _problems(err)
    assert any(p.startswith("model.llm_adapter:") and "not an Anima LLM adapter" in p for p in problems)
    assert any(p.startswith("memory.blocks_to_swap = 18") for p in problems)
    assert any(p.startswith("optimizer.optimizer_type:") and "CUDA" in p for p in problems)
    for image in ("broken.png", "small.png", "latin1.png"):
        assert err.count(image) == 1, image
    assert "bf16 on the CPU" in err  # what the run will do differently, said up front

    # Fixed the way a CPU user would, it validates and trains on the first run.
    fixes = ["--set", f"model.llm_adapter='{adapter}'", "--set", "memory.blocks_to_swap=2",
             "--set", "optimizer.optimizer_type='AdamW'", "--set", "model.qwen3_max_token_length=16",
             "--set", "model.t5_max_token_length=16", "--set", "logging.run_name='guide'",
             "--set", "training.max_train_epochs=3"]
    assert main(["validate", profile, *fixes]) == 0
    capsys.readouterr()
    assert main(["run", profile, *fixes]) == 0
    run_output = capsys.readouterr().err
    assert run_output.count("broken.png") == 1 and "object at 0x" not in run_output  # the skip list, once
    lora = tmp_path / "out" / "my_anima_lora.safetensors"
    with safe_open(lora, "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] in ("8", "8.0")
    assert meta["ss_timestep_sample_method"] == "logit_normal" and meta["ss_discrete_flow_shift"] == "3.0"
    assert meta["ss_mixed_precision"] == "bf16"
    # The guide's targets: every Linear of each DiT block, AdaLN modulation included.
    modules = {re.sub(r"\.(lora_up|lora_down)\.weight$|\.alpha$", "", k) for k in keys}
    assert "lora_unet_blocks_0_adaln_modulation_self_attn_1" in modules
    assert len([m for m in modules if m.startswith("lora_unet_blocks_0_")]) == 16
    events = read_events(tmp_path / "out" / "runs" / "guide")
    assert events[-1]["status"] == "finished"
    assert [e["epoch"] for e in events if e["type"] == "save" and e["kind"] == "lora"][:2] == [1, 2]
