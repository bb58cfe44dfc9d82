"""The training data: checked images, epoch plans, caches and batches.

Everything random about a sample (crop, flip, colour, caption shuffle and dropout) is drawn from a generator
seeded by (seed, epoch, dataset, image, repeat), and the batch order by (seed, epoch). A run resumed at
batch k of an epoch therefore sees exactly the batches the uninterrupted run would have seen, with or
without loader workers.

With several processes, batches are planned as global batches (batch_size × num_processes samples) and each
process loads its fixed slice: process i takes samples [i·batch_size, (i+1)·batch_size) of every batch.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from anima_core.data import cache as caches
from anima_core.data import caching, parallel
from anima_core.data.caching import Exchange, Share
from anima_core.data.captions import CaptionStep, process_caption, tag_frequency
from anima_core.data.compact import CachedText, CompactText, stack_text
from anima_core.data.config import resolve_datasets
from anima_core.data.images import centre_framing, load_image, random_framing
from anima_core.data.options import DataOptions
from anima_core.data.progress import ProgressSink
from anima_core.data.scan import ImageEntry, ScannedDataset, TokenCheck, scan_dataset
from anima_core.errors import DatasetError

log = logging.getLogger(__name__)

WarningCallback = Callable[[str], None]


@dataclass
class Batch:
    latents: torch.Tensor | None  # Bx16xhxw float32, when latents are cached
    pixels: torch.Tensor | None  # Bx3xHxW in [-1, 1], when they are not
    captions: list[str]
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # cached encoder outputs
    loss_weights: torch.Tensor  # [B]: prior_loss_weight for regularisation and prior-preservation samples, else 1
    alpha_masks: torch.Tensor | None  # Bx1xHxW in [0, 1]
    paths: list[str]
    bucket: tuple[int, int]  # (w, h)
    index: int  # position in the epoch; batches whose every sample failed are left out, so count by this
    positions: list[int]  # each sample's place in the planned (global) batch; seeds its random draws
    # the dataset's network_multiplier: the LoRA is applied at this strength for this batch's forward and
    # backward. A planned batch never mixes datasets, so one value holds for all of its samples.
    network_multiplier: float = 1.0
    # [B] bool: samples of prior_preservation subsets, whose target is the base model's own prediction
    # (training/prior.py); None when the batch has none
    prior: torch.Tensor | None = None


SampleId = tuple[int, int, int]  # dataset, image entry, repeat


@dataclass
class _PlannedBatch:
    dataset: int
    bucket: tuple[int, int]
    samples: list[SampleId]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# purposes of the per-sample generators
_FLIP, _CROP, _COLOR, _CAPTION = 1, 2, 3, 4


@dataclass
class TrainingData:
    opts: DataOptions
    seed: int
    datasets: list[ScannedDataset]
    from_config: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)
    validation: TrainingData | None = None
    on_warning: WarningCallback | None = None
    _latents: dict[tuple[int, int], Any] = field(default_factory=dict)  # (dataset, entry) -> (latents, flipped, alpha) or Path
    _text: dict[tuple[int, int], CachedText] = field(default_factory=dict)
    _broken: set[tuple[int, int]] = field(default_factory=set)
    _plan_cache: tuple[int, list[_PlannedBatch]] | None = None
    _loader: DataLoader | None = None
    _sampler: _IndexSampler | None = None

    # ---- counts and reports ------------------------------------------------------------------

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def _bucket_samples(self, d: int) -> dict[tuple[int, int], list[SampleId]]:
        buckets: dict[tuple[int, int], list[SampleId]] = {}
        for i, e in enumerate(self.datasets[d].entries):
            buckets.setdefault(e.placement.bucket, []).extend((d, i, k) for k in range(e.num_repeats))
        return dict(sorted(buckets.items()))

    def _global_batch_size(self, ds: ScannedDataset) -> int:
        return ds.spec.batch_size * self.opts.num_processes

    @cached_property
    def num_batches_per_epoch(self) -> int:
        """Global batches: each is one micro-step of every process."""
        total = 0
        for d, ds in enumerate(self.datasets):
            bs = self._global_batch_size(ds)
            total += sum(-(-len(s) // bs) for s in self._bucket_samples(d).values())
        return total

    def bucket_report(self) -> list[str]:
        lines = []
        processes = self.opts.num_processes
        for d, ds in enumerate(self.datasets):
            bs = self._global_batch_size(ds)
            buckets = self._bucket_samples(d)
            samples = sum(len(s) for s in buckets.values())
            w, h = ds.spec.resolution
            size = f"{bs}" if processes == 1 else f"{bs} ({ds.spec.batch_size} per process × {processes} processes)"
            lines.append(
                f"dataset {d + 1}: resolution {w}x{h}, batch size {size}, {len(ds.entries)} images, {samples} samples per epoch "
                f"(with repeats), {len(buckets)} bucket(s)"
            )
            for (bw, bh), s in buckets.items():
                lines.append(f"  bucket {bw}x{bh}: {len(s)} samples, {-(-len(s) // bs)} batch(es)")
            for (bw, bh), s in buckets.items():
                if len(s) < bs:
                    lines.append(
                        f"  warning: bucket {bw}x{bh} has {len(s)} sample(s), fewer than the batch size {bs}; its batches are smaller"
                    )
            if ds.spec.enable_bucket and ds.entries:
                error = float(np.mean([abs(e.placement.ar_error) for e in ds.entries]))
                lines.append(f"  mean aspect-ratio error: {error:.4f}")
        return lines

    def _bucket_info(self, ds: ScannedDataset, d: int) -> dict | None:
        if not ds.spec.enable_bucket:
            return None
        buckets = {i: {"resolution": list(reso), "count": len(s)} for i, (reso, s) in enumerate(self._bucket_samples(d).items())}
        error = float(np.mean([abs(e.placement.ar_error) for e in ds.entries])) if ds.entries else 0.0
        return {"buckets": buckets, "mean_img_ar_error": error}

    def metadata(self) -> dict[str, str]:
        """Dataset `ss_*` keys as sd-scripts writes them (spec §8.1); every value a string."""
        meta: dict[str, Any] = {
            "ss_num_train_images": self.num_train_images,
            "ss_num_reg_images": self.num_reg_images,
            "ss_num_batches_per_epoch": self.num_batches_per_epoch,
            "ss_num_validation_images": self.validation.num_train_images if self.validation else 0,
            "ss_validation_seed": self.opts.validation_seed,
            "ss_validation_split": self.opts.validation_split,
            "ss_resize_interpolation": self.opts.resize_interpolation,
        }
        if self.from_config:
            datasets_meta, tags, dirs = [], {}, {}
            for d, ds in enumerate(self.datasets):
                subsets_meta = []
                for sub in ds.subsets:
                    s = sub.spec
                    sm: dict[str, Any] = {
                        "img_count": sub.img_count,
                        "num_repeats": s.num_repeats,
                        "color_aug": s.color_aug,
                        "flip_aug": s.flip_aug,
                        "random_crop": s.random_crop,
                        "shuffle_caption": s.shuffle_caption,
                        "keep_tokens": s.keep_tokens,
                        "keep_tokens_separator": s.keep_tokens_separator,
                        "secondary_separator": s.secondary_separator,
                        "enable_wildcard": s.enable_wildcard,
                        "caption_prefix": s.caption_prefix,
                        "caption_suffix": s.caption_suffix,
                        "resize_interpolation": s.resize_interpolation,
                    }
                    if s.prior_preservation:
                        sm["prior_preservation"] = True
                    name = None
                    if s.image_dir is not None:
                        sm["image_dir"] = name = s.image_dir.name
                    if ds.spec.is_dreambooth:
                        sm["class_tokens"] = s.class_tokens
                        sm["is_reg"] = s.is_reg
                        if s.is_reg:
                            name = None
                    else:
                        sm["metadata_file"] = name = s.metadata_file.name
                    subsets_meta.append(sm)
                    if name is not None:
                        unique, n = name, 2
                        while unique in dirs:
                            unique, n = f"{name} ({n})", n + 1
                        dirs[unique] = {"n_repeats": s.num_repeats, "img_count": sub.img_count}
                freq = {k: tag_frequency(v) for k, v in ds.tag_frequency.items()}
                datasets_meta.append(
                    {
                        "is_dreambooth": ds.spec.is_dreambooth,
                        "batch_size_per_device": ds.spec.batch_size,
                        "num_train_images": ds.num_train_images,
                        "num_reg_images": ds.num_reg_images,
                        "resolution": list(ds.spec.resolution),
                        "enable_bucket": ds.spec.enable_bucket,
                        "min_bucket_reso": ds.spec.min_bucket_reso if ds.spec.enable_bucket else None,
                        "max_bucket_reso": ds.spec.max_bucket_reso if ds.spec.enable_bucket else None,
                        "tag_frequency": freq,
                        "bucket_info": self._bucket_info(ds, d),
                        "resize_interpolation": ds.spec.resize_interpolation,
                        "subsets": subsets_meta,
                    }
                )
                for k, v in freq.items():
                    tags.setdefault(k, v)
            meta.update(
                ss_datasets=json.dumps(datasets_meta), ss_tag_frequency=json.dumps(tags), ss_dataset_dirs=json.dumps(dirs)
            )
        else:
            ds = self.datasets[0]
            dirs, reg_dirs = {}, {}
            for sub in ds.subsets:
                s = sub.spec
                target = reg_dirs if s.is_reg else dirs
                target[(s.image_dir if s.is_dreambooth else s.metadata_file).name] = {
                    "n_repeats": s.num_repeats,
                    "img_count": sub.img_count,
                }
            o = self.opts
            meta.update(
                ss_batch_size_per_device=ds.spec.batch_size,
                ss_resolution=f"{ds.spec.resolution[0]},{ds.spec.resolution[1]}",
                ss_color_aug=o.color_aug,
                ss_flip_aug=o.flip_aug,
                ss_random_crop=o.random_crop,
                ss_shuffle_caption=o.shuffle_caption,
                ss_enable_bucket=ds.spec.enable_bucket,
                ss_bucket_no_upscale=ds.spec.enable_bucket and ds.spec.bucket_no_upscale,
                ss_min_bucket_reso=ds.spec.min_bucket_reso if ds.spec.enable_bucket else None,
                ss_max_bucket_reso=ds.spec.max_bucket_reso if ds.spec.enable_bucket else None,
                ss_keep_tokens=o.keep_tokens,
                ss_dataset_dirs=json.dumps(dirs),
                ss_reg_dataset_dirs=json.dumps(reg_dirs),
                ss_tag_frequency=json.dumps({k: tag_frequency(v) for k, v in ds.tag_frequency.items()}),
                ss_bucket_info=json.dumps(self._bucket_info(ds, 0)),
            )
        return {k: str(v) for k, v in meta.items()}

    # ---- warnings ----------------------------------------------------------------------------

    def _warn(self, message: str) -> None:
        # One place reports each warning: the caller's callback (the run prints it), else the log.
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            log.warning(message)

    def __getstate__(self) -> dict:
        # loader workers get the data, never the callbacks or the loader itself
        state = dict(self.__dict__)
        state.update(on_warning=None, _loader=None, validation=None)
        return state

    # ---- caching -----------------------------------------------------------------------------

    def _all_parts(self) -> list[TrainingData]:
        parts = [self] + ([self.validation] if self.validation else [])
        for part in parts:
            # loader workers hold a copy of the caches; new ones are started after caching changes them
            part._loader = None
        return parts

    def cache_latents(
        self,
        vae: Any,
        *,
        to_disk: bool,
        batch_size: int,
        device: Any,
        workers: int | None = None,
        share: Share = (0, 1),
        exchange: Exchange | None = None,
        trust_existing: bool = False,
        progress: ProgressSink | None = None,
    ) -> None:
        """Encode every image (and its mirror with flip_aug) once per bucket, `batch_size` images per VAE call.

        `vae`: the model, or a `caching.ModelSource` that loads it only if something is left to encode.
        `workers`: threads decoding images and checking disk caches (default: the CPUs; 0 or 1: none).
        `share`: (rank, world_size), this process's part of the work (see `caching`); in memory, `exchange`
        (the processes' all-gather) then hands every process the others' parts.
        `trust_existing` (skip_cache_check): an existing disk cache file is used without checking its key.
        """
        parts = self._all_parts()
        caching.refuse_uncacheable_latents(parts)
        caching.cache_latents(
            parts, vae, to_disk=to_disk, batch_size=batch_size, device=device,
            workers=parallel.default_workers() if workers is None else workers, share=share,
            exchange=exchange, trust_existing=trust_existing, progress=progress,
        )

    def cache_text(
        self,
        text_encoder: Any,
        *,
        to_disk: bool,
        batch_size: int,
        workers: int | None = None,
        share: Share = (0, 1),
        exchange: Exchange | None = None,
        trust_existing: bool = False,
        progress: ProgressSink | None = None,
    ) -> None:
        """Encode every caption once; caption dropout then swaps in the empty-caption outputs per sample.

        In memory, each caption's outputs are kept compact (`compact.CompactText`); batches get them padded."""
        parts = self._all_parts()
        caching.refuse_uncacheable_text(parts)
        caching.cache_text(
            parts, text_encoder, to_disk=to_disk, batch_size=batch_size,
            workers=parallel.default_workers() if workers is None else workers, share=share,
            exchange=exchange, trust_existing=trust_existing, progress=progress,
        )

    # ---- epochs and batches ------------------------------------------------------------------

    def _plan(self, epoch: int) -> list[_PlannedBatch]:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = _rng(self.seed, epoch)
        batches: list[_PlannedBatch] = []
        for d, ds in enumerate(self.datasets):
            bs = self._global_batch_size(ds)
            for bucket, samples in self._bucket_samples(d).items():
                order = [samples[j] for j in rng.permutation(len(samples))]
                batches += [_PlannedBatch(d, bucket, order[j : j + bs]) for j in range(0, len(order), bs)]
        plan = [batches[j] for j in rng.permutation(len(batches))]
        self._plan_cache = (epoch, plan)
        return plan

    def _caption_step(self, epoch: int, k: int) -> CaptionStep:
        return CaptionStep(epoch + 1, epoch * self.num_batches_per_epoch + k, self.opts.max_train_steps)

    def _text_for(self, key: tuple[int, int]) -> CompactText | tuple[torch.Tensor, ...]:
        cached = self._text[key]
        return cached.outputs if cached.outputs is not None else caches.load_text(cached.path)

    def _latents_for(self, key: tuple[int, int], entry: ImageEntry, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        cached = self._latents[key]
        if isinstance(cached, Path):
            return caches.load_latents(cached, entry.placement.bucket, flip)
        latents, flipped, alpha = cached  # alpha: uint8 in memory, as images.read_image reads it
        return (flipped if flip else latents), None if alpha is None else alpha.float().div_(255.0)

    def load_batch(self, epoch: int, k: int) -> tuple[Batch | None, list[tuple[tuple[int, int], str]]]:
        """This process's slice of batch k of an epoch (0-based epoch), and the samples that had to be dropped
        with the reason. The batch is None when no sample of the slice could be loaded (or the slice is empty)."""
        planned = self._plan(epoch)[k]
        ds = self.datasets[planned.dataset]
        at = self._caption_step(epoch, k)
        failures: list[tuple[tuple[int, int], str]] = []
        pixels, latents, alphas, captions, texts, weights, paths, positions, prior = [], [], [], [], [], [], [], [], []
        use_alpha = any(ds.spec.subsets[ds.entries[i].subset_index].alpha_mask for _, i, _ in planned.samples)
        first = self.opts.process_index * ds.spec.batch_size
        for position, (d, i, rep) in enumerate(planned.samples[first : first + ds.spec.batch_size], start=first):
            e = ds.entries[i]
            s = ds.spec.subsets[e.subset_index]
            key = (d, i)
            if key in self._broken:
                continue
            flip = s.flip_aug and _rng(self.seed, epoch, d, i, rep, _FLIP).random() < 0.5
            try:
                if key in self._latents:
                    lat, alpha = self._latents_for(key, e, flip)
                    if alpha is not None and flip:
                        alpha = alpha.flip(-1)
                    latents.append(lat.float())
                else:
                    if s.random_crop:
                        framing = random_framing(e.placement, _rng(self.seed, epoch, d, i, rep, _CROP), flip)
                    else:
                        framing = centre_framing(e.placement, flip)
                    color = _rng(self.seed, epoch, d, i, rep, _COLOR) if s.color_aug else None
                    interp = s.resize_interpolation or ds.spec.resize_interpolation
                    img = load_image(e.path, e.placement, framing, interpolation=interp, alpha_mask=s.alpha_mask, color_rng=color)
                    pixels.append(img.pixels)
                    alpha = img.alpha
                if key in self._text:
                    text = self._text_for(key)
                    dropped = (
                        s.caption_dropout_rate > 0
                        and _rng(self.seed, epoch, d, i, rep, _CAPTION).random() < s.caption_dropout_rate
                    )
                    if dropped:
                        text = text.emptied() if isinstance(text, CompactText) else caches.empty_text_like(text)
                    texts.append(text)
                    captions.append("" if dropped else self._text[key].caption)
                else:
                    captions.append(process_caption(s, e.caption, at, _rng(self.seed, epoch, d, i, rep, _CAPTION)))
            except Exception as exc:  # noqa: BLE001 - never end a run on one bad file: drop the sample and say so
                self._broken.add(key)
                failures.append((key, f"{e.path}: skipped from now on, cannot be loaded ({exc})"))
                del latents[len(paths) :], pixels[len(paths) :], texts[len(paths) :], captions[len(paths) :]
                continue
            if use_alpha:
                h, w = planned.bucket[1], planned.bucket[0]
                alphas.append(alpha if alpha is not None else torch.ones(1, h, w))
            weights.append(self.opts.prior_loss_weight if e.is_reg or s.prior_preservation else 1.0)
            prior.append(s.prior_preservation)
            paths.append(str(e.path))
            positions.append(position)
        if not paths:
            return None, failures
        batch = Batch(
            latents=torch.stack(latents) if latents else None,
            pixels=torch.stack(pixels) if pixels else None,
            captions=captions,
            text=stack_text(texts) if texts else None,
            loss_weights=torch.tensor(weights, dtype=torch.float32),
            alpha_masks=torch.stack(alphas) if alphas else None,
            paths=paths,
            bucket=planned.bucket,
            index=k,
            positions=positions,
            network_multiplier=float(ds.spec.network_multiplier),
            prior=torch.tensor(prior) if any(prior) else None,
        )
        return batch, failures

    def planned_batch_size(self, epoch: int, k: int) -> int:
        """Samples planned for global batch k of an epoch, over all processes."""
        return len(self._plan(epoch)[k].samples)

    def epoch_slices(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, Batch | None]]:
        """(index, this process's slice) for every batch of one epoch (0-based) from `start_batch` on; the
        slice is None when none of its samples could be loaded or it has none (the last batch of a bucket)."""
        indices = [(epoch, k) for k in range(start_batch, self.num_batches_per_epoch)]
        if self.opts.max_data_loader_n_workers <= 0:
            results: Iterator = (self.load_batch(e, k) for e, k in indices)
        else:
            results = iter(self._data_loader(indices))
        for (_, k), (batch, failures) in zip(indices, results):
            for key, message in failures:
                # workers hold copies of the data; record the broken file here as well
                self._broken.add(key)
                self._warn(message)
            yield k, batch

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch (0-based), from `start_batch` on. A batch whose every sample failed is left out."""
        return (batch for _, batch in self.epoch_slices(epoch, start_batch) if batch is not None)

    def _data_loader(self, indices: list[tuple[int, int]]) -> DataLoader:
        if self._loader is None or not self.opts.persistent_data_loader_workers:
            self._sampler = _IndexSampler()
            self._loader = DataLoader(
                _Batches(self),
                batch_size=None,
                sampler=self._sampler,
                num_workers=self.opts.max_data_loader_n_workers,
                persistent_workers=self.opts.persistent_data_loader_workers,
                collate_fn=_as_is,
            )
        self._sampler.indices = indices
        return self._loader


def _as_is(item: Any) -> Any:
    return item


class _IndexSampler(Sampler):
    def __init__(self) -> None:
        self.indices: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(list(self.indices))

    def __len__(self) -> int:
        return len(self.indices)


class _Batches(Dataset):
    def __init__(self, data: TrainingData):
        self.data = data

    def __getitem__(self, index: tuple[int, int]):
        return self.data.load_batch(*index)

    def __len__(self) -> int:
        return self.data.num_batches_per_epoch


def build_training_data(
    opts: DataOptions,
    *,
    base_dir: Path,
    tokenizer: Any = None,
    t5_tokenizer: Any = None,
    on_warning: WarningCallback | None = None,
    progress: ProgressSink | None = None,
    decode: bool = True,
) -> TrainingData:
    """Resolve the datasets, then read and check every image and caption (before any model loads).

    `tokenizer` (Qwen3) and `t5_tokenizer` are optional; with them, captions longer than the token limits are
    reported. Bad images are skipped with a summary (bad_image_policy "skip") or all listed in one DatasetError.
    `decode=False` reads only image headers (for estimates: the data cannot be cached or trained on).
    """
    base_dir = Path(base_dir)
    specs, from_config = resolve_datasets(opts, base_dir)
    if any(0 < s.token_warmup_step < 1 for ds in specs for s in ds.subsets) and opts.max_train_steps is None:
        raise DatasetError("token_warmup_step below 1 is a fraction of the training steps, so max_train_steps must be given.")
    seed = opts.seed if opts.seed is not None else random.randrange(2**31)
    tokens = TokenCheck(tokenizer, opts.qwen3_max_token_length, t5_tokenizer, opts.t5_max_token_length)
    problems: list[tuple[Path, str]] = []
    warnings: list[str] = []
    workers = parallel.default_workers()

    def warn(message: str) -> None:
        warnings.append(message)

    def scan(training: bool) -> list[ScannedDataset]:
        return [
            scan_dataset(
                s, training=training, seed=seed, tokens=tokens, problems=problems, warn=warn, workers=workers, progress=progress,
                decode=decode,
            )
            for s in specs
        ]

    datasets = scan(True)
    validation_sets = scan(False) if any(s.validation_split > 0 for s in specs) else None
    if problems and opts.bad_image_policy == "error":
        listing = "\n".join(f"  - {p}: {reason}" for p, reason in problems)
        raise DatasetError(
            f'{len(problems)} image(s) or caption(s) cannot be used (bad_image_policy = "error"):\n{listing}\n'
            'Fix or remove them, or set bad_image_policy = "skip" to train without them.'
        )
    data = TrainingData(opts, seed, datasets, from_config, skipped=[(str(p), r) for p, r in problems], on_warning=on_warning)
    if validation_sets is not None:
        val_seed = opts.validation_seed if opts.validation_seed is not None else seed
        # evaluated whole by the main process, never divided among processes
        whole = replace(opts, num_processes=1, process_index=0)
        data.validation = TrainingData(whole, val_seed, validation_sets, from_config, on_warning=on_warning)
    for message in warnings:
        data._warn(message)
    if problems:
        shown = "\n".join(f"  - {p}: {reason}" for p, reason in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        data._warn(f"skipped {len(problems)} image(s) that cannot be used:\n{shown}{more}")
    if data.num_batches_per_epoch == 0:
        raise DatasetError("The dataset has no usable images. Check image_dir / train_data_dir and the skipped-image list above.")
    return data
