"""The guide's example command line, pointed at tiny files, trains through import-kohya and run."""

import re
import tomllib

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


def test_guide_example_imports_and_trains(tmp_path, tiny_model, capsys):
    images = write_images(tmp_path / "data", count=1) / "2_tiny"
    (tmp_path / "my_anima_dataset_config.toml").write_text(DATASET_CONFIG.format(images=images))
    adapter = tmp_path / "llm_adapter.safetensors"
    dit_weights = load_file(tiny_model.dit)
    save_file({k.removeprefix("net."): v for k, v in dit_weights.items() if k.startswith("net.llm_adapter.")}, adapter)
    command = tmp_path / "command.sh"
    paths = {"<path to Anima DiT model>": tiny_model.dit, "<path to Qwen3-0.6B model or directory>": tiny_model.qwen3,
             "<path to WanVAE model>": tiny_model.vae, "<path to LLM adapter model>": adapter,
             "<output directory>": tmp_path / "out"}
    text = GUIDE_COMMAND
    for placeholder, path in paths.items():
        text = text.replace(placeholder, str(path))
    command.write_text(text)
    profile = tmp_path / "profile.toml"
    assert main(["import-kohya", str(command), "-o", str(profile)]) == 0
    data = tomllib.loads(profile.read_text())
    assert data["dataset"]["dataset_config"] == "my_anima_dataset_config.toml"
    assert data["training"]["timestep_sampling"] == "logit_normal" and data["training"]["discrete_flow_shift"] == 3.0
    assert data["memory"]["blocks_to_swap"] == 18 and data["network"]["dim"] == 8

    # The guide's 18-block swap is for the 28-block release: on the 4-block tiny model it is refused, clearly...
    base = ["--set", f"model.t5_tokenizer='{tiny_model.t5_tokenizer}'", "--set", "training.device='cpu'"]
    assert main(["run", str(profile), *base]) == 2
    err = capsys.readouterr().err
    assert "blocks_to_swap" in err and "Traceback" not in err
    # ...and trains with the overrides a CPU user would give.
    overrides = ["--set", "memory.blocks_to_swap=2", "--set", "optimizer.optimizer_type='AdamW'",
                 "--set", f"model.t5_tokenizer='{tiny_model.t5_tokenizer}'", "--set", "model.qwen3_max_token_length=16",
                 "--set", "model.t5_max_token_length=16", "--set", "training.device='cpu'",
                 "--set", "logging.run_name='guide'", "--set", "training.max_train_epochs=3"]
    assert main(["run", str(profile), *overrides]) == 0
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
