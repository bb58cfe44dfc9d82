"""sd-scripts dataset configs (TOML or JSON) and the kohya folder form, resolved into plain specs.

Lookup order for every value: subset -> dataset -> [general] -> DataOptions (command line) -> default.
The key sets per level are the ones sd-scripts' config sanitizer accepts; anything else is refused
with a did-you-mean suggestion so that typos never silently fall back to a default.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from anima_core.data.options import DataOptions
from anima_core.errors import DatasetError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger(__name__)

INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _is_resolution(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v))


def _is_pair(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v)


# key -> (check, what the value must be)
_Check = tuple[Callable[[Any], bool], str]
_BOOL: _Check = (lambda v: isinstance(v, bool), "true or false")
_INT: _Check = (_is_int, "an integer")
_NUM: _Check = (_is_number, "a number")
_STR: _Check = (lambda v: isinstance(v, str), "a string")

DATASET_KEYS: dict[str, _Check] = {
    "batch_size": _INT,
    "bucket_no_upscale": _BOOL,
    "bucket_reso_steps": _INT,
    "enable_bucket": _BOOL,
    "max_bucket_reso": _INT,
    "min_bucket_reso": _INT,
    "validation_seed": _INT,
    "validation_split": _NUM,
    "resolution": (_is_resolution, "an integer or [width, height]"),
    "network_multiplier": _NUM,
    "resize_interpolation": _STR,
}
SUBSET_ASCENDABLE_KEYS: dict[str, _Check] = {
    "color_aug": _BOOL,
    "face_crop_aug_range": (_is_pair, "[low, high]"),
    "flip_aug": _BOOL,
    "num_repeats": _INT,
    "random_crop": _BOOL,
    "shuffle_caption": _BOOL,
    "keep_tokens": _INT,
    "keep_tokens_separator": _STR,
    "secondary_separator": _STR,
    "caption_separator": _STR,
    "enable_wildcard": _BOOL,
    "token_warmup_min": _INT,
    "token_warmup_step": _NUM,
    "caption_prefix": _STR,
    "caption_suffix": _STR,
    "custom_attributes": (lambda v: isinstance(v, dict), "a table"),
    "resize_interpolation": _STR,
    "caption_dropout_every_n_epochs": _INT,
    "caption_dropout_rate": _NUM,
    "caption_tag_dropout_rate": _NUM,
    "prior_preservation": _BOOL,
}
DREAMBOOTH_ASCENDABLE_KEYS: dict[str, _Check] = {
    "caption_extension": _STR,
    "class_tokens": _STR,
    "cache_info": _BOOL,
}
DREAMBOOTH_SUBSET_ONLY_KEYS: dict[str, _Check] = {"image_dir": _STR, "is_reg": _BOOL, "alpha_mask": _BOOL}
FINETUNE_SUBSET_ONLY_KEYS: dict[str, _Check] = {"metadata_file": _STR, "image_dir": _STR, "alpha_mask": _BOOL}

GENERAL_KEYS = {**DATASET_KEYS, **SUBSET_ASCENDABLE_KEYS, **DREAMBOOTH_ASCENDABLE_KEYS}

# DataOptions names that differ from the config names
_OPTION_NAME = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}


def _option_default(key: str) -> Any:
    """The default of a config key is DataOptions' (itself the profile's): written once."""
    return DataOptions.__dataclass_fields__[_OPTION_NAME.get(key, key)].default


@dataclass
class SubsetSpec:
    image_dir: Path | None
    metadata_file: Path | None = None
    is_reg: bool = False
    # the target of this subset's samples is the base model's own prediction (training/prior.py); unset in the
    # config: is_reg and DataOptions.reg_prior_preservation
    prior_preservation: bool = False
    class_tokens: str | None = None
    caption_extension: str = _option_default("caption_extension")
    cache_info: bool = False
    alpha_mask: bool = _option_default("alpha_mask")
    num_repeats: int = _option_default("num_repeats")
    shuffle_caption: bool = _option_default("shuffle_caption")
    caption_separator: str = _option_default("caption_separator")
    keep_tokens: int = _option_default("keep_tokens")
    keep_tokens_separator: str = _option_default("keep_tokens_separator")
    secondary_separator: str | None = _option_default("secondary_separator")
    enable_wildcard: bool = _option_default("enable_wildcard")
    caption_prefix: str | None = _option_default("caption_prefix")
    caption_suffix: str | None = _option_default("caption_suffix")
    color_aug: bool = _option_default("color_aug")
    flip_aug: bool = _option_default("flip_aug")
    random_crop: bool = _option_default("random_crop")
    face_crop_aug_range: tuple[float, float] | None = _option_default("face_crop_aug_range")
    caption_dropout_rate: float = _option_default("caption_dropout_rate")
    caption_dropout_every_n_epochs: int = _option_default("caption_dropout_every_n_epochs")
    caption_tag_dropout_rate: float = _option_default("caption_tag_dropout_rate")
    token_warmup_min: int = _option_default("token_warmup_min")
    token_warmup_step: float = _option_default("token_warmup_step")
    custom_attributes: dict | None = None
    resize_interpolation: str | None = _option_default("resize_interpolation")

    @property
    def is_dreambooth(self) -> bool:
        return self.metadata_file is None


@dataclass
class DatasetSpec:
    is_dreambooth: bool
    resolution: tuple[int, int]
    batch_size: int = _option_default("batch_size")
    enable_bucket: bool = _option_default("enable_bucket")
    min_bucket_reso: int = _option_default("min_bucket_reso")
    max_bucket_reso: int = _option_default("max_bucket_reso")
    bucket_reso_steps: int = _option_default("bucket_reso_steps")
    bucket_no_upscale: bool = _option_default("bucket_no_upscale")
    network_multiplier: float = _option_default("network_multiplier")
    validation_split: float = _option_default("validation_split")
    validation_seed: int | None = _option_default("validation_seed")
    resize_interpolation: str | None = _option_default("resize_interpolation")
    subsets: list[SubsetSpec] = field(default_factory=list)

    def bucket_min_max(self) -> tuple[int, int]:
        """min rounded down and max rounded up to bucket_reso_steps, as sd-scripts adjusts them."""
        step = self.bucket_reso_steps
        return self.min_bucket_reso - self.min_bucket_reso % step, self.max_bucket_reso + (-self.max_bucket_reso) % step


def _suggest(key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_table(table: Any, allowed: dict[str, _Check], where: str, problems: list[str], extra: set[str] = frozenset()) -> dict:
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table")
        return {}
    for key, value in table.items():
        if key in extra:
            continue
        if key not in allowed:
            problems.append(f"{where}: unknown key '{key}'{_suggest(key, set(allowed) | extra)}")
            continue
        check, what = allowed[key]
        if not check(value):
            problems.append(f"{where}: '{key}' must be {what}, got {value!r}")
    return table


def read_config_file(path: Path) -> dict:
    """Parse a TOML or JSON dataset config; a syntax error names the file and the position."""
    if not path.is_file():
        raise DatasetError(
            f"Dataset config {path} does not exist. Check the dataset_config path (relative paths are resolved against the profile's directory)."
        )
    try:
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"Dataset config {path} cannot be parsed: {e}. Fix the syntax (TOML unless the file ends in .json)."
        ) from e


def _option_value(opts: DataOptions, key: str) -> Any:
    value = getattr(opts, _OPTION_NAME.get(key, key), None)
    return tuple(value) if isinstance(value, list) else value


def _pick(key: str, levels: list[dict], opts: DataOptions, default: Any) -> Any:
    for level in levels:
        if key in level:
            return level[key]
    if hasattr(opts, _OPTION_NAME.get(key, key)):
        return _option_value(opts, key)
    return default


def _resolve_path(p: str | None, base_dir: Path) -> Path | None:
    if p is None:
        return None
    path = Path(p).expanduser()
    return path if path.is_absolute() else base_dir / path


def _make_subset(levels: list[dict], opts: DataOptions, base_dir: Path) -> SubsetSpec:
    subset = levels[0]
    subset_only = {
        "image_dir": _resolve_path(subset.get("image_dir"), base_dir),
        "metadata_file": _resolve_path(subset.get("metadata_file"), base_dir),
        "is_reg": subset.get("is_reg", False),
        "alpha_mask": subset.get("alpha_mask", opts.alpha_mask),
    }
    # Unset at every level, a regularisation subset follows the profile's dataset.reg_prior_preservation.
    explicit = [level["prior_preservation"] for level in levels if "prior_preservation" in level]
    subset_only["prior_preservation"] = explicit[0] if explicit else subset_only["is_reg"] and opts.reg_prior_preservation
    values = {f.name: _pick(f.name, levels, opts, f.default) for f in fields(SubsetSpec) if f.name not in subset_only}
    if isinstance(values["face_crop_aug_range"], list):
        values["face_crop_aug_range"] = tuple(values["face_crop_aug_range"])
    return SubsetSpec(**subset_only, **values)


def _resolution(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _make_dataset(
    levels: list[dict], opts: DataOptions, is_dreambooth: bool, subsets: list[SubsetSpec], where: str, problems: list[str]
) -> DatasetSpec | None:
    values = {
        f.name: _pick(f.name, levels, opts, f.default)
        for f in fields(DatasetSpec)
        if f.name not in ("is_dreambooth", "subsets", "resolution")
    }
    resolution = _resolution(_pick("resolution", levels, opts, None))
    if resolution is None:
        problems.append(
            f"{where}: no resolution. Set `resolution = 1024` (or [width, height]) in the dataset config or the profile."
        )
        return None
    spec = DatasetSpec(is_dreambooth=is_dreambooth, resolution=resolution, subsets=subsets, **values)
    _check_dataset(spec, where, problems)
    return spec


def _check_dataset(spec: DatasetSpec, where: str, problems: list[str]) -> None:
    if spec.batch_size < 1:
        problems.append(f"{where}: batch_size must be at least 1, got {spec.batch_size}")
    if min(spec.resolution) < 16:
        problems.append(f"{where}: resolution {spec.resolution} must be at least 16 on each side (a multiple of 16, like 1024).")
    if spec.enable_bucket and spec.min_bucket_reso > spec.max_bucket_reso:
        problems.append(f"{where}: min_bucket_reso {spec.min_bucket_reso} is larger than max_bucket_reso {spec.max_bucket_reso}.")
    if spec.enable_bucket:
        if spec.bucket_reso_steps <= 0 or spec.bucket_reso_steps % 16 != 0:
            problems.append(
                f"{where}: bucket_reso_steps = {spec.bucket_reso_steps} is not a multiple of 16. Anima latents need pixel sizes "
                "that are multiples of 16; use 16, 32 or 64."
            )
        elif spec.bucket_min_max()[0] == 0:
            problems.append(
                f"{where}: min_bucket_reso {spec.min_bucket_reso} rounds down to 0 in bucket_reso_steps of "
                f"{spec.bucket_reso_steps}; set min_bucket_reso to at least {spec.bucket_reso_steps}."
            )
        elif not spec.bucket_no_upscale:
            lo, hi = spec.bucket_min_max()
            if min(spec.resolution) < lo or max(spec.resolution) > hi:
                problems.append(
                    f"{where}: resolution {spec.resolution} must lie within min_bucket_reso {lo} and max_bucket_reso {hi}; "
                    "lower min_bucket_reso or raise max_bucket_reso."
                )
    elif any(r % 16 for r in spec.resolution):
        problems.append(f"{where}: resolution {spec.resolution} must be a multiple of 16 on each side when bucketing is off.")
    if spec.resize_interpolation is not None and spec.resize_interpolation not in INTERPOLATIONS:
        problems.append(f"{where}: resize_interpolation '{spec.resize_interpolation}' is not one of {', '.join(INTERPOLATIONS)}")
    if not 0.0 <= spec.validation_split < 1.0:
        problems.append(f"{where}: validation_split must be in [0, 1), got {spec.validation_split}")
    for i, s in enumerate(spec.subsets):
        sw = f"{where} subset {i + 1}"
        if s.resize_interpolation is not None and s.resize_interpolation not in INTERPOLATIONS:
            problems.append(f"{sw}: resize_interpolation '{s.resize_interpolation}' is not one of {', '.join(INTERPOLATIONS)}")
        if s.face_crop_aug_range is not None:
            problems.append(f"{sw}: face_crop_aug_range is not supported by anima-train; remove it.")
        if s.cache_info:
            problems.append(
                f"{sw}: cache_info has no reader in anima-train (sd-scripts writes the image sizes to a file to start "
                "faster; anima-train reads every image at start); remove it or set it to false."
            )
        if s.custom_attributes:
            problems.append(
                f"{sw}: custom_attributes has no reader in anima-train (sd-scripts hands them only to training code "
                "written to use them); remove the table."
            )
        for rate in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(s, rate) <= 1.0:
                problems.append(f"{sw}: {rate} must be between 0 and 1, got {getattr(s, rate)}")


def load_dataset_config(config: dict, opts: DataOptions, base_dir: Path, source: str) -> list[DatasetSpec]:
    """Validate a parsed config and resolve every value; DatasetError lists every problem found."""
    if not isinstance(config, dict):
        raise DatasetError(f"The dataset config {source} must be a table with [general] and [[datasets]].")
    problems: list[str] = []
    _check_table(config, {}, source, problems, extra={"general", "datasets"})
    general = _check_table(config.get("general", {}), GENERAL_KEYS, f"{source} [general]", problems)
    datasets_raw = config.get("datasets", [])
    if not isinstance(datasets_raw, list) or not datasets_raw:
        problems.append(f"{source}: no [[datasets]] table")
        datasets_raw = []
    specs: list[DatasetSpec] = []
    for di, dataset in enumerate(datasets_raw):
        where = f"{source} datasets[{di + 1}]"
        known_problems = len(problems)
        subsets_raw = dataset.get("subsets", []) if isinstance(dataset, dict) else []
        if not isinstance(subsets_raw, list) or not subsets_raw:
            problems.append(f"{where}: no [[datasets.subsets]]")
            continue
        with_metadata = [isinstance(s, dict) and "metadata_file" in s for s in subsets_raw]
        if any(with_metadata) and not all(with_metadata):
            problems.append(
                f"{where}: DreamBooth subsets (image_dir + captions) and fine-tuning subsets (metadata_file) are mixed. "
                "Put them in separate [[datasets]]."
            )
            continue
        is_dreambooth = not any(with_metadata)
        dataset_keys = {**DATASET_KEYS, **SUBSET_ASCENDABLE_KEYS, **(DREAMBOOTH_ASCENDABLE_KEYS if is_dreambooth else {})}
        _check_table(dataset, dataset_keys, where, problems, extra={"subsets"})
        subset_keys = {**SUBSET_ASCENDABLE_KEYS}
        if is_dreambooth:
            subset_keys.update(DREAMBOOTH_ASCENDABLE_KEYS)
            subset_keys.update(DREAMBOOTH_SUBSET_ONLY_KEYS)
        else:
            subset_keys.update(FINETUNE_SUBSET_ONLY_KEYS)
        subsets: list[SubsetSpec] = []
        for si, subset in enumerate(subsets_raw):
            sw = f"{where} subset {si + 1}"
            _check_table(subset, subset_keys, sw, problems)
            if not isinstance(subset, dict):
                continue
            if is_dreambooth and "image_dir" not in subset:
                problems.append(f"{sw}: image_dir is required for a DreamBooth-style subset")
                continue
            subsets.append(_make_subset([subset, dataset, general], opts, base_dir))
        if len(problems) > known_problems:
            continue
        spec = _make_dataset([dataset, general], opts, is_dreambooth, subsets, where, problems)
        if spec is not None:
            specs.append(spec)
    if problems:
        raise DatasetError(_problem_text(f"The dataset config {source} cannot be used", problems))
    return specs


def _problem_text(head: str, problems: list[str]) -> str:
    return head + f" ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems)


def _kohya_folder_subsets(root: Path, is_reg: bool) -> list[dict]:
    """`N_name` folders: N repeats, `name` the class tokens; folders without a leading number are ignored."""
    subsets = []
    for sub in sorted(root.iterdir()):
        if not sub.is_dir():
            continue
        head, _, name = sub.name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            log.warning("ignoring %s: the folder name does not start with a repeat count (like 10_name)", sub)
            continue
        if repeats < 1:
            continue
        subsets.append({"image_dir": str(sub), "num_repeats": repeats, "is_reg": is_reg, "class_tokens": name})
    return subsets


def resolve_datasets(opts: DataOptions, base_dir: Path) -> tuple[list[DatasetSpec], bool]:
    """The datasets to train on and whether they came from a config file (which changes the metadata keys)."""
    if opts.dataset_config is not None:
        path = _resolve_path(str(opts.dataset_config), base_dir)
        return load_dataset_config(read_config_file(path), opts, path.parent if path else base_dir, str(path)), True
    if opts.train_data_dir is None:
        raise DatasetError(
            "No dataset: set dataset_config (an sd-scripts dataset TOML) or train_data_dir (a folder of `N_name` image folders)."
        )
    train_dir = _resolve_path(opts.train_data_dir, base_dir)
    if not train_dir.is_dir():
        raise DatasetError(
            f"train_data_dir {train_dir} is not a folder. Point it at the folder that holds the `N_name` image folders."
        )
    if opts.in_json is not None:
        config = {"datasets": [{"subsets": [{"image_dir": str(train_dir), "metadata_file": opts.in_json}]}]}
    else:
        subsets = _kohya_folder_subsets(train_dir, False)
        if opts.reg_data_dir is not None:
            reg_dir = _resolve_path(opts.reg_data_dir, base_dir)
            if not reg_dir.is_dir():
                raise DatasetError(f"reg_data_dir {reg_dir} is not a folder.")
            subsets += _kohya_folder_subsets(reg_dir, True)
        if not any(not s["is_reg"] for s in subsets):
            raise DatasetError(
                f"train_data_dir {train_dir} holds no `N_name` folders (like `10_mychar`, N = repeats). Move the images into such a folder "
                "or use a dataset_config."
            )
        config = {"datasets": [{"subsets": subsets}]}
    return load_dataset_config(config, opts, base_dir, "train_data_dir"), False
