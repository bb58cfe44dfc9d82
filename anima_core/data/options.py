"""Command-line level dataset options, named as sd-scripts names them.

A dataset config's ``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]`` values win over these.
Every option that is also a profile ``[dataset]`` key takes its default from there (`DatasetTable`), so a
default is written once: `config.SubsetSpec` / `DatasetSpec` take theirs from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from anima_core.config.schema import DatasetTable, ModelTable


def _profile_default(name: str, table: type = DatasetTable) -> Any:
    return table.model_fields[name].default


@dataclass
class DataOptions:
    dataset_config: Path | None = _profile_default("dataset_config")
    train_data_dir: str | None = _profile_default("train_data_dir")
    reg_data_dir: str | None = _profile_default("reg_data_dir")
    # fine-tuning without a config: a metadata JSON/JSONL for the images in train_data_dir
    in_json: str | None = None
    resolution: int | tuple[int, int] | None = _profile_default("resolution")
    train_batch_size: int = _profile_default("train_batch_size")
    enable_bucket: bool = _profile_default("enable_bucket")
    min_bucket_reso: int = _profile_default("min_bucket_reso")
    max_bucket_reso: int = _profile_default("max_bucket_reso")
    bucket_reso_steps: int = _profile_default("bucket_reso_steps")
    bucket_no_upscale: bool = _profile_default("bucket_no_upscale")
    caption_extension: str = _profile_default("caption_extension")
    dataset_repeats: int = _profile_default("dataset_repeats")
    shuffle_caption: bool = _profile_default("shuffle_caption")
    caption_separator: str = _profile_default("caption_separator")
    keep_tokens: int = _profile_default("keep_tokens")
    keep_tokens_separator: str = _profile_default("keep_tokens_separator")
    secondary_separator: str | None = _profile_default("secondary_separator")
    enable_wildcard: bool = _profile_default("enable_wildcard")
    caption_prefix: str | None = _profile_default("caption_prefix")
    caption_suffix: str | None = _profile_default("caption_suffix")
    color_aug: bool = _profile_default("color_aug")
    flip_aug: bool = _profile_default("flip_aug")
    random_crop: bool = _profile_default("random_crop")
    face_crop_aug_range: tuple[float, float] | None = None
    caption_dropout_rate: float = _profile_default("caption_dropout_rate")
    caption_dropout_every_n_epochs: int = _profile_default("caption_dropout_every_n_epochs")
    caption_tag_dropout_rate: float = _profile_default("caption_tag_dropout_rate")
    token_warmup_min: int = _profile_default("token_warmup_min")
    token_warmup_step: float = _profile_default("token_warmup_step")
    # needed only when token_warmup_step < 1 (a fraction of the training steps)
    max_train_steps: int | None = None
    prior_loss_weight: float = _profile_default("prior_loss_weight")
    reg_prior_preservation: bool = _profile_default("reg_prior_preservation")
    alpha_mask: bool = _profile_default("alpha_mask")
    network_multiplier: float = 1.0
    resize_interpolation: str | None = _profile_default("resize_interpolation")
    validation_split: float = _profile_default("validation_split")
    validation_seed: int | None = _profile_default("validation_seed")
    max_data_loader_n_workers: int = _profile_default("max_data_loader_n_workers")
    persistent_data_loader_workers: bool = _profile_default("persistent_data_loader_workers")
    seed: int | None = None
    bad_image_policy: Literal["skip", "error"] = _profile_default("bad_image_policy")
    qwen3_max_token_length: int = _profile_default("qwen3_max_token_length", ModelTable)
    t5_max_token_length: int = _profile_default("t5_max_token_length", ModelTable)
    # data-parallel training: a planned batch holds batch_size samples per process, and this process loads
    # its fixed slice of it (the global batch is the same whatever the number of processes)
    num_processes: int = 1
    process_index: int = 0
