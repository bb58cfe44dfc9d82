"""Latent caching with the real VAE on a GPU: does the CPU side (decode, resize) keep the VAE busy?

    python bench/bench_latent_cache.py --json latent_cache.json            # on a GPU: released-size VAE, 1024²
    python bench/bench_latent_cache.py --tiny --device cpu --n 16          # the same path on the CPU (smoke test)

A VAE of the released size with random weights (``write_random_vae``; the cost of a convolution does not depend
on its weights) and ``--n`` synthetic JPEGs around ``--side`` (bench_data's images: four aspect buckets). For each
``vae_batch_size`` it reports three rates, in images/s:

- ``encode``: the VAE alone on pixels already on the device (the ceiling for caching);
- ``decode``: the CPU side alone (open, decode, resize, crop, to pixels) with the default threads and with one;
- ``cache``: the whole in-memory caching phase as a run does it (`TrainingData.cache_latents`).

``cache`` near ``encode`` means the CPU side is hidden behind the VAE; near ``decode`` means it caps caching.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import make_dataset  # noqa: E402 - the same synthetic images as the data-path bench


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_rate(vae, side: int, batch: int, device: torch.device, repeats: int) -> float:
    pixels = torch.rand((batch, 3, side, side), device=device).mul_(2).sub_(1)
    vae.encode(pixels)  # warm-up: cuDNN picks its algorithms
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        vae.encode(pixels)
    _sync(device)
    return batch * repeats / (time.perf_counter() - started)


def decode_rate_vae(vae, latents, device: torch.device, repeats: int = 4) -> float:
    vae.decode(latents)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        vae.decode(latents)
    _sync(device)
    return latents.shape[0] * repeats / (time.perf_counter() - started)


def decode_rate(data, vae, workers: int) -> float:
    from anima_core.data import caching, parallel

    items = caching.latent_items(data._all_parts(), caching.as_source(vae), to_disk=False)
    started = time.perf_counter()
    for _ in parallel.parallel_map(caching._decode_for_latents, items, workers, chunk=4):
        pass
    return len(items) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=96, help="images")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--batches", default="1,4", help="vae_batch_size values")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny VAE (CPU smoke test)")
    parser.add_argument("--root", default="/tmp/anima-bench-latents")
    parser.add_argument("--json")
    args = parser.parse_args()

    from anima_core.data import DataOptions, build_training_data, parallel
    from anima_core.models.tiny import FULL_VAE_BASE_DIM, TINY_VAE_BASE_DIM, write_random_vae
    from anima_core.models.vae import load_vae

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    root = Path(args.root)
    data_dir = make_dataset(root, args.n, args.side)
    vae_path = root / ("vae-tiny.safetensors" if args.tiny else "vae-full.safetensors")
    if not vae_path.is_file():
        write_random_vae(vae_path, base_dim=TINY_VAE_BASE_DIM if args.tiny else FULL_VAE_BASE_DIM, dtype=torch.bfloat16)
    vae = load_vae(vae_path, dtype=dtype, device=device)
    opts = DataOptions(train_data_dir=str(data_dir), resolution=args.side, enable_bucket=True,
                       min_bucket_reso=args.side // 2, max_bucket_reso=args.side * 2, bucket_reso_steps=64,
                       caption_extension=".txt", train_batch_size=1, max_data_loader_n_workers=0, seed=1)
    data = build_training_data(opts, base_dir=data_dir)
    for path in data_dir.rglob("*.jpg"):  # the files in the OS cache for every phase
        path.read_bytes()
    threads = parallel.default_workers()
    rows = []
    row = {"phase": "decode (CPU side)", "threads": threads, "images_per_s": round(decode_rate(data, vae, threads), 1)}
    rows.append(row)
    rows.append({"phase": "decode (CPU side)", "threads": 1, "images_per_s": round(decode_rate(data, vae, 1), 1)})
    # The loader runs the causal 3D convolutions of a one-frame input as 2D ones; diffusers' own path, for the
    # comparison (rate and how far its latents are from ours):
    reference = load_vae(vae_path, dtype=dtype, device=device)
    for module in reference.vae.modules():
        vars(module).pop("forward", None)
    pixels = torch.rand((1, 3, args.side, args.side), device=device).mul_(2).sub_(1)
    ours, theirs = vae.encode(pixels), reference.encode(pixels)
    pixels_ours, pixels_theirs = vae.decode(ours), reference.decode(ours)
    rows.append({"phase": "encode (VAE alone, diffusers' 3D convolutions)", "batch": 1,
                 "images_per_s": round(encode_rate(reference, args.side, 1, device, 8), 1),
                 "latents_max_abs_diff": float((ours - theirs).abs().max()),
                 "latents_std": float(theirs.std()),
                 "decoded_max_abs_diff": float((pixels_ours - pixels_theirs).abs().max())})
    rows.append({"phase": "decode (VAE alone)", "images_per_s": round(decode_rate_vae(vae, ours, device), 2)})
    rows.append({"phase": "decode (VAE alone, diffusers' 3D convolutions)",
                 "images_per_s": round(decode_rate_vae(reference, ours, device), 2)})
    del reference
    for batch in (int(b) for b in args.batches.split(",")):
        rows.append({"phase": "encode (VAE alone)", "batch": batch,
                     "images_per_s": round(encode_rate(vae, args.side, batch, device, max(2, 16 // batch)), 1)})
        if batch > 1:  # the loader encodes a batch one image at a time (diffusers' slicing): what one call costs
            vae.vae.use_slicing = False
            rows.append({"phase": "encode (VAE alone, whole batch in one call)", "batch": batch,
                         "images_per_s": round(encode_rate(vae, args.side, batch, device, max(2, 16 // batch)), 1),
                         "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None})
            vae.vae.use_slicing = True
        fresh = build_training_data(opts, base_dir=data_dir)
        _sync(device)
        started = time.perf_counter()
        fresh.cache_latents(vae, to_disk=False, batch_size=batch, device=device)
        _sync(device)
        rows.append({"phase": "cache in memory (whole phase)", "batch": batch, "threads": threads,
                     "images_per_s": round(args.n / (time.perf_counter() - started), 1)})
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "n": args.n, "side": args.side, "rows": rows}
    print(json.dumps(info, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
