"""`anima-train demo`: a tiny model, a small generated captioned dataset, a profile, and a CPU training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tomli_w
import torch
from PIL import Image

from anima_core.config import load_profile
from anima_core.models import make_tiny_model
from anima_core.plugins import default_plugins
from anima_core.training.trainer import Trainer

DEMO_IMAGES = {
    "red_circle": ((220, 40, 40), "circle", "1girl, red circle, simple background"),
    "blue_square": ((40, 60, 220), "square", "1girl, blue square, simple background"),
    "green_circle": ((40, 200, 80), "circle", "green circle, white background"),
    "yellow_square": ((230, 210, 40), "square", "yellow square, white background"),
}
SIDE = 64


def _draw(color, shape: str, side: int) -> Image.Image:
    """A flat shape on a soft gradient: enough structure for the loss to fall within a few steps."""
    y, x = np.mgrid[0:side, 0:side] / side
    canvas = np.stack([200 + 40 * x, 200 + 40 * y, 230 - 30 * x], axis=-1)
    inside = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.09) if shape == "circle" else ((abs(x - 0.5) < 0.28) & (abs(y - 0.5) < 0.28))
    canvas[inside] = color
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def write_demo_dataset(folder: Path) -> Path:
    """kohya folder form: `<repeats>_<name>/` holding images and `.txt` captions."""
    subset = folder / "5_demo"
    subset.mkdir(parents=True, exist_ok=True)
    for name, (color, shape, caption) in DEMO_IMAGES.items():
        _draw(color, shape, SIDE).save(subset / f"{name}.png")
        (subset / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def demo_profile(root: Path, model, steps: int) -> dict:
    return {
        "model": {"dit": str(model.dit), "qwen3": str(model.qwen3), "vae": str(model.vae),
                  "t5_tokenizer": str(model.t5_tokenizer), "qwen3_max_token_length": 32, "t5_max_token_length": 32},
        "dataset": {"train_data_dir": str(root / "dataset"), "resolution": SIDE, "caption_extension": ".txt",
                    "train_batch_size": 2},
        "caching": {"cache_latents": True, "cache_text_encoder_outputs": True},
        "network": {"dim": 4, "alpha": 4.0, "train_unet_only": True},
        "optimizer": {"learning_rate": 1e-3},
        "training": {"max_train_steps": steps, "mixed_precision": "no", "device": "cpu", "seed": 1234},
        "saving": {"output_dir": str(root / "output"), "output_name": "demo_lora", "save_every_n_steps": max(1, steps // 2)},
        "logging": {"log_every_n_steps": 5},
    }


def run_demo(root: Path, *, steps: int = 30, console=None):
    def say(text: str) -> None:
        if console is not None:  # plain text, never wrapped: the paths must survive a pipe or a narrow terminal
            console.print(text, markup=False, highlight=False, soft_wrap=True)

    # The demo model is tiny: one thread beats several, whose start-up costs more than the work they share.
    torch.set_num_threads(1)
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    say(f"building the tiny random model in {root / 'tiny-model'}")
    model = make_tiny_model(root / "tiny-model")
    say(f"drawing the {len(DEMO_IMAGES)}-image captioned dataset in {root / 'dataset'}")
    write_demo_dataset(root / "dataset")
    profile_path = root / "demo.toml"
    profile_path.write_text(
        "# Written by `anima-train demo`: a tiny random model and a generated dataset, trained on the CPU.\n"
        + tomli_w.dumps(demo_profile(root, model, steps)),
        encoding="utf-8",
    )
    say(f"training a LoRA for {steps} steps on the CPU with {profile_path}")
    result = Trainer(load_profile(profile_path), default_plugins(), console=console).run()
    say(f"\nprofile: {profile_path}\nLoRA:    {result.lora_path}\nlog:     {result.run_dir / 'train.log'}\n"
        f"events:  {result.run_dir / 'events.jsonl'}\nwatch it: anima-train watch {result.run_dir}")
    return result
