"""Building tiny training runs for the end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from anima_core.config import profile_from_dict
from anima_core.plugins import build_plugins
from anima_core.training.trainer import Trainer


def write_images(folder: Path, count: int = 2, side: int = 64, repeats: int = 2) -> Path:
    subset = folder / f"{repeats}_tiny"
    subset.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        y, x = np.mgrid[0:side, 0:side]
        img = np.stack([(x * 4 + i * 60) % 256, (y * 4) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
        img = (img * 0.8 + rng.integers(0, 50, img.shape)).astype(np.uint8)
        Image.fromarray(img).save(subset / f"img{i}.png")
        (subset / f"img{i}.txt").write_text(f"1girl, tag{i}, simple background\n")
    return folder


def tiny_profile_data(root: Path, tiny_model, **tables) -> dict:
    data = {
        "model": {"dit": str(tiny_model.dit), "qwen3": str(tiny_model.qwen3), "vae": str(tiny_model.vae),
                  "t5_tokenizer": str(tiny_model.t5_tokenizer), "qwen3_max_token_length": 16, "t5_max_token_length": 16},
        "dataset": {"train_data_dir": str(root / "data"), "resolution": 64, "caption_extension": ".txt", "train_batch_size": 2},
        "caching": {"cache_latents": True, "cache_text_encoder_outputs": True},
        "network": {"dim": 4, "alpha": 4.0, "train_unet_only": True},
        "optimizer": {"learning_rate": 1e-3},
        "training": {"max_train_steps": 6, "mixed_precision": "no", "device": "cpu", "seed": 7},
        "saving": {"output_dir": str(root / "out"), "output_name": "lora"},
        "logging": {"run_name": "run", "progress": "plain"},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    return data


def make_run(root: Path, tiny_model, *, images: int = 2, plugins=None, resume=None, **tables):
    if not (root / "data").exists():
        write_images(root / "data", count=images)
    plugins = plugins or build_plugins(entry_points=False)
    profile = profile_from_dict(tiny_profile_data(root, tiny_model, **tables), plugins=plugins)
    return Trainer(profile, plugins, resume=resume)


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
