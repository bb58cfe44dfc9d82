"""End-to-end `anima-train run` at real size on a GPU, without the real weights.

    python bench/real_size_run.py --root /tmp/real-size --json real_size.json     # on the GPU (~2 GB VRAM free)
    python bench/real_size_run.py --tiny --root /tmp/real-size-smoke              # the same path on the CPU
    python bench/real_size_run.py --root /tmp/rs --variants adamw8bit --launchers none,torchrun   # + under torchrun

It writes a random Anima 2B set in the released file formats (``make_full_size_model``: bf16 DiT with its
adapter under ``net.``, the single Qwen3 file, the Wan-named VAE, the packaged tokenizers), a synthetic captioned
dataset at 1024² in two aspect buckets, then trains each variant through the real command line (a subprocess,
as a user runs it) with caching on, previews every ``--steps``/2 steps and a LoRA saved at the end:

- ``adamw8bit``: bitsandbytes AdamW8bit, gradient checkpointing;
- ``swap18``: AdamW, gradient checkpointing + 18 of 28 blocks swapped to the CPU;
- ``full_fused`` (not run unless named): full fine-tuning with Adafactor's fused backward pass and gradient
  checkpointing, the setting sd-scripts reports at 23–24 GB on a 4090; ``full_fused_swap14`` the same with 14
  blocks swapped.

For each: wall time, the run_end event (status, steps/s, floor fraction), the peak VRAM of the step events, the
post-save self-check line (ComfyUI's key rule applied to the saved file), ``lora-info``'s verdict, the preview
files, and the NVML reading the TUI monitor shows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tomli_w
from PIL import Image

BUCKETS = {"square": (1024, 1024), "portrait": (832, 1216)}  # (width, height)
TINY_BUCKETS = {"square": (64, 64), "portrait": (48, 80)}
LORA = {"dim": 16, "alpha": 16.0, "train_unet_only": True}
FULL = {"module": "full", "train_unet_only": True}
ADAFACTOR_FUSED = {"optimizer_type": "Adafactor", "learning_rate": 1e-5, "fused_backward_pass": True, "max_grad_norm": 0.0,
                   "optimizer_args": {"relative_step": False, "scale_parameter": False, "warmup_init": False}}
VARIANTS = {  # name: (network, optimizer, memory)
    "adamw8bit": (LORA, {"optimizer_type": "AdamW8bit"}, {"gradient_checkpointing": True}),
    "swap18": (LORA, {"optimizer_type": "AdamW"}, {"gradient_checkpointing": True, "blocks_to_swap": 18}),
    "full_fused": (FULL, ADAFACTOR_FUSED, {"gradient_checkpointing": True}),
    "full_fused_swap14": (FULL, ADAFACTOR_FUSED, {"gradient_checkpointing": True, "blocks_to_swap": 14}),
}
LORA_VARIANTS = "adamw8bit,swap18"


def write_dataset(folder: Path, buckets: dict[str, tuple[int, int]], per_bucket: int) -> Path:
    """kohya folder form: smooth random colour fields with a shape, one caption per image."""
    subset = folder / "1_synthetic"
    subset.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (width, height) in buckets.items():
        for i in range(per_bucket):
            y, x = np.mgrid[0:height, 0:width] / max(width, height)
            base = rng.uniform(60, 200, size=3)
            image = base + 50 * np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(4 * (x + y))], axis=-1)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(subset / f"{name}_{i}.png")
            (subset / f"{name}_{i}.txt").write_text(f"1girl, {name} picture number {i}, colorful background\n")
    return folder


def profile_for(root: Path, model, variant: str, name: str, *, steps: int, tiny: bool) -> dict:
    network, optimizer, memory = VARIANTS[variant]
    if tiny:  # the tiny DiT has 4 blocks; bitsandbytes' 8-bit optimizers need CUDA
        memory = {**memory, "blocks_to_swap": min(memory.get("blocks_to_swap", 0), 2)}
        if optimizer["optimizer_type"].endswith("8bit"):
            optimizer = {"optimizer_type": "AdamW"}
    side = 64 if tiny else 1024
    return {
        "model": {"dit": str(model.dit), "qwen3": str(model.qwen3), "qwen3_tokenizer": str(model.qwen_tokenizer),
                  "vae": str(model.vae), "t5_tokenizer": str(model.t5_tokenizer)},
        "dataset": {"train_data_dir": str(root / "dataset"), "resolution": side, "enable_bucket": True,
                    "min_bucket_reso": 32 if tiny else 512, "max_bucket_reso": 2 * side,
                    "bucket_reso_steps": 16 if tiny else 64, "caption_extension": ".txt",
                    "train_batch_size": 1},
        "caching": {"cache_latents": True, "cache_text_encoder_outputs": True},
        "network": network,
        "optimizer": {"learning_rate": 1e-4, **optimizer},
        "training": {"max_train_steps": steps, "seed": 42, **({"mixed_precision": "no", "device": "cpu"} if tiny else {})},
        "memory": memory,
        "saving": {"output_dir": str(root / "output" / name), "output_name": f"real_size_{variant}"},
        "sampling": {"sample_prompts": str(root / "prompts.txt"), "sample_every_n_steps": max(1, steps // 2)},
        "logging": {"log_every_n_steps": 5, "run_name": name},
    }


class NvmlWatch:
    """The monitor's NVML reading (``anima_tui.system_stats``), taken every second while a run goes."""

    def __init__(self) -> None:
        self.readings: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from anima_tui.system_stats import probe_system

        while not self._stop.wait(1.0):
            self.readings.extend({"name": g.name, "used": g.used, "total": g.total, "util": g.utilisation}
                                 for g in probe_system().gpus)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict | None:
        if not self.readings:
            return None
        return {"name": self.readings[0]["name"], "samples": len(self.readings),
                "max_used_gib": max(r["used"] for r in self.readings) / 2**30,
                "total_gib": self.readings[0]["total"] / 2**30, "max_util": max(r["util"] for r in self.readings)}


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_variant(root: Path, model, variant: str, *, steps: int, tiny: bool, launcher: str = "none") -> dict:
    """``launcher`` "torchrun": one process started by torch's launcher, so the run joins a process group
    (NCCL on a GPU) through the multi-process code path."""
    name = variant if launcher == "none" else f"{variant}-{launcher}"
    profile_path = root / f"{name}.toml"
    profile_path.write_text(tomli_w.dumps(profile_for(root, model, variant, name, steps=steps, tiny=tiny)))
    command = [sys.executable, "-m", "anima_core.cli", "run", str(profile_path)]
    if launcher == "torchrun":
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    started = time.perf_counter()
    with NvmlWatch() as watch:
        completed = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    run_dir = root / "output" / name / "runs" / name
    events = read_events(run_dir)
    end = next((e for e in reversed(events) if e.get("type") == "run_end"), None)
    steps_events = [e for e in events if e.get("type") == "step"]
    peaks = [e["vram_peak"] for e in steps_events if e.get("vram_peak") is not None]
    checks = [e.get("message") for e in events if "self-check" in str(e.get("message", ""))]
    # Gaps between consecutive step events (s_per_it is the run's average so far, first step and previews
    # included); the median leaves out the first step's allocations and the steps that rendered previews.
    step_times = sorted(b["time"] - a["time"] for a, b in zip(steps_events[1:], steps_events[2:]))
    notes = [e["message"] for e in events if e.get("type") in ("log", "warning")
             and any(w in e.get("message", "") for w in ("bucket", "peak", "predicted", "steps/s", "model math", "DiT:"))]
    lora = Path(end["lora"]) if end and end.get("lora") else None
    info = None
    if lora is not None and lora.is_file() and VARIANTS[variant][0] is LORA:
        shown = subprocess.run([sys.executable, "-m", "anima_core.cli", "lora-info", str(lora)],
                               capture_output=True, text=True)
        info = [line for line in shown.stdout.splitlines() if "ComfyUI" in line and "module" not in line]
    previews = sorted(str(p.relative_to(root)) for p in (root / "output" / name).rglob("*.png"))
    start = next((e for e in events if e.get("type") == "run_start"), {})
    return {
        "variant": name,
        "process_group": start.get("process_group"),
        "returncode": completed.returncode,
        "wall_s": round(wall, 1),
        "run_end": end,
        "step_events": len(steps_events),
        "vram_peak_gib": max(peaks) / 2**30 if peaks else None,
        "median_s_per_step": step_times[len(step_times) // 2] if step_times else None,
        "log": notes,
        "self_check": checks,
        "lora_info": info,
        "previews": previews,
        "nvml": watch.summary(),
        "output_tail": (completed.stdout + completed.stderr)[-3000:] if completed.returncode else None,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="where the model, dataset and runs go")
    parser.add_argument("--tiny", action="store_true", help="the tiny model at 64² on the CPU (smoke test)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-bucket", type=int, default=4, help="images per aspect bucket")
    parser.add_argument("--variants", default=LORA_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--launchers", default="none", help="none, torchrun, or both (none,torchrun)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from anima_core.models.tiny import make_full_size_model, make_tiny_model

    root = args.root.resolve()
    started = time.perf_counter()
    if args.tiny:
        model = make_tiny_model(root / "model")
    else:
        model = make_full_size_model(root / "model", device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"model written in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in (model.dit, model.qwen3, model.vae)
                      if p.is_file()), flush=True)
    write_dataset(root / "dataset", TINY_BUCKETS if args.tiny else BUCKETS, args.per_bucket)
    side = 64 if args.tiny else 1024
    (root / "prompts.txt").write_text(f"1girl, colorful background --w {side} --h {side} --d 1 --s 8\n")
    results = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        for launcher in args.launchers.split(","):
            results.append(run_variant(root, model, variant, steps=args.steps, tiny=args.tiny, launcher=launcher))
            print(json.dumps(results[-1], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
