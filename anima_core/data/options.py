"""Command-line level dataset options, named and defaulted as sd-scripts names and defaults them.

A dataset config's ``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]`` values win over these;
these win over the built-in defaults (which are the same values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class DataOptions:
    dataset_config: Path | None = None
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    # fine-tuning without a config: a metadata JSON/JSONL for the images in train_data_dir
    in_json: str | None = None
    resolution: int | tuple[int, int] | None = None
    train_batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".caption"
    dataset_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    # needed only when token_warmup_step < 1 (a fraction of the training steps)
    max_train_steps: int | None = None
    prior_loss_weight: float = 1.0
    alpha_mask: bool = False
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    validation_split: float = 0.0
    validation_seed: int | None = None
    max_data_loader_n_workers: int = 8
    persistent_data_loader_workers: bool = False
    seed: int | None = None
    bad_image_policy: Literal["skip", "error"] = "skip"
    qwen3_max_token_length: int = 512
    t5_max_token_length: int = 512
    # data-parallel training: a planned batch holds batch_size samples per process, and this process loads
    # its fixed slice of it (the global batch is the same whatever the number of processes)
    num_processes: int = 1
    process_index: int = 0
