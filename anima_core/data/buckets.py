"""Aspect-ratio buckets, computed the way sd-scripts computes them (spec §5.6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from anima_core.data.config import DatasetSpec


def bucket_resolutions(resolution: tuple[int, int], min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """Every (w, h) bucket for the area of `resolution`: widths from min to max in steps, both orientations, plus the square."""
    area = resolution[0] * resolution[1]
    resos = {(int(math.sqrt(area) // step) * step,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket (w, h) and the size it is resized to before cropping to the bucket."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float


class Bucketer:
    def __init__(self, spec: DatasetSpec):
        self.enabled = spec.enable_bucket
        self.no_upscale = spec.enable_bucket and spec.bucket_no_upscale
        self.step = spec.bucket_reso_steps
        self.max_area = spec.resolution[0] * spec.resolution[1]
        if not spec.enable_bucket:
            self.predefined = [spec.resolution]
        elif self.no_upscale:
            self.predefined = []
        else:
            lo, hi = spec.bucket_min_max()
            self.predefined = bucket_resolutions(spec.resolution, lo, hi, self.step)

    def smallest_area(self) -> int:
        """Images below this many pixels would need upscaling even for the smallest bucket."""
        if self.no_upscale:
            return self.step * self.step
        return min(w * h for w, h in self.predefined)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def place(self, width: int, height: int) -> Placement:
        aspect = width / height
        if not self.no_upscale:
            if (width, height) in self.predefined:
                bucket = (width, height)
            else:
                bucket = min(self.predefined, key=lambda r: abs(r[0] / r[1] - aspect))
            if aspect > bucket[0] / bucket[1]:
                scale = bucket[1] / height
            else:
                scale = bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                bw = self._round(rw)
                ar_w = bw / self._round(bw / aspect)
                bh = self._round(rh)
                ar_h = self._round(bh * aspect) / bh
                if abs(ar_w - aspect) < abs(ar_h - aspect):
                    resized = (bw, int(bw / aspect + 0.5))
                else:
                    resized = (int(bh * aspect + 0.5), bh)
            else:
                resized = (width, height)
            bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        return Placement(bucket, resized, bucket[0] / bucket[1] - aspect)


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where the image content lies in the bucket after a centre fit (the value sd-scripts caches)."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, bucket[1]
    else:
        rw, rh = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - rw) // 2
    top = (bucket[1] - rh) // 2
    return int(left), int(top), int(left + rw), int(top + rh)
