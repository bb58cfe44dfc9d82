"""The training data of a slider (``[slider]`` pairs): batches of prompt pairs instead of images.

It has the parts of TrainingData the run uses (``num_batches_per_epoch``, ``epoch_slices``, ``planned_batch_size``,
``metadata``, ``bucket_report``, no validation split), so the loop, resume and several processes work unchanged:
an epoch is every pair once, in an order fixed by (seed, epoch), planned as global batches of
``batch_size × num_processes`` pairs of which process i trains samples [i·batch_size, (i+1)·batch_size).
Each distinct prompt is encoded once (``cache_text``); batches carry the stacked outputs per role.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from anima_core.errors import DatasetError

ROLES = ("target", "neutral", "positive", "negative")


@dataclass(frozen=True)
class PairSpec:
    target: str
    neutral: str
    positive: str
    negative: str
    eta: float
    weight: float

    def prompt(self, role: str) -> str:
        return getattr(self, role)

    @property
    def label(self) -> str:
        """How warnings name the pair (in place of an image path)."""
        return f"slider pair {self.target!r} ({self.positive!r} vs {self.negative!r})"


@dataclass
class SliderBatch:
    """One process's slice of a global batch of pairs; the text outputs are on the CPU."""

    text: dict[str, tuple[torch.Tensor, ...]]  # role -> (qwen_states B×L×D, qwen_mask B×L, t5_ids B×Lt, t5_mask B×Lt)
    etas: torch.Tensor  # B
    loss_weights: torch.Tensor  # B
    latent_hw: tuple[int, int]
    pairs: list[int]  # index into the profile's pairs
    labels: list[str]
    index: int  # the batch's place in the epoch
    positions: list[int]  # each sample's place in the planned global batch; seeds its draws
    network_multiplier: float = 1.0  # the trainer's contract; a slider step sets its own strengths
    is_slider: bool = True  # the trainer hands such batches to training/slider.py


@dataclass
class SliderData:
    pairs: list[PairSpec]
    resolution: tuple[int, int]  # (width, height) in pixels
    batch_size: int
    seed: int
    num_processes: int = 1
    process_index: int = 0
    validation: None = None
    on_warning: Any = None
    datasets: list = field(default_factory=list)  # no image datasets (so no dataset network_multiplier)
    _text: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # prompt -> padded outputs

    num_train_images = 0
    num_reg_images = 0

    @property
    def prompts(self) -> list[str]:
        """Every distinct prompt of the pairs, in first-use order."""
        return list(dict.fromkeys(p.prompt(role) for p in self.pairs for role in ROLES))

    @property
    def latent_hw(self) -> tuple[int, int]:
        w, h = self.resolution
        return h // 8, w // 8

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def num_batches_per_epoch(self) -> int:
        return -(-len(self.pairs) // self.global_batch_size)

    def _plan(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([int(self.seed), int(epoch)]).permutation(len(self.pairs)).tolist()
        size = self.global_batch_size
        return [order[j : j + size] for j in range(0, len(order), size)]

    def planned_batch_size(self, epoch: int, k: int) -> int:
        return len(self._plan(epoch)[k])

    def epoch_slices(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, SliderBatch | None]]:
        """(index, this process's slice) of every global batch from ``start_batch`` on (None: an empty slice)."""
        plan = self._plan(epoch)
        for k in range(start_batch, len(plan)):
            first = self.process_index * self.batch_size
            chosen = plan[k][first : first + self.batch_size]
            yield k, (self.batch(chosen, index=k, positions=list(range(first, first + len(chosen)))) if chosen else None)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[SliderBatch]:
        return (b for _, b in self.epoch_slices(epoch, start_batch) if b is not None)

    def batch(self, pairs: list[int], *, index: int = 0, positions: list[int] | None = None) -> SliderBatch:
        if not self._text:
            raise DatasetError("the slider's prompts are not encoded yet (cache_text runs before training)")
        specs = [self.pairs[i] for i in pairs]
        text = {role: tuple(torch.stack(parts) for parts in zip(*(self._text[s.prompt(role)] for s in specs)))
                for role in ROLES}
        return SliderBatch(
            text=text, etas=torch.tensor([s.eta for s in specs], dtype=torch.float32),
            loss_weights=torch.tensor([s.weight for s in specs], dtype=torch.float32), latent_hw=self.latent_hw,
            pairs=list(pairs), labels=[s.label for s in specs], index=index,
            positions=positions if positions is not None else list(range(len(pairs))))

    # ---- caching ---------------------------------------------------------------------------------

    def cache_text(self, text_encoder, *, qwen_max_length: int, t5_max_length: int, batch_size: int = 8) -> None:
        """Encode every distinct prompt once, ``batch_size`` per encoder call; kept on the CPU, padded."""
        prompts = [p for p in self.prompts if p not in self._text]
        with torch.no_grad():
            for j in range(0, len(prompts), batch_size):
                chunk = prompts[j : j + batch_size]
                outputs = text_encoder.encode(chunk, qwen_max_length, t5_max_length)
                for k, prompt in enumerate(chunk):
                    self._text[prompt] = tuple(t[k].detach().cpu() for t in outputs)

    def cache_latents(self, *args, **kwargs) -> None:
        """No images, nothing to encode."""

    # ---- reports ---------------------------------------------------------------------------------

    def bucket_report(self) -> list[str]:
        w, h = self.resolution
        lines = [f"slider: {len(self.pairs)} prompt pair(s) at {w}x{h}, batch {self.batch_size}"
                 + (f" × {self.num_processes} processes" if self.num_processes > 1 else "")
                 + f", {self.num_batches_per_epoch} batch(es) per epoch"]
        lines += [f"  {p.label}: eta {p.eta:g}" + (f", weight {p.weight:g}" if p.weight != 1 else "")
                  + (f", neutral {p.neutral!r}" if p.neutral != p.target else "") for p in self.pairs]
        return lines

    def metadata(self) -> dict[str, str]:
        """The ss_* dataset keys sd-scripts readers expect (no images), and the pairs as ``anima_slider``."""
        w, h = self.resolution
        slider = {"resolution": [w, h], "pairs": [
            {"target": p.target, "neutral": p.neutral, "positive": p.positive, "negative": p.negative,
             "guidance_scale": p.eta, "weight": p.weight} for p in self.pairs]}
        meta = {"ss_num_train_images": 0, "ss_num_reg_images": 0, "ss_num_batches_per_epoch": self.num_batches_per_epoch,
                "ss_num_validation_images": 0, "ss_batch_size_per_device": self.batch_size,
                "ss_resolution": f"{w},{h}", "ss_dataset_dirs": "{}", "anima_slider": json.dumps(slider)}
        return {k: str(v) for k, v in meta.items()}


def pair_specs(slider_cfg) -> list[PairSpec]:
    """The profile's pairs with their defaults filled in (neutral: the target; η: slider.guidance_scale)."""
    return [PairSpec(target=p.target, neutral=p.neutral if p.neutral is not None else p.target, positive=p.positive,
                     negative=p.negative, eta=p.guidance_scale if p.guidance_scale is not None else slider_cfg.guidance_scale,
                     weight=p.weight) for p in slider_cfg.pairs]


def slider_resolution(resolution) -> tuple[int, int]:
    """(width, height) from one int or [width, height]."""
    if isinstance(resolution, int):
        return resolution, resolution
    return int(resolution[0]), int(resolution[-1])


def build_slider_data(profile, processes=None) -> SliderData:
    """The profile's slider as the run's data; ``processes``: this process's place (default: one process)."""
    return SliderData(
        pair_specs(profile.slider), resolution=slider_resolution(profile.slider.resolution),
        batch_size=profile.dataset.train_batch_size, seed=profile.training.seed,
        num_processes=processes.num_processes if processes else 1,
        process_index=processes.index if processes else 0)
