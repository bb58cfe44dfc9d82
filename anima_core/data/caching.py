"""Encoding every image and caption once: reuse checks, parallel decoding, batched encodes, background writes.

The pipeline for latents: the reuse check reads only the key of each existing cache file (in threads); what
is left is grouped by bucket; worker threads decode, resize and crop the images in order while the main
thread encodes them `batch_size` at a time; disk writes go to writer threads, one file's writes always to
the same thread, with each file fsynced before its rename and each folder fsynced once at the end. Models are
loaded only when something is left to encode.

Multi-process training divides the work with `share=(rank, world_size)`: a process encodes only the cache
files whose index (in a fixed order of files) is `rank` modulo `world_size`, so no file is written twice.
In-memory caches are divided the same way over the fixed order of entries, and `exchange` (the processes'
all-gather, `Processes.exchange`) hands every encode batch to every process as soon as it is encoded, so
each process ends with every entry, bit for bit what it received (see `_in_step`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anima_core.atomic import clean_leftovers, fsync_folders
from anima_core.data import cache as caches
from anima_core.data.buckets import crop_ltrb
from anima_core.data.captions import fixed_caption
from anima_core.data.compact import CachedText, CompactText, Slabs, compact_text
from anima_core.data.images import centre_framing, read_image, to_alpha, to_pixels
from anima_core.data.parallel import chunks, parallel_map
from anima_core.data.progress import PhaseReporter, ProgressSink
from anima_core.errors import DatasetError

log = logging.getLogger(__name__)

Share = tuple[int, int]  # (rank, world_size)
Exchange = Callable[[Any], list]  # this process's payload in, every process's payload (in rank order) out


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


def _my_entries(items: list, share: Share, exchange: Exchange | None) -> list:
    """In-memory caching divided among processes: every world-th entry of the fixed order, as for disk files."""
    if exchange is None:
        raise ValueError("in-memory caching divided among processes needs `exchange` to hand the shares around")
    return [it for n, it in enumerate(items) if n % share[1] == share[0]]


def _in_step(items: list, rounds: Iterator[list], exchange: Exchange, keep: Callable[[Any, Any], None],
             reporter: PhaseReporter, rank: int) -> None:
    """Encode this process's share batch by batch in step with the other processes: each round, every process
    hands in what it encoded since the last one as [(index in `items`, result), ...] (None once it has
    finished), gets everyone's, and keeps the others' results (its own were kept as they were encoded).
    The rounds end when every process has finished; the reporter counts every process's entries, so the
    main process reports the global count, and `new_by_process` says who encoded how many.

    Why object collectives, one encode batch a round: they work unchanged on gloo and on NCCL (torch stages
    the pickled bytes through the current CUDA device, which accelerate's PartialState sets per process),
    while tensor collectives would need same-shaped tensors on the backend's device (cached rows differ in
    shape and dtype from bucket to bucket and caption to caption, and are kept on the CPU). One encode
    batch a round bounds each pickle by what `batch_size` already bounds (a few MB to tens of MB), so a
    large dataset never needs one huge pickle, and the counts are global while encoding goes on. Results
    are pickled tensors that own their data (`.clone()`): a view would carry its whole buffer."""
    counts = reporter.by_process
    mine = iter(rounds)
    while True:
        payload = next(mine, None)
        gathered = exchange(payload)
        if all(p is None for p in gathered):
            return
        for r, results in enumerate(gathered):
            for n, result in results or ():
                if r != rank:
                    keep(items[n], result)
            counts[r] += len(results or ())
        reporter.advance(sum(len(results or ()) for results in gathered))


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


def latent_items(parts: list[Any], source: ModelSource, *, to_disk: bool) -> list[_LatentItem]:
    """Every image of `parts` to cache, with its cache key (and its disk cache file when `to_disk`)."""
    items = []
    for part in parts:
        for d, ds in enumerate(part.datasets):
            for i, e in enumerate(ds.entries):
                s = ds.spec.subsets[e.subset_index]
                path = caches.latent_cache_path(e.path, (e.facts.width, e.facts.height)) if to_disk else None
                items.append(_LatentItem(part, d, i, _latent_key(e, s, ds.spec, source), path))
    return items


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
    exchange: Exchange | None = None,
    trust_existing: bool = False,
    progress: ProgressSink | None = None,
) -> None:
    """`exchange`: with `share` and in memory, how the processes hand each other their encoded entries."""
    source = as_source(vae)
    items = latent_items(parts, source, to_disk=to_disk)
    todo = items
    if to_disk:
        _remove_leftovers(items)
        todo = _reuse_checked(items, workers, progress, "check latents", partial(_latent_stale, trust=trust_existing))
        mine = _in_share([it.path for it in items], share)
        todo = [it for it in todo if it.path in mine]
    elif share[1] > 1:
        todo = _my_entries(items, share, exchange)
    by_bucket = _by_bucket(todo)
    # in memory, one buffer per bucket sized for all its entries, whichever process encodes them
    stores = None if to_disk else {bucket: _LatentStore(its) for bucket, its in _by_bucket(items).items()}
    reporter = _reporter(progress, "latents", items, todo, to_disk, share)

    def keep(it: _LatentItem, result, writers: _Writers | None = None) -> None:
        if isinstance(result, str):
            _latent_broken(it, result)
        elif writers is not None:
            e = it.part.datasets[it.d].entries[it.i]
            writers.submit(it.path, _latent_write(it, e, *result))
            it.part._latents[(it.d, it.i)] = it.path
        else:
            bucket = it.part.datasets[it.d].entries[it.i].placement.bucket
            it.part._latents[(it.d, it.i)] = stores[bucket].add(*result)

    def encoded(writers: _Writers | None) -> Iterator[list]:
        """[(item, result), ...] per encode batch, each result kept as it comes."""
        model = source.load()
        for bucket_items in by_bucket.values():
            decoded = parallel_map(_decode_for_latents, bucket_items, workers, chunk=4)
            for chunk in chunks(decoded, batch_size):
                results = _encode_latent_chunk(model, chunk, device, in_memory=not to_disk)
                for it, result in results:
                    keep(it, result, writers)
                yield results

    _encode_all(items, todo, encoded, to_disk=to_disk, share=share, exchange=exchange, keep=keep, reporter=reporter)


def _reporter(progress: ProgressSink | None, phase: str, items: list, todo: list, to_disk: bool,
              share: Share) -> PhaseReporter:
    """Counts the encoding phase: every entry, or (caching to disk, divided) this process's share and what
    is reused; in memory, divided, every process's entries."""
    reused = len(items) - len(todo) if to_disk else 0
    in_step = not to_disk and share[1] > 1
    total = len(items) if share[1] == 1 or in_step else len(todo) + reused
    return PhaseReporter(progress, phase, total, reused=reused, world=share[1] if in_step else 1)


def _encode_all(items: list, todo: list, encoded: Callable[[_Writers | None], Iterator[list]], *, to_disk: bool,
                share: Share, exchange: Exchange | None, keep: Callable[[Any, Any], None],
                reporter: PhaseReporter) -> None:
    """Run this process's encode batches (`encoded(writers)`, each kept as it comes) to their end: in step
    with the other processes when an in-memory cache is divided, else alone, with background disk writes."""
    def mine(writers: _Writers | None) -> Iterator[list]:
        return encoded(writers) if todo else iter(())  # the model loads only for something to encode

    with torch.no_grad():
        if not to_disk and share[1] > 1:
            index = {id(it): n for n, it in enumerate(items)}
            rounds = ([(index[id(it)], _owned(result)) for it, result in results] for results in mine(None))
            _in_step(items, rounds, exchange, keep, reporter, share[0])
        else:
            writers = _Writers(2) if to_disk and todo else None
            try:
                for results in mine(writers):
                    reporter.advance(len(results))
            finally:
                if writers is not None:
                    writers.close()
    reporter.finish()


def _by_bucket(items: list[_LatentItem]) -> dict[tuple[int, int], list[_LatentItem]]:
    by_bucket: dict[tuple[int, int], list[_LatentItem]] = {}
    for it in items:
        by_bucket.setdefault(it.part.datasets[it.d].entries[it.i].placement.bucket, []).append(it)
    return by_bucket


def _owned(result):
    """A result to send: tensors that own their memory (a pickled view would carry its whole buffer)."""
    if isinstance(result, str):
        return result
    if isinstance(result, CompactText):
        return replace(result, **{f: getattr(result, f).clone() for f in ("states", "mask", "t5_ids", "t5_mask")})
    return tuple(None if t is None else t.clone() for t in result)


def _latent_broken(it: _LatentItem, message: str) -> None:
    it.part._broken.add((it.d, it.i))
    it.part._warn(message)


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
    for it, reason in zip(items, parallel_map(stale, items, workers, chunk=32)):
        if reason is not None:
            todo.append(it)
        reporter.advance(1, reused=reason is None)
    reporter.finish()
    return todo


def _decode_for_latents(it: _LatentItem):
    """(item, image as uint8) or (item, exception) when the file cannot be loaded now. The mirror (flip_aug) is
    this image flipped: the centre crop is symmetric, so it equals decoding again with the flip."""
    e = it.part.datasets[it.d].entries[it.i]
    s = it.part.datasets[it.d].spec.subsets[e.subset_index]
    try:
        return it, read_image(e.path, e.placement, centre_framing(e.placement), interpolation=it.key["interpolation"],
                              alpha_mask=s.alpha_mask)
    except Exception as exc:  # noqa: BLE001 - a file changed or broke after the scan: drop it, keep caching
        return it, exc


class _LatentStore:
    """One bucket's in-memory latents, mirrors and uint8 alpha masks, each in a single preallocated buffer."""

    def __init__(self, items: list[_LatentItem]):
        self.latents: Slabs | None = None
        self.alpha: Slabs | None = None
        self.rows = sum(1 + it.key["flip"] for it in items)
        self.alpha_rows = sum(it.key["alpha_mask"] for it in items)

    def add(self, latents: torch.Tensor, flipped: torch.Tensor | None, alpha: torch.Tensor | None):
        """`alpha`: the uint8 mask, as `images.read_image` reads it."""
        if self.latents is None:
            self.latents = Slabs(tuple(latents.shape), torch.float32, self.rows)
        plain = self.latents.add(latents[None])[0]
        mirror = None if flipped is None else self.latents.add(flipped[None])[0]
        if alpha is not None:
            if self.alpha is None:
                self.alpha = Slabs(tuple(alpha.shape), torch.uint8, self.alpha_rows)
            alpha = self.alpha.add(alpha[None])[0]
        return plain, mirror, alpha


def _encode_latent_chunk(vae: Any, chunk: list, device: Any, *, in_memory: bool) -> list[tuple[_LatentItem, Any]]:
    """(item, (latents, mirrored latents or None, alpha or None)) per image, or (item, warning) for an image
    that cannot be loaded. In memory, alpha is the uint8 mask (`_LatentStore`); for disk, float32.

    The batch goes to the device as uint8 and becomes [-1, 1] floats there (`images.to_pixels`, the same
    arithmetic as training's loader): a quarter of the bytes to copy, and no float work for the CPU."""
    results, loaded, kept = [], [], []
    for it, result in chunk:
        if isinstance(result, Exception):
            e = it.part.datasets[it.d].entries[it.i]
            results.append((it, f"{e.path}: skipped, cannot be loaded for latent caching ({result})"))
            continue
        loaded.append(result)
        kept.append(it)
    if not loaded:
        return results
    dtype = getattr(vae, "dtype", torch.float32)
    rgb = torch.from_numpy(np.stack([image.rgb for image in loaded])).to(device)
    latents = vae.encode(to_pixels(rgb).to(dtype)).float().cpu()
    mirrored = [n for n, it in enumerate(kept) if it.key["flip"]]
    flipped = iter(vae.encode(to_pixels(rgb[mirrored].flip(-2)).to(dtype)).float().cpu()) if mirrored else iter(())
    for n, (image, it) in enumerate(zip(loaded, kept)):
        flip = next(flipped) if it.key["flip"] else None
        alpha = None if image.alpha is None else torch.from_numpy(image.alpha)
        if alpha is not None:  # 1xHxW: uint8 in memory (the float values are exactly bytes / 255), float on disk
            alpha = alpha.unsqueeze(0) if in_memory else to_alpha(alpha)
        results.append((it, (latents[n], flip, alpha)))
    return results


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
    exchange: Exchange | None = None,
    trust_existing: bool = False,
    progress: ProgressSink | None = None,
) -> None:
    """`exchange`: with `share` and in memory, how the processes hand each other their encoded entries."""
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
        todo = _my_entries(items, share, exchange)
    reporter = _reporter(progress, "text", items, todo, to_disk, share)
    slabs: dict[tuple[int, torch.dtype], Slabs] = {}

    def slab_for(states: torch.Tensor) -> Slabs:
        width = (states.shape[-1], states.dtype)
        if width not in slabs:
            slabs[width] = Slabs.of_bytes((states.shape[-1],), states.dtype)
        return slabs[width]

    def keep(it: _TextItem, compact: CompactText) -> None:  # another process's entry
        compact = replace(compact, states=slab_for(compact.states).add(compact.states))
        it.part._text[(it.d, it.i)] = CachedText(it.key["caption"], compact, None)

    def encoded(writers: _Writers | None) -> Iterator[list]:
        """[(item, CompactText or None when written to disk), ...] per encode batch, each kept as it comes."""
        encoder = source.load()
        o = parts[0].opts
        for chunk in chunks(todo, batch_size):
            outputs = encoder.encode([it.key["caption"] for it in chunk], o.qwen3_max_token_length, o.t5_max_token_length)
            outputs = tuple(t.detach().cpu() for t in outputs)
            results = []
            for n, it in enumerate(chunk):
                row = tuple(t[n] for t in outputs)
                if writers is not None:
                    writers.submit(it.path, _text_write(it, caches.text_row(*row)))
                    it.part._text[(it.d, it.i)] = CachedText(it.key["caption"], None, it.path)
                    results.append((it, None))
                else:
                    compact = compact_text(*row, slab_for(row[0]))
                    it.part._text[(it.d, it.i)] = CachedText(it.key["caption"], compact, None)
                    results.append((it, compact))
            yield results

    _encode_all(items, todo, encoded, to_disk=to_disk, share=share, exchange=exchange, keep=keep, reporter=reporter)


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
