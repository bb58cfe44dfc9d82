"""In-memory caches as compact tensors packed into a few large buffers.

Two things made in-memory caching of 20,000 images run out of memory: every cached tensor was its own
allocation (tens of thousands of 100 KB-2 MB blocks fragment the C heap, so RSS grew well past the data),
and text-encoder states were kept as float32 padded to the maximum token length. Here:

- `Slabs` copies rows of one shape and dtype into preallocated buffers and hands out views, so the caches
  are a few large allocations whose size is known in advance;
- `CompactText` keeps a caption's states only up to its last real token, in the dtype the encoder produced
  (bf16 when it ran in bf16), and rebuilds the padded rows on the way out. The dropped tail is checked to
  be exactly what is rebuilt (zero states and mask, one repeated T5 pad id), so a batch is bit-equal to
  one made from the padded float32 outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SLAB_BYTES = 64 * 2**20  # text states: rows are appended until a 64 MiB buffer is full, then a new one starts
OVERHEAD_BYTES = 1024  # per cached entry: the Python objects and tensor headers around the data


class Slabs:
    """Rows of one shape and dtype, stored in few large buffers; `add` returns a view into one of them."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, rows_per_slab: int):
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.rows_per_slab = max(1, rows_per_slab)
        self._slabs: list[torch.Tensor] = []
        self._used = 0

    @classmethod
    def of_bytes(cls, row_shape: tuple[int, ...], dtype: torch.dtype, slab_bytes: int = SLAB_BYTES) -> Slabs:
        row_bytes = max(1, torch.Size(row_shape).numel() * torch.empty((), dtype=dtype).element_size())
        return cls(row_shape, dtype, slab_bytes // row_bytes)

    def add(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])} do not fit slabs of {self.row_shape}")
        if not self._slabs or self._used + n > self._slabs[-1].shape[0]:
            self._slabs.append(torch.empty((max(n, self.rows_per_slab), *self.row_shape), dtype=self.dtype))
            self._used = 0
        view = self._slabs[-1][self._used : self._used + n]
        view.copy_(rows)
        self._used += n
        return view

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._slabs)


def _trailing_start(keep: torch.Tensor) -> int:
    """Length up to and including the last True of a 1-D bool tensor (0 when none)."""
    nonzero = keep.nonzero()
    return int(nonzero[-1, 0]) + 1 if len(nonzero) else 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as integers: 0 only for +0.0 (-0.0 is kept, so rebuilding is bit-exact);
    comparing integers is also several times faster than comparing bf16 on a CPU."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _any_bits(t: torch.Tensor) -> bool:
    """Whether any bit of a contiguous tensor is set (read 8 bytes at a time when the size allows: ~4x faster)."""
    flat = t.contiguous().view(-1).view(torch.uint8)
    if flat.numel() % 8 == 0:
        flat = flat.view(torch.int64)
    return bool(torch.count_nonzero(flat))


def _small_int(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` in a narrower integer dtype when every value fits (exact), else unchanged."""
    info = torch.iinfo(dtype)
    if values.numel() == 0 or (int(values.min()) >= info.min and int(values.max()) <= info.max):
        return values.to(dtype)
    return values


@dataclass
class CompactText:
    """One caption's encoder outputs without their padded tail (see the module docstring)."""

    states: torch.Tensor  # n×D, the encoder's dtype
    mask: torch.Tensor  # n
    t5_ids: torch.Tensor  # m
    t5_mask: torch.Tensor  # m
    length: int  # L, the padded Qwen length
    t5_length: int  # Lt
    t5_pad: int  # the id filling the T5 tail

    def expand(self) -> tuple[torch.Tensor, ...]:
        """The padded outputs as `cache.text_row` gives them: float32 L×D, int64 L, int64 Lt, int64 Lt."""
        return tuple(t[0] for t in stack_text([self]))

    def emptied(self) -> CompactText:
        """What encoding "" gives (as `cache.empty_text_like`): no states, Qwen mask 0, T5 ids [1, 0, ...], mask [1, 0, ...]."""
        one = torch.ones(1, dtype=torch.uint8)
        return CompactText(self.states[:0], self.mask[:0], one.to(torch.int32), one, self.length, self.t5_length, 0)


def stack_text(rows: list) -> tuple[torch.Tensor, ...]:
    """A batch's text tensors from CompactText rows or padded (disk) rows: what stacking the padded rows gives,
    filled in place when every row is compact (no padded copy per sample)."""
    if not all(isinstance(r, CompactText) for r in rows):
        padded = [r.expand() if isinstance(r, CompactText) else r for r in rows]
        return tuple(torch.stack(t) for t in zip(*padded))
    b, first = len(rows), rows[0]
    states = torch.zeros((b, first.length, first.states.shape[1]), dtype=torch.float32)
    mask = torch.zeros((b, first.length), dtype=torch.int64)
    ids = torch.empty((b, first.t5_length), dtype=torch.int64)
    t5_mask = torch.zeros((b, first.t5_length), dtype=torch.int64)
    for k, r in enumerate(rows):
        n, m = r.states.shape[0], r.t5_ids.shape[0]
        states[k, :n] = r.states
        mask[k, :n] = r.mask
        ids[k] = r.t5_pad
        ids[k, :m] = r.t5_ids
        t5_mask[k, :m] = r.t5_mask
    return states, mask, ids, t5_mask


def compact_text(
    states: torch.Tensor, mask: torch.Tensor, t5_ids: torch.Tensor, t5_mask: torch.Tensor, slabs: Slabs
) -> CompactText:
    """Keep one caption's outputs (L×D, L, Lt, Lt) up to the last position that differs from padding."""
    n = _trailing_start(mask != 0)
    if _any_bits(states[n:]):  # rare: states past the mask; keep up to the last row that is not all zero bits
        n = _trailing_start((_bits(states) != 0).any(-1) | (mask != 0))
    pad = int(t5_ids[-1]) if len(t5_ids) else 0
    m = _trailing_start((t5_ids != pad) | (t5_mask != 0))
    return CompactText(
        states=slabs.add(states[:n]),
        mask=_small_int(mask[:n], torch.uint8),
        t5_ids=_small_int(t5_ids[:m], torch.int32),
        t5_mask=_small_int(t5_mask[:m], torch.uint8),
        length=states.shape[0],
        t5_length=t5_ids.shape[0],
        t5_pad=pad,
    )


def text_entry_bytes(tokens: int, t5_tokens: int, width: int, itemsize: int) -> int:
    """Memory of one CompactText: states in the encoder's dtype, uint8 masks, int32 T5 ids."""
    return tokens * (width * itemsize + 1) + t5_tokens * 5 + OVERHEAD_BYTES


def latent_entry_bytes(bucket: tuple[int, int], flip: bool, alpha_mask: bool, scale: int, channels: int = 16) -> int:
    """Memory of one image's cached latents (float32, and the mirror with flip_aug) and uint8 alpha mask."""
    w, h = bucket
    latents = channels * (h // scale) * (w // scale) * 4 * (2 if flip else 1)
    return latents + (w * h if alpha_mask else 0) + OVERHEAD_BYTES


@dataclass
class CachedText:
    """A caption's cached encoder outputs: in memory (`outputs`) or in the disk cache file at `path`."""

    caption: str
    outputs: CompactText | None
    path: Path | None
