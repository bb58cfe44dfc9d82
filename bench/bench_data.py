"""Data-path benchmark: scan, cache and batch N synthetic images with stand-in encoders, on the CPU.

    python bench/bench_data.py                          # N = 1000, 5000, 20000; table last
    python bench/bench_data.py --sizes 1000 --side 256  # one size
    python bench/bench_data.py --json out.json
    python bench/bench_data.py --sizes 1000,5000 --repeat 3         # each phase's fastest of 3 runs
    git worktree add /tmp/before 0c54742 && python bench/bench_data.py --code /tmp/before   # an older commit

Each N runs in a fresh process (so peak RSS is its own). The images are random-noise JPEGs of a few sizes
around `--side` (several buckets), each with a caption of 5-40 tags, generated once into `--root` and reused.
The encoders are stand-ins so only the data path is timed: the "VAE" is an 8x average pool to 16 channels
(float32, as the real VAE returns), the "text encoder" returns Qwen3-0.6B-shaped states (1024 wide, bf16 as on a
GPU, zero past the caption's length, one row per word + 2) and T5-shaped ids.

Phases (each timed, with the peak RSS while it ran, sampled every 20 ms): `scan` (check every image and caption;
serial = 1 thread as before, parallel = the default threads); `latents in memory` and `text in memory`
(the in-memory caches, serial = decoding on the main thread, parallel = default workers); `epoch` (every batch
of one epoch from the in-memory caches); `latents to disk` (new files) and `reuse check` (a second run: every
file reused). "cache size" is `anima_core.data.memory`'s estimate of the in-memory caches; "RSS growth" is how
much the process grew over the in-memory caching phases: the aim is growth within 1.2x of the caches' size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

# Every shape a little larger than the buckets at `--side`, so each image is placed (none is too small for the
# smallest bucket) and resized down on loading, as photos are.
SIZES = ((320, 320), (384, 240), (240, 384), (352, 272))
WORDS = ("1girl", "solo", "long hair", "smile", "looking at viewer", "outdoors", "sky", "cloud", "dress", "flower",
         "blue eyes", "short hair", "standing", "sitting", "holding", "hat", "ribbon", "school uniform", "night")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Phase:
    """Times a block and samples this process's RSS every 20 ms while it runs."""

    def __init__(self, name: str, items: int, results: list[dict]):
        self.name, self.items, self.results = name, items, results

    def __enter__(self):
        self.start_rss = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.started
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.results.append({"phase": self.name, "seconds": round(seconds, 2), "images_per_s": round(self.items / seconds, 1),
                             "rss_start_gib": round(self.start_rss / 2**30, 3), "peak_rss_gib": round(self.peak / 2**30, 3)})


def make_dataset(root: Path, n: int, side: int) -> Path:
    from PIL import Image

    top = root / f"n{n}-s{side}"
    folder = top / "1_bench"
    done = folder / ".complete"
    if done.is_file():
        return top
    shutil.rmtree(top, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        w, h = w * side // 256, h * side // 256
        noise = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # blocky, so the JPEGs stay small
        Image.fromarray(noise).resize((w, h), Image.Resampling.NEAREST).save(folder / f"{i:06d}.jpg", quality=90)
        tags = rng.choice(len(WORDS), size=int(rng.integers(5, 40)), replace=True)
        (folder / f"{i:06d}.txt").write_text(", ".join(WORDS[t] for t in tags))
    done.touch()
    return top


class StandInVAE:
    dtype = torch.float32

    def identity(self) -> str:
        return "stand-in-vae"

    def encode(self, pixels):
        pooled = torch.nn.functional.avg_pool2d(pixels.float(), 8)
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)


class StandInTextEncoder:
    def identity(self) -> str:
        return "stand-in-te"

    def encode(self, captions, qwen_max_length, t5_max_length):
        b = len(captions)
        states = torch.zeros((b, qwen_max_length, 1024), dtype=torch.bfloat16)
        mask = torch.zeros((b, qwen_max_length), dtype=torch.int64)
        ids = torch.zeros((b, t5_max_length), dtype=torch.int64)
        t5_mask = torch.zeros_like(ids)
        for row, caption in enumerate(captions):
            n = min(qwen_max_length, len(caption.split()) + 2)
            states[row, :n] = 0.5
            mask[row, :n] = 1
            ids[row, :n], t5_mask[row, :n] = 5, 1
        return states, mask, ids, t5_mask


def prepare(options, root: Path, n: int, side: int, batch: int):
    """The dataset folder and its options; every phase starts with the files in the OS cache, the first too."""
    data_dir = root / f"n{n}-s{side}"
    opts = options(train_data_dir=str(data_dir), resolution=side, enable_bucket=True, min_bucket_reso=side // 2,
                   max_bucket_reso=side * 2, bucket_reso_steps=32, caption_extension=".txt", train_batch_size=batch,
                   max_data_loader_n_workers=0, seed=1, qwen3_max_token_length=512, t5_max_token_length=512)
    for path in data_dir.rglob("*"):
        if path.is_file():
            path.read_bytes()
    return data_dir, opts


def disk_phases(build, opts, data_dir: Path, n: int, batch: int, results: list[dict], label: str) -> None:
    """New disk caches, then a second run that finds every file cached; the files are removed after."""
    disk = build(opts, base_dir=data_dir)
    with Phase(label, n, results):
        disk.cache_latents(StandInVAE(), to_disk=True, batch_size=batch, device="cpu")
    again = build(opts, base_dir=data_dir)
    with Phase("reuse check (all cached)", n, results):
        again.cache_latents(StandInVAE(), to_disk=True, batch_size=batch, device="cpu")
    for cache in data_dir.rglob("*_anima.npz"):
        cache.unlink()


def every_image_placed(data, n: int) -> None:
    """A rate is per image of the dataset: one the scan skipped would make every phase look faster."""
    placed = sum(len(ds.entries) for ds in data.datasets)
    if placed != n:
        raise SystemExit(f"only {placed} of the {n} images were placed in a bucket; the rates would be wrong")


def run_one(root: Path, n: int, side: int, batch: int) -> dict:
    """One N in this process: every phase, serial then parallel where both exist."""
    from anima_core.data import DataOptions, build_training_data

    torch.set_num_threads(1)
    try:
        from anima_core.data import parallel
    except ImportError:  # --code names a checkout from before parallel caching: its phases only
        return run_before(root, n, side, batch, DataOptions, build_training_data)
    from anima_core.data.memory import latent_cache_bytes, text_cache_bytes

    data_dir, opts = prepare(DataOptions, root, n, side, batch)
    results: list[dict] = []
    default = parallel.default_workers()
    real_default = parallel.default_workers
    parallel.default_workers = lambda: 1  # the scan's thread count: one thread, as before
    with Phase("scan, serial", n, results):
        build_training_data(opts, base_dir=data_dir)
    parallel.default_workers = real_default
    with Phase(f"scan, parallel ({default} threads)", n, results):
        data = build_training_data(opts, base_dir=data_dir)
    every_image_placed(data, n)

    serial = build_training_data(opts, base_dir=data_dir)
    with Phase("latents in memory, serial", n, results):
        serial.cache_latents(StandInVAE(), to_disk=False, batch_size=batch, device="cpu", workers=0)
    del serial
    rss_before = rss_bytes()
    with Phase(f"latents in memory, parallel ({default} threads)", n, results):
        data.cache_latents(StandInVAE(), to_disk=False, batch_size=batch, device="cpu")
    with Phase("text in memory", n, results):
        data.cache_text(StandInTextEncoder(), to_disk=False, batch_size=32)
    growth = rss_bytes() - rss_before
    lat = latent_cache_bytes(data)
    txt, _ = text_cache_bytes(data, width=1024, itemsize=2, count_tokens=lambda caps: [len(c.split()) + 2 for c in caps])
    with Phase("epoch from memory caches", n, results):
        batches = sum(1 for _ in data.epoch_batches(0))
    del data

    disk_phases(build_training_data, opts, data_dir, n, batch, results, f"latents to disk ({default} threads)")
    return {"n": n, "side": side, "batches": batches, "cache_gib": round((lat + txt) / 2**30, 3),
            "latent_gib": round(lat / 2**30, 3), "text_gib": round(txt / 2**30, 3),
            "rss_growth_gib": round(growth / 2**30, 3), "phases": results, "cpus": default}


def run_before(root: Path, n: int, side: int, batch: int, options, build) -> dict:
    """The phases an older checkout has (commit 0c54742: one scan thread, decoding on the main thread)."""
    data_dir, opts = prepare(options, root, n, side, batch)
    results: list[dict] = []
    with Phase("scan, serial", n, results):
        data = build(opts, base_dir=data_dir)
    every_image_placed(data, n)
    with Phase("latents in memory, serial", n, results):
        data.cache_latents(StandInVAE(), to_disk=False, batch_size=batch, device="cpu")
    rss_before = rss_bytes()
    with Phase("text in memory", n, results):
        data.cache_text(StandInTextEncoder(), to_disk=False, batch_size=32)
    growth = rss_bytes() - rss_before
    with Phase("epoch from memory caches", n, results):
        batches = sum(1 for _ in data.epoch_batches(0))
    del data
    disk_phases(build, opts, data_dir, n, batch, results, "latents to disk")
    return {"n": n, "side": side, "batches": batches, "cache_gib": 0, "latent_gib": 0, "text_gib": 0,
            "rss_growth_gib": round(growth / 2**30, 3), "phases": results, "cpus": 1, "code": str(Path(build.__code__.co_filename).parent)}


def fastest(tries: list[dict]) -> dict:
    """One N's runs merged: each phase's fastest time (the run least disturbed by the rest of the machine),
    the highest peak RSS and RSS growth of any run, and how far the slowest run of the phase was from it."""
    merged = dict(tries[0], repeats=len(tries), rss_growth_gib=max(t["rss_growth_gib"] for t in tries))
    phases = []
    for n, phase in enumerate(tries[0]["phases"]):
        runs = [t["phases"][n] for t in tries]
        best = min(runs, key=lambda p: p["seconds"])
        phases.append(dict(best, peak_rss_gib=max(p["peak_rss_gib"] for p in runs),
                           slowest_s=max(p["seconds"] for p in runs)))
    merged["phases"] = phases
    return merged


def table(runs: list[dict]) -> str:
    lines = ["| N | phase | s | images/s | peak RSS GiB | slowest of the repeats, s |", "| --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        for p in run["phases"]:
            lines.append(f"| {run['n']} | {p['phase']} | {p['seconds']} | {p['images_per_s']} | {p['peak_rss_gib']} | "
                         f"{p.get('slowest_s', '')} |")
    lines += ["", "| N | in-memory caches (estimate): latents + text | RSS growth while caching in memory | ratio |",
              "| --- | --- | --- | --- |"]
    for run in runs:
        ratio = run["rss_growth_gib"] / run["cache_gib"] if run["cache_gib"] else 0
        lines.append(f"| {run['n']} | {run['cache_gib']} GiB ({run['latent_gib']} + {run['text_gib']}) | "
                     f"{run['rss_growth_gib']} GiB | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--side", type=int, default=256, help="base image side (buckets around it)")
    parser.add_argument("--batch", type=int, default=8, help="vae_batch_size and train_batch_size")
    parser.add_argument("--root", default="/tmp/anima-bench-data", help="where the synthetic images are kept")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--code", help="time this checkout's anima_core instead (a worktree of an older commit)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each N this many times (each in a fresh process) and keep each phase's fastest run")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one N in this process
    args = parser.parse_args()
    root = Path(args.root)
    if args.one:
        print(json.dumps(run_one(root, args.one, args.side, args.batch)))
        return
    runs = []
    for n in (int(s) for s in args.sizes.split(",")):
        started = time.perf_counter()
        make_dataset(root, n, args.side)
        print(f"N={n}: images ready ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
        env = None
        if args.code:  # the other checkout first; what else the path holds (installed packages) after it
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(args.code).resolve()),
                                                                            os.environ.get("PYTHONPATH")]))}
        tries = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", str(n), "--side",
                                  str(args.side), "--batch", str(args.batch), "--root", str(root)],
                                 check=True, capture_output=True, text=True, env=env, cwd=args.code)
            tries.append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs.append(fastest(tries))
        print(table(runs[-1:]), file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    print(table(runs))


if __name__ == "__main__":
    main()
