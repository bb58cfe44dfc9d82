"""Find every image and caption of a dataset and check each one before any model loads."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anima_core.data.buckets import Bucketer, Placement
from anima_core.data.captions import add_prefix_suffix
from anima_core.data.config import DatasetSpec, SubsetSpec
from anima_core.data.images import IMAGE_EXTENSIONS, BadImage, ImageFacts, check_image
from anima_core.data.parallel import parallel_map
from anima_core.data.progress import PhaseReporter, ProgressSink
from anima_core.errors import DatasetError


@dataclass
class ImageEntry:
    path: Path
    subset_index: int
    caption: str
    is_reg: bool
    num_repeats: int
    facts: ImageFacts
    placement: Placement


@dataclass
class ScannedSubset:
    spec: SubsetSpec
    img_count: int = 0


@dataclass
class ScannedDataset:
    spec: DatasetSpec
    bucketer: Bucketer
    subsets: list[ScannedSubset]
    entries: list[ImageEntry]
    num_train_images: int
    num_reg_images: int
    tag_frequency: dict[str, list[str]]  # dir or metadata file name -> captions


@dataclass
class _Candidate:
    path: Path
    subset_index: int
    caption: str | None  # None: a problem was already recorded


def _glob_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_caption(image: Path, subset: SubsetSpec, problems: list[tuple[Path, str]]) -> str | None:
    """The caption text, '' when there is no caption file; None when the file is unusable (a problem is recorded)."""
    caption_path = image.with_name(image.stem + subset.caption_extension)
    if not caption_path.is_file():
        return ""
    try:
        text = caption_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append((image, f"caption file {caption_path.name} is not UTF-8 (byte {e.start}); re-save it as UTF-8"))
        return None
    lines = [line.strip() for line in text.splitlines()]
    if subset.enable_wildcard:
        return "\n".join(line for line in lines if line)
    return lines[0] if lines else ""


def split_for_validation(paths: list[Path], split: float, seed: int, training: bool) -> list[Path]:
    """sd-scripts' split: shuffle with the validation seed, the first ceil(n·(1-split)) train, the last round(n·split) validate."""
    if split <= 0:
        return paths if training else []
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    if training:
        return shuffled[: math.ceil(len(shuffled) * (1 - split))]
    return shuffled[len(shuffled) - round(len(shuffled) * split) :]


def _load_metadata(subset: SubsetSpec) -> dict[str, dict[str, Any]]:
    path = subset.metadata_file
    if path is None or not path.is_file():
        raise DatasetError(
            f"metadata_file {path} does not exist. Check the path in the dataset config (relative paths are resolved against the config's folder)."
        )
    try:
        if path.suffix.lower() == ".jsonl":
            metadata = {}
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                if "image_path" not in item:
                    raise DatasetError(f'{path} line {n} has no "image_path"; every JSONL line needs one.')
                metadata[item["image_path"]] = item
            return metadata
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"metadata_file {path} cannot be read: {e}. It must be UTF-8 JSON (an object keyed by image) or JSONL."
        ) from e
    if not isinstance(metadata, dict):
        raise DatasetError(f"metadata_file {path} must hold a JSON object keyed by image path.")
    return metadata


def _finetune_candidates(subset: SubsetSpec, index: int, problems: list[tuple[Path, str]]) -> list[_Candidate]:
    candidates = []
    for key, item in _load_metadata(subset).items():
        path = Path(key)
        if not path.is_absolute():
            if subset.image_dir is None:
                raise DatasetError(f"{subset.metadata_file}: image '{key}' is a relative path, so the subset needs image_dir.")
            path = subset.image_dir / path
        if not path.suffix:
            # sd-scripts metadata keys may omit the extension
            found = [path.with_suffix(ext) for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)]
            path = next((p for p in found if p.is_file()), path)
        caption = item.get("caption") or ""
        tags = item.get("tags")
        if tags:
            caption = caption + subset.caption_separator + tags if caption else tags
        candidates.append(_Candidate(path, index, caption))
    return candidates


def _too_long(caption: str, tokenizer: Any, limit: int, special: bool) -> int:
    """How many tokens past the limit the caption is (0 when it fits)."""
    n = len(tokenizer(caption, add_special_tokens=special)["input_ids"])
    return max(0, n - limit)


@dataclass
class TokenCheck:
    qwen_tokenizer: Any
    qwen_limit: int
    t5_tokenizer: Any
    t5_limit: int

    def problem(self, caption: str) -> str | None:
        for line in caption.split("\n"):
            for name, tok, limit, special in (
                ("Qwen3", self.qwen_tokenizer, self.qwen_limit, False),
                ("T5", self.t5_tokenizer, self.t5_limit, True),
            ):
                if tok is None:
                    continue
                cut = _too_long(line, tok, limit, special)
                if cut:
                    return f"caption is {limit + cut} {name} tokens; the {cut} tokens past the limit of {limit} would be cut; shorten it or raise the limit"
        return None


def scan_dataset(
    spec: DatasetSpec,
    *,
    training: bool,
    seed: int,
    tokens: TokenCheck,
    problems: list[tuple[Path, str]],
    warn: Callable[[str], None],
    workers: int,
    progress: ProgressSink | None = None,
    decode: bool = True,
) -> ScannedDataset:
    bucketer = Bucketer(spec)
    min_area = bucketer.smallest_area()
    subsets = [ScannedSubset(s) for s in spec.subsets]
    candidates: list[_Candidate] = []
    validation_seed = spec.validation_seed if spec.validation_seed is not None else seed
    for index, subset in enumerate(spec.subsets):
        if subset.num_repeats < 1:
            warn(f"subset {subset.image_dir or subset.metadata_file} is ignored: num_repeats is {subset.num_repeats}")
            continue
        if subset.is_dreambooth:
            if subset.image_dir is None or not subset.image_dir.is_dir():
                raise DatasetError(
                    f"image_dir {subset.image_dir} is not a folder. Fix the path in the dataset config (relative paths are resolved against the config's folder)."
                )
            paths = _glob_images(subset.image_dir)
            if subset.is_reg or subset.prior_preservation:  # never held out: validation judges images as targets
                paths = paths if training else []
            else:
                paths = split_for_validation(paths, spec.validation_split, validation_seed, training)
            found = [_Candidate(p, index, _read_caption(p, subset, problems)) for p in paths]
        else:
            found = _finetune_candidates(subset, index, problems)
            names = split_for_validation([c.path for c in found], spec.validation_split, validation_seed, training)
            if subset.prior_preservation:
                names = [c.path for c in found] if training else []
            keep = set(names)
            found = [c for c in found if c.path in keep]
        candidates += [c for c in found if c.caption is not None]
        if not found and training:
            warn(f"subset {subset.image_dir or subset.metadata_file} has no images")

    def check(c: _Candidate) -> ImageFacts | str:
        if not c.path.is_file():
            return "image file not found"
        try:
            return check_image(c.path, spec.subsets[c.subset_index].alpha_mask, decode=decode)
        except BadImage as e:
            return str(e)
        except OSError as e:
            return f"cannot be read: {e}"

    reporter = PhaseReporter(progress, "scan", len(candidates))
    results = []
    for facts in parallel_map(check, candidates, workers, chunk=32):
        results.append(facts)
        reporter.advance()
    reporter.finish()

    entries: list[ImageEntry] = []
    missing_captions: list[Path] = []
    captions_by_dir: dict[str, list[str]] = {}
    num_train = num_reg = 0
    for c, facts in zip(candidates, results):
        subset = spec.subsets[c.subset_index]
        if isinstance(facts, str):
            problems.append((c.path, facts))
            continue
        placement = bucketer.place(facts.width, facts.height)
        if facts.width * facts.height < min_area or min(placement.bucket) < 16:
            lower = "min_bucket_reso" if spec.enable_bucket else "resolution"
            problems.append(
                (
                    c.path,
                    f"image is {facts.width}x{facts.height}, smaller than the smallest bucket ({min_area} pixels); use a larger image or lower {lower}",
                )
            )
            continue
        caption = c.caption
        if subset.is_dreambooth and not caption:
            missing_captions.append(c.path)
            caption = subset.class_tokens or ""
        too_long = tokens.problem(add_prefix_suffix(subset, caption))
        if too_long:
            problems.append((c.path, too_long))
            continue
        entries.append(
            ImageEntry(c.path, c.subset_index, caption, subset.is_reg, subset.num_repeats if training else 1, facts, placement)
        )
        subsets[c.subset_index].img_count += 1
        name = (subset.image_dir if subset.is_dreambooth else subset.metadata_file).name
        captions_by_dir.setdefault(name, []).append(caption)
        if subset.is_reg:
            num_reg += entries[-1].num_repeats
        else:
            num_train += entries[-1].num_repeats
    if missing_captions:
        shown = ", ".join(str(p) for p in missing_captions[:5])
        more = f" and {len(missing_captions) - 5} more" if len(missing_captions) > 5 else ""
        warn(
            f"{len(missing_captions)} image(s) have no caption file; their class_tokens (or an empty caption) are used: {shown}{more}"
        )
    _balance_reg(entries, num_train)
    return ScannedDataset(spec, bucketer, subsets, entries, num_train, num_reg, captions_by_dir)


def _balance_reg(entries: list[ImageEntry], num_train: int) -> None:
    """sd-scripts repeats regularisation images until they match the training images per epoch (or cuts them)."""
    reg = [e for e in entries if e.is_reg]
    if not reg:
        return
    counts = [0] * len(reg)
    n = 0
    first = True
    while n < num_train:
        for i, e in enumerate(reg):
            if first:
                counts[i] = e.num_repeats
                n += e.num_repeats
            else:
                counts[i] += 1
                n += 1
            if n >= num_train:
                break
        first = False
    for e, count in zip(reg, counts):
        e.num_repeats = count
    entries[:] = [e for e in entries if not e.is_reg or e.num_repeats > 0]
