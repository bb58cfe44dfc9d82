"""Encoding every image and caption once: reuse checks, parallel decoding, batched encodes, background writes.

The pipeline for latents: the reuse check reads only the key of each existing cache file (in threads); what
is left is grouped by bucket; worker threads decode, resize and crop the images in order while the main
thread encodes them `batch_size` at a time; disk writes go to writer threads, one file's writes always to
the same thread, with each file fsynced before its rename and each folder fsynced once at the end. Models are
loaded only when something is left to encode.

Multi-process training divides the work with `share=(rank, world_size)`: a process encodes only the cache
files whose index (in a fixed order of files) is `rank` modulo `world_size`, so no file is written twice.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from anima_core.atomic import clean_leftovers, fsync_folders
from anima_core.data import cache as caches
from anima_core.data.buckets import crop_ltrb
from anima_core.data.captions import fixed_caption
from anima_core.data.compact import CachedText, Slabs, compact_text
from anima_core.data.images import centre_framing, load_image
from anima_core.data.progress import PhaseReporter, ProgressSink
from anima_core.errors import DatasetError

log = logging.getLogger(__name__)

Share = tuple[int, int]  # (rank, world_size)


def default_workers() -> int:
    """Threads for decoding and checking: every CPU this process may use, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


@dataclass
class ModelSource:
    """A model named by its cache identity, loaded only if something has to be encoded."""

    identity: str
    dtype: str
    load: Callable[[], Any]


def as_source(model: Any) -> ModelSource:
    if isinstance(model, ModelSource):
        return model
    return ModelSource(model.identity(), str(getattr(model, "dtype", "")), lambda: model)


def _in_share(paths: list[Path], share: Share) -> set[Path]:
    """This process's cache files: every world-th of all of them (not only the stale ones, which other
    processes may be writing meanwhile), so the division is the same in every process."""
    rank, world = share
    return {p for n, p in enumerate(sorted(set(paths))) if n % world == rank}


def _parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """fn over items, results in order; with workers > 1 up to 4 × workers items are in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="anima-cache")
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class _Writers:
    """Background cache writes; a file's writes always go to the same thread, so they stay in order."""

    def __init__(self, threads: int):
        self._queues = [queue.Queue(maxsize=32) for _ in range(max(1, threads))]
        self._threads = [threading.Thread(target=self._run, args=(q,), daemon=True) for q in self._queues]
        self._error: BaseException | None = None
        self._folders: set[Path] = set()
        for t in self._threads:
            t.start()

    def _run(self, jobs: queue.Queue) -> None:
        while (job := jobs.get()) is not None:
            path, write = job
            if self._error is None:
                try:
                    write()
                    self._folders.add(path.parent)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by check()/close()
                    self._error = exc

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, path: Path, write: Callable[[], None]) -> None:
        self.check()
        self._queues[hash(path) % len(self._queues)].put((path, write))

    def close(self) -> None:
        """Wait for every write, then make the renames durable with one fsync per folder."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self.check()
        fsync_folders(self._folders)


# ---- latents -------------------------------------------------------------------------------------


@dataclass
class _LatentItem:
    part: Any  # TrainingData
    d: int
    i: int
    key: dict
    path: Path | None  # the disk cache file


def _latent_key(e, s, ds_spec, source: ModelSource) -> dict:
    return {
        "image_sha256": e.facts.sha256,
        "bucket": list(e.placement.bucket),
        "resized": list(e.placement.resized),
        "crop_ltrb": list(crop_ltrb(e.placement.bucket, (e.facts.width, e.facts.height))),
        "flip": s.flip_aug,
        "alpha_mask": s.alpha_mask,
        "interpolation": s.resize_interpolation or ds_spec.resize_interpolation,
        "vae": source.identity,
        "dtype": source.dtype,
    }


def cache_latents(
    parts: list[Any],
    vae: Any,
    *,
    to_disk: bool,
    batch_size: int,
    device: Any,
    workers: int,
    share: Share = (0, 1),
    trust_existing: bool = False,
    progress: ProgressSink | None = None,
) -> None:
    source = as_source(vae)
    items = []
    for part in parts:
        for d, ds in enumerate(part.datasets):
            for i, e in enumerate(ds.entries):
                s = ds.spec.subsets[e.subset_index]
                path = caches.latent_cache_path(e.path, (e.facts.width, e.facts.height)) if to_disk else None
                items.append(_LatentItem(part, d, i, _latent_key(e, s, ds.spec, source), path))
    todo = items
    if to_disk:
        _remove_leftovers(items)
        todo = _reuse_checked(items, workers, progress, "check latents", partial(_latent_stale, trust=trust_existing))
        mine = _in_share([it.path for it in items], share)
        todo = [it for it in todo if it.path in mine]
    elif share[1] > 1:
        todo = [it for n, it in enumerate(items) if n % share[1] == share[0]]
    by_bucket: dict[tuple[int, int], list[_LatentItem]] = {}
    for it in todo:
        by_bucket.setdefault(it.part.datasets[it.d].entries[it.i].placement.bucket, []).append(it)
    reused = len(items) - len(todo) if to_disk else 0
    reporter = PhaseReporter(progress, "latents", len(items) if share[1] == 1 else len(todo) + reused, reused=reused)
    if todo:
        model = source.load()
        writers = _Writers(2) if to_disk else None
        try:
            with torch.no_grad():
                for bucket, bucket_items in by_bucket.items():
                    store = None if to_disk else _LatentStore(bucket_items)
                    decoded = _parallel_map(_decode_for_latents, bucket_items, workers)
                    for chunk in _chunks(decoded, batch_size):
                        _encode_latent_chunk(model, chunk, device, writers, store)
                        reporter.advance(len(chunk))
        finally:
            if writers is not None:
                writers.close()
    reporter.finish()


def _latent_stale(it: _LatentItem, trust: bool) -> str | None:
    """Why the item's cache file must be (re)built, or None (then it is recorded as cached).

    `trust` (skip_cache_check): an existing file is used without reading its key, as sd-scripts does."""
    e = it.part.datasets[it.d].entries[it.i]
    s = it.part.datasets[it.d].spec.subsets[e.subset_index]
    if trust and it.path.is_file():
        reason = stored = None
    else:
        stored = caches.stored_latent_key(it.path, e.placement.bucket, s.flip_aug)
        reason = caches.stale_reason(stored, it.key)
    if reason is None:
        it.part._latents[(it.d, it.i)] = it.path
    elif stored is not None:
        log.info("rebuilding latent cache %s: %s", it.path, reason)
    return reason


def _remove_leftovers(items: list) -> None:
    """Temporary files a killed caching run left beside the images (the finished files are intact)."""
    for folder in sorted({it.path.parent for it in items}):
        for path in clean_leftovers(folder):
            log.info("removed %s, left by an interrupted cache write", path)


def _reuse_checked(items: list, workers: int, progress: ProgressSink | None, phase: str, stale: Callable) -> list:
    """The items whose disk cache must be (re)built; `stale` records the reusable ones as it checks them."""
    reporter = PhaseReporter(progress, phase, len(items))
    todo = []
    for it, reason in zip(items, _parallel_map(stale, items, workers)):
        if reason is not None:
            todo.append(it)
        reporter.advance(1, reused=reason is None)
    reporter.finish()
    return todo


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode_for_latents(it: _LatentItem):
    """(item, plain image, mirrored image or None) or (item, exception) when the file cannot be loaded now."""
    e = it.part.datasets[it.d].entries[it.i]
    s = it.part.datasets[it.d].spec.subsets[e.subset_index]
    interp = it.key["interpolation"]
    try:
        plain = load_image(e.path, e.placement, centre_framing(e.placement), interpolation=interp, alpha_mask=s.alpha_mask)
        mirror = (
            load_image(e.path, e.placement, centre_framing(e.placement, True), interpolation=interp, alpha_mask=False)
            if s.flip_aug
            else None
        )
    except Exception as exc:  # noqa: BLE001 - a file changed or broke after the scan: drop it, keep caching
        return it, exc
    return it, (plain, mirror)


class _LatentStore:
    """One bucket's in-memory latents, mirrors and uint8 alpha masks, each in a single preallocated buffer."""

    def __init__(self, items: list[_LatentItem]):
        self.latents: Slabs | None = None
        self.alpha: Slabs | None = None
        self.rows = sum(1 + it.key["flip"] for it in items)
        self.alpha_rows = sum(it.key["alpha_mask"] for it in items)

    def add(self, latents: torch.Tensor, flipped: torch.Tensor | None, alpha: torch.Tensor | None):
        if self.latents is None:
            self.latents = Slabs(tuple(latents.shape), torch.float32, self.rows)
        plain = self.latents.add(latents[None])[0]
        mirror = None if flipped is None else self.latents.add(flipped[None])[0]
        if alpha is not None:
            if self.alpha is None:
                self.alpha = Slabs(tuple(alpha.shape), torch.uint8, self.alpha_rows)
            # alpha is uint8/255 exactly (images.load_image), so the round trip gives the same float32 values
            alpha = self.alpha.add(alpha.mul(255.0).round_().to(torch.uint8)[None])[0]
        return plain, mirror, alpha


def _encode_latent_chunk(vae: Any, chunk: list, device: Any, writers: _Writers | None, store: _LatentStore | None) -> None:
    loaded, kept = [], []
    for it, result in chunk:
        if isinstance(result, Exception):
            e = it.part.datasets[it.d].entries[it.i]
            it.part._broken.add((it.d, it.i))
            it.part._warn(f"{e.path}: skipped, cannot be loaded for latent caching ({result})")
            continue
        loaded.append(result)
        kept.append(it)
    if not loaded:
        return
    dtype = getattr(vae, "dtype", torch.float32)
    pixels = torch.stack([p.pixels for p, _ in loaded]).to(device=device, dtype=dtype)
    latents = vae.encode(pixels).float().cpu()
    mirrors = [m for _, m in loaded if m is not None]
    flipped = (
        iter(vae.encode(torch.stack([m.pixels for m in mirrors]).to(device=device, dtype=dtype)).float().cpu())
        if mirrors
        else iter(())
    )
    for n, ((plain, mirror), it) in enumerate(zip(loaded, kept)):
        flip = next(flipped) if mirror is not None else None
        if writers is not None:
            e = it.part.datasets[it.d].entries[it.i]
            writers.submit(it.path, _latent_write(it, e, latents[n], flip, plain.alpha))
            it.part._latents[(it.d, it.i)] = it.path
        else:
            it.part._latents[(it.d, it.i)] = store.add(latents[n], flip, plain.alpha)


def _latent_write(it: _LatentItem, e, latents, flipped, alpha) -> Callable[[], None]:
    def write() -> None:
        caches.store_latents(
            it.path,
            e.placement.bucket,
            it.key,
            latents,
            flipped,
            alpha,
            (e.facts.width, e.facts.height),
            tuple(it.key["crop_ltrb"]),
            sync_folder=False,
        )

    return write


# ---- text-encoder outputs ------------------------------------------------------------------------


@dataclass
class _TextItem:
    part: Any
    d: int
    i: int
    key: dict
    dropout_rate: float
    path: Path | None


def _text_stale(it: _TextItem, trust: bool) -> str | None:
    if trust and it.path.is_file():
        reason = stored = None
    else:
        stored = caches.stored_text_key(it.path)
        reason = caches.stale_reason(stored, it.key)
    if reason is None:
        it.part._text[(it.d, it.i)] = CachedText(it.key["caption"], None, it.path)
    elif stored is not None:
        log.info("rebuilding text-encoder cache %s: %s", it.path, reason)
    return reason


def cache_text(
    parts: list[Any],
    text_encoder: Any,
    *,
    to_disk: bool,
    batch_size: int,
    workers: int,
    share: Share = (0, 1),
    trust_existing: bool = False,
    progress: ProgressSink | None = None,
) -> None:
    source = as_source(text_encoder)
    items = []
    for part in parts:
        o = part.opts
        for d, ds in enumerate(part.datasets):
            for i, e in enumerate(ds.entries):
                s = ds.spec.subsets[e.subset_index]
                key = {
                    "caption": fixed_caption(s, e.caption),
                    "qwen3_max_token_length": o.qwen3_max_token_length,
                    "t5_max_token_length": o.t5_max_token_length,
                    "encoder": source.identity,
                }
                path = caches.text_cache_path(e.path) if to_disk else None
                items.append(_TextItem(part, d, i, key, s.caption_dropout_rate, path))
    todo = items
    if to_disk:
        _remove_leftovers(items)
        todo = _reuse_checked(items, workers, progress, "check text", partial(_text_stale, trust=trust_existing))
        mine = _in_share([it.path for it in items], share)
        todo = [it for it in todo if it.path in mine]
    elif share[1] > 1:
        todo = [it for n, it in enumerate(items) if n % share[1] == share[0]]
    reused = len(items) - len(todo) if to_disk else 0
    reporter = PhaseReporter(progress, "text", len(items) if share[1] == 1 else len(todo) + reused, reused=reused)
    if todo:
        encoder = source.load()
        writers = _Writers(2) if to_disk else None
        slabs: dict[tuple[int, torch.dtype], Slabs] = {}
        o = parts[0].opts
        try:
            with torch.no_grad():
                for chunk in _chunks(todo, batch_size):
                    outputs = encoder.encode([it.key["caption"] for it in chunk], o.qwen3_max_token_length, o.t5_max_token_length)
                    outputs = tuple(t.detach().cpu() for t in outputs)
                    for n, it in enumerate(chunk):
                        row = tuple(t[n] for t in outputs)
                        if writers is not None:
                            writers.submit(it.path, _text_write(it, caches.text_row(*row)))
                            it.part._text[(it.d, it.i)] = CachedText(it.key["caption"], None, it.path)
                        else:
                            states = row[0]
                            width = (states.shape[-1], states.dtype)
                            if width not in slabs:
                                slabs[width] = Slabs.of_bytes((states.shape[-1],), states.dtype)
                            compact = compact_text(*row, slabs[width])
                            it.part._text[(it.d, it.i)] = CachedText(it.key["caption"], compact, None)
                    reporter.advance(len(chunk))
        finally:
            if writers is not None:
                writers.close()
    reporter.finish()


def _text_write(it: _TextItem, row: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def write() -> None:
        caches.store_text(it.path, it.key, row, it.dropout_rate, sync_folder=False)

    return write


def refuse_uncacheable_latents(parts: list[Any]) -> None:
    refused = [
        f"{s.image_dir or s.metadata_file}: {opt}"
        for part in parts
        for ds in part.datasets
        for s in ds.spec.subsets
        for opt in ("random_crop", "color_aug")
        if getattr(s, opt)
    ]
    if refused:
        raise DatasetError(
            "Latents cannot be cached while random_crop or color_aug change every sample (" + "; ".join(refused) + "). "
            "Turn off latent caching or those options."
        )


def refuse_uncacheable_text(parts: list[Any]) -> None:
    refused = []
    for part in parts:
        for ds in part.datasets:
            for s in ds.spec.subsets:
                opts = [
                    name
                    for name, on in (
                        ("shuffle_caption", s.shuffle_caption),
                        ("token_warmup_step", s.token_warmup_step > 0),
                        ("caption_tag_dropout_rate", s.caption_tag_dropout_rate > 0),
                        ("caption_dropout_every_n_epochs", s.caption_dropout_every_n_epochs > 0),
                        ("enable_wildcard", s.enable_wildcard),
                    )
                    if on
                ]
                if opts:
                    refused.append(f"{s.image_dir or s.metadata_file}: {', '.join(opts)}")
    if refused:
        raise DatasetError(
            "Text-encoder outputs cannot be cached while captions change from sample to sample (" + "; ".join(refused) + "). "
            "Turn off text-encoder caching or those options (caption_dropout_rate alone works with caching)."
        )
