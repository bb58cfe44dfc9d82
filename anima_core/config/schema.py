"""The profile schema: one pydantic model per TOML table; every field has a default and a help text.

Field names follow sd-scripts' argument names where one exists, so `import-kohya` and people reading the
guide recognise them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["float16", "bfloat16", "float32"]


class Table(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelTable(Table):
    loader: str = Field("anima", description="Model loader plugin that reads the files below.")
    dit: Optional[Path] = Field(
        None, description="Anima DiT single file (anima-*.safetensors; keys under `net.`). sd-scripts: --dit_path / --pretrained_model_name_or_path."
    )
    qwen3: Optional[Path] = Field(
        None, description="Qwen3-0.6B text encoder: a Hugging Face folder or one .safetensors file. sd-scripts: --qwen3_path / --qwen3."
    )
    vae: Optional[Path] = Field(
        None, description="Qwen-Image / Wan 2.1 VAE (.safetensors or .pth). sd-scripts: --vae_path / --vae."
    )
    llm_adapter: Optional[Path] = Field(
        None, description="Separate LLM adapter weights; when empty the adapter is read from the DiT file."
    )
    qwen3_tokenizer: Optional[Path] = Field(
        None, description="Folder with the Qwen3 tokenizer (and config); empty: next to `qwen3`, else the one shipped with anima-train."
    )
    t5_tokenizer: Optional[Path] = Field(
        None, description="Folder with the T5 tokenizer (google/t5-v1_1-xxl vocabulary) for the adapter's ids; empty: the one shipped with anima-train. sd-scripts: --t5_tokenizer_path."
    )
    qwen3_max_token_length: int = Field(512, ge=1, le=4096, description="Qwen3 tokens kept per caption (truncate + pad).")
    t5_max_token_length: int = Field(512, ge=1, le=4096, description="T5 tokens kept per caption (truncate + pad).")
    apply_t5_attn_mask: bool = Field(
        True, description="Mask padded T5 tokens in the LLM adapter (what every reference implementation does); false treats the padding as tokens."
    )
    attn_mode: Literal["torch", "sdpa", "flash", "xformers"] = Field(
        "sdpa", description="Attention backend for the DiT: sdpa (PyTorch, default; `torch` is an alias) or flash (flash-attn, falls back to SDPA with a warning)."
    )
    split_attn: bool = Field(False, description="Run attention one sample at a time (less memory at large batches).")
    compile_blocks: Optional[bool] = Field(
        None, description="torch.compile each DiT block (faster steps after a compile of a minute or two; a failed "
        "compile falls back to eager). Unset: on for CUDA, off on the CPU."
    )
    cuda_graphs: bool = Field(
        False, description="Replay the compiled blocks as CUDA graphs (one per bucket shape; fewer kernel launches). "
        "Needs compiled blocks on CUDA; block swap and activation offload cannot be captured and fall back to compiled."
    )
    transformer_dtype: Optional[Dtype] = Field(
        None, description="Dtype of the DiT weights; empty means the mixed-precision dtype."
    )
    vae_chunk_size: Optional[int] = Field(None, ge=2, description="Encode/decode the VAE in chunks of this many rows (less memory).")
    vae_tiled: bool = Field(False, description="Tiled VAE encode/decode so 1024² fits small GPUs.")
    vae_dtype: Dtype = Field("float32", description="Dtype the VAE runs in.")


class DatasetTable(Table):
    dataset_config: Optional[Path] = Field(
        None, description="sd-scripts dataset config (TOML or JSON), used unchanged. Either this or train_data_dir."
    )
    train_data_dir: Optional[Path] = Field(None, description="Folder of `N_name` subfolders (kohya folder form).")
    reg_data_dir: Optional[Path] = Field(None, description="Folder of regularisation images in the same form.")
    resolution: Optional[Union[int, list[int]]] = Field(
        None, description="Training resolution: one int (square) or [width, height]; multiples of 16."
    )
    train_batch_size: int = Field(1, ge=1, description="Images per step (per dataset unless the dataset config sets batch_size).")
    enable_bucket: bool = Field(False, description="Aspect-ratio bucketing.")
    min_bucket_reso: int = Field(256, ge=16, description="Smallest bucket side in pixels.")
    max_bucket_reso: int = Field(1024, ge=16, description="Largest bucket side in pixels.")
    bucket_reso_steps: int = Field(64, ge=16, multiple_of=16, description="Bucket side step in pixels; a multiple of 16 for Anima.")
    bucket_no_upscale: bool = Field(False, description="Never upscale: buckets are derived from each image's size.")
    caption_extension: str = Field(".caption", description="Caption file extension for folder datasets (the guide's examples use .txt).")
    dataset_repeats: int = Field(1, ge=1, description="Default num_repeats for subsets.")
    shuffle_caption: bool = Field(False, description="Shuffle comma-separated tags each time.")
    caption_separator: str = Field(",", description="Separator between tags.")
    keep_tokens: int = Field(0, ge=0, description="Tags at the start never shuffled or dropped.")
    keep_tokens_separator: str = Field("", description="Marker separating kept tags from the rest.")
    secondary_separator: Optional[str] = Field(None, description="Separator inside a tag group that is shuffled as one unit.")
    enable_wildcard: bool = Field(False, description="`{a|b}` wildcards and multi-line captions.")
    caption_prefix: Optional[str] = Field(None, description="Text prepended to every caption.")
    caption_suffix: Optional[str] = Field(None, description="Text appended to every caption.")
    color_aug: bool = Field(False, description="Colour augmentation (disables latent caching).")
    flip_aug: bool = Field(False, description="Random horizontal flips.")
    random_crop: bool = Field(False, description="Random instead of centre crop.")
    caption_dropout_rate: float = Field(0.0, ge=0, le=1, description="Subset-level caption dropout rate (caption replaced by the empty caption).")
    caption_dropout_every_n_epochs: int = Field(0, ge=0, description="Drop every caption every N epochs.")
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1, description="Drop each tag with this probability.")
    token_warmup_min: int = Field(1, ge=1, description="Tags used at the start of token warmup.")
    token_warmup_step: float = Field(0, ge=0, description="Steps (or a fraction of all steps when < 1) to reach all tags.")
    prior_loss_weight: float = Field(
        1.0, ge=0, description="Loss weight of regularisation images and of prior-preservation samples (their loss to the "
        "base model's own prediction).")
    reg_prior_preservation: bool = Field(
        False, description="Regularisation subsets (reg_data_dir, is_reg) train toward the base model's own prediction "
        "with the LoRA off instead of toward their images, so any images serve; a dataset config's prior_preservation "
        "key wins for its subsets.")
    alpha_mask: bool = Field(False, description="Use the image's alpha channel as a loss mask (masked loss).")
    resize_interpolation: Optional[Literal["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"]] = Field(
        None, description="Resize filter; empty means area when shrinking and lanczos when enlarging."
    )
    validation_split: float = Field(0.0, ge=0, lt=1, description="Fraction of images held out for validation loss.")
    validation_seed: Optional[int] = Field(None, description="Seed of the validation split (default: the training seed).")
    max_data_loader_n_workers: int = Field(0, ge=0, description="Data loading worker processes (0 loads in the training process).")
    persistent_data_loader_workers: bool = Field(False, description="Keep workers alive between epochs.")
    bad_image_policy: Literal["skip", "error"] = Field(
        "skip", description="What to do with a broken or unusable image or caption found at start: skip it (with a summary) or stop."
    )


class CachingTable(Table):
    cache_latents: bool = Field(False, description="Encode every image once before training; the VAE then leaves the GPU.")
    cache_latents_to_disk: bool = Field(False, description="Keep latent caches on disk beside the images (implies cache_latents).")
    cache_text_encoder_outputs: bool = Field(False, description="Encode every caption once; Qwen3 then leaves the GPU. Excludes text-encoder LoRA.")
    cache_text_encoder_outputs_to_disk: bool = Field(False, description="Keep text caches on disk (implies cache_text_encoder_outputs).")
    vae_batch_size: int = Field(1, ge=1, description="Images per VAE call while caching.")
    text_encoder_batch_size: int = Field(8, ge=1, description="Captions per encoder call while caching.")
    skip_cache_check: bool = Field(False, description="Trust existing cache files without checking their keys.")


class NetworkTable(Table):
    module: str = Field("lora_anima", description="Network plugin: lora_anima (`networks.lora_anima` is accepted) or lycoris (LoKr/LoHa/LoCon/DoRA, extra anima-train[lycoris]; `lycoris.kohya` is accepted).")
    dim: Optional[int] = Field(None, ge=1, description="LoRA rank (network_dim); empty means 4.")
    alpha: Optional[float] = Field(None, ge=0, description="LoRA alpha (network_alpha); empty means 1 (scale alpha/rank).")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="Dropout on the rank activations (network_dropout).")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Network args of the guide (self_attn_dim, cross_attn_dim, mlp_dim, mod_dim, llm_adapter_dim, emb_dims, train_block_indices, train_llm_adapter, rank_dropout, module_dropout, loraplus_*_ratio, verbose) and of current sd-scripts (include/exclude_patterns, network_reg_dims, network_reg_lrs).",
    )
    weights: Optional[Path] = Field(None, description="Continue from this LoRA file (network_weights).")
    allow_other_model: bool = Field(
        False,
        description="Continue network.weights on a DiT other than the one the LoRA was made for (its anima_dit "
        "metadata: Anima 2B vs 2.9B, another block count); block N of the file goes onto block N of this DiT. "
        "false: validate and run refuse, naming both models. A file whose keys reach blocks this DiT lacks is "
        "refused either way.",
    )
    train_unet_only: bool = Field(False, description="Train only the DiT (and adapter); leave Qwen3 without LoRA (network_train_unet_only).")


LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt",
    "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor",
]


class OptimizerTable(Table):
    optimizer_type: str = Field(
        "AdamW",
        description="An optimizer by sd-scripts' name (AdamW, AdamW8bit, PagedAdamW8bit, Lion, Prodigy, Adafactor, "
        "AdamWScheduleFree, CAME, ...; any case), a torch.optim class name, or any `module.Class`.",
    )
    optimizer_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the optimizer.")
    learning_rate: float = Field(1e-4, ge=0, description="Base learning rate.")
    unet_lr: Optional[float] = Field(None, ge=0, description="Learning rate for the DiT LoRA (default: learning_rate).")
    text_encoder_lr: Optional[float] = Field(None, ge=0, description="Learning rate for the Qwen3 LoRA (default: learning_rate).")
    self_attn_lr: Optional[float] = Field(None, ge=0, description="Self-attention learning rate; 0 freezes.")
    cross_attn_lr: Optional[float] = Field(None, ge=0, description="Cross-attention learning rate; 0 freezes.")
    mlp_lr: Optional[float] = Field(None, ge=0, description="MLP learning rate; 0 freezes.")
    mod_lr: Optional[float] = Field(None, ge=0, description="AdaLN modulation learning rate; 0 freezes.")
    llm_adapter_lr: Optional[float] = Field(None, ge=0, description="LLM adapter learning rate; 0 freezes.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm of the whole gradient; 0 disables.")
    fused_backward_pass: bool = Field(
        False,
        description="Adafactor only: update each parameter during backward (with max_grad_norm = 0; with clipping "
        "the updates wait for the whole gradient, as sd-scripts' LoRA training clips it).",
    )
    scale_weight_norms: Optional[float] = Field(
        None, gt=0, description="Max-norm regularisation: after each step, scale every LoRA pair whose ΔW norm exceeds this back to it."
    )
    lr_scheduler: LrScheduler = Field("constant", description="Learning-rate schedule (transformers' / diffusers' functions, as sd-scripts).")
    lr_warmup_steps: Union[int, float] = Field(0, ge=0, description="Warmup steps, or a fraction of all steps when below 1.")
    lr_decay_steps: Union[int, float] = Field(
        0, ge=0, description="warmup_stable_decay: decay steps, or a fraction of all steps when below 1."
    )
    lr_scheduler_num_cycles: int = Field(
        1, ge=1, description="Cycles of cosine_with_restarts; half-waves of cosine_with_min_lr and warmup_stable_decay's decay."
    )
    lr_scheduler_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    lr_scheduler_min_lr_ratio: Optional[float] = Field(
        None, ge=0, le=1, description="Floor as a fraction of the rate: cosine_with_min_lr (required) and warmup_stable_decay only."
    )
    lr_scheduler_timescale: Optional[int] = Field(None, ge=1, description="inverse_sqrt's timescale (default: the warmup steps).")
    lr_scheduler_type: str = Field(
        "", description="Any scheduler class (a torch.optim.lr_scheduler name or `module.Class`); replaces lr_scheduler."
    )
    lr_scheduler_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the schedule (e.g. step_rules of piecewise_constant, T_max)."
    )
    ema_decay: Optional[float] = Field(
        None, gt=0, lt=1, description="Keep an exponential moving average of the trained weights with this decay (e.g. 0.999)."
    )
    ema_every_n_steps: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    ema_device: Literal["device", "cpu"] = Field("device", description="Where the EMA weights live: the training device or CPU memory.")
    ema_save: Literal["lora", "beside"] = Field(
        "lora", description="lora: the saved LoRA holds the EMA weights; beside: also write <name>-ema.safetensors next to it."
    )
    ema_for_previews: bool = Field(False, description="Render previews with the EMA weights.")
    ema_for_validation: bool = Field(False, description="Compute the validation loss with the EMA weights.")


class TrainingTable(Table):
    max_train_steps: int = Field(1600, ge=1, description="Optimizer steps to train (ignored when max_train_epochs is set).")
    max_train_epochs: Optional[int] = Field(None, ge=1, description="Epochs to train; overrides max_train_steps.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimizer step.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("bf16", description="Mixed precision through accelerate.")
    full_bf16: bool = Field(False, description="Keep the LoRA weights and gradients in bf16 too.")
    seed: int = Field(42, description="Seed for everything random; CPU runs repeat exactly.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N.")
    timestep_sampling: str = Field(
        "logit_normal",
        description="σ sampling: logit_normal / uniform (the guide's; shifted then clamped), current sd-scripts' sigmoid / shift / flux_shift / sigma, or a timestep-sampler plugin by name.",
    )
    discrete_flow_shift: float = Field(3.0, gt=0, description="Shift s: σ ← s·σ / (1 + (s−1)·σ).")
    sigmoid_scale: float = Field(1.0, gt=0, description="Scale of the normal before the sigmoid.")
    weighting_scheme: Literal["uniform", "none", "sigma_sqrt", "cosmap", "logit_normal", "mode"] = Field(
        "uniform", description="Per-sample loss weight by σ, or the density of `sigma` sampling."
    )
    logit_mean: float = Field(0.0, description="Mean of the logit_normal weighting density.")
    logit_std: float = Field(1.0, gt=0, description="Std of the logit_normal weighting density.")
    mode_scale: float = Field(1.29, description="Scale of the `mode` weighting density.")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field("l2", description="Element-wise loss.")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "constant", description="How huber_c varies with σ (snr is not defined for flow matching and is refused)."
    )
    huber_c: float = Field(0.1, gt=0, description="Huber threshold c.")
    huber_scale: float = Field(1.0, gt=0, description="Huber scale.")
    ip_noise_gamma: Optional[float] = Field(None, ge=0, description="Input-perturbation noise strength.")
    ip_noise_gamma_random_strength: bool = Field(False, description="Scale ip_noise_gamma by U(0, 1) each step.")
    caption_dropout_rate: float = Field(0.0, ge=0, le=1, description="Embedding-level caption dropout (the guide's global rate; works with cached text).")
    loss_weighting: Optional[str] = Field(None, description="A loss weighting plugin by name; replaces weighting_scheme's weight.")
    nan_guard_max_bad_steps: int = Field(5, ge=1, description="Non-finite steps in a row before the run reloads the last state or stops.")
    nan_guard_lr_factor: Optional[float] = Field(None, gt=0, lt=1, description="On reload after bad steps, multiply the learning rate by this.")
    num_processes: int = Field(
        1, ge=1, description="Data-parallel processes on this machine (one per GPU); `anima-train run` starts them. The global batch is train_batch_size × num_processes × gradient_accumulation_steps. Under `accelerate launch` / `torchrun` the launcher decides. sd-scripts: accelerate's --num_processes."
    )
    num_cpu_threads_per_process: Optional[int] = Field(
        None, ge=1, description="CPU threads of each process (default: the CPUs divided among the processes). sd-scripts: accelerate's --num_cpu_threads_per_process."
    )
    ddp_timeout: int = Field(30, ge=1, description="Minutes a process waits on the others before the run fails (sd-scripts: --ddp_timeout).")
    fsdp: bool = Field(
        False, description="Full fine-tuning over several processes: shard the DiT's weights, gradients and optimizer "
        "state across them with FSDP2, each process holding about 1/N (whole weights are gathered for each block as it "
        "runs and for saves). LoRA runs refuse it. sd-scripts: accelerate's --use_fsdp."
    )


class MemoryTable(Table):
    gradient_checkpointing: bool = Field(False, description="Recompute each DiT block in backward.")
    selective_checkpointing: bool = Field(
        False, description="Checkpoint each DiT block keeping its matmul and attention outputs and recomputing only the "
        "elementwise work in backward: more memory than gradient_checkpointing, less than none, less recompute "
        "(replaces gradient_checkpointing)."
    )
    cpu_offload_checkpointing: bool = Field(False, description="Checkpointed block outputs go to CPU memory.")
    unsloth_offload_checkpointing: bool = Field(False, description="Keep only each block's input, on CPU, copied without blocking.")
    blocks_to_swap: int = Field(0, ge=0, description="DiT blocks kept on the CPU and swapped in as needed (at most blocks − 2).")
    fp8_base: bool = Field(False, description="Store frozen DiT Linear weights as float8 (e4m3), compute in bf16.")
    fp8_base_unet: bool = Field(False, description="Same as fp8_base (sd-scripts name).")
    extra_strategies: list[str] = Field(default_factory=list, description="Memory-strategy plugins to enable by name.")


class SavingTable(Table):
    output_dir: Path = Field(Path("output"), description="Where LoRA files and the run directory go.")
    output_name: str = Field("anima_lora", description="File name stem of saved LoRAs.")
    save_model_as: Literal["safetensors"] = Field("safetensors", description="File format (safetensors only).")
    save_precision: Optional[Literal["float", "fp16", "bf16"]] = Field(None, description="Dtype of saved LoRA tensors; empty keeps float32.")
    save_every_n_epochs: Optional[int] = Field(None, ge=1, description="Save a LoRA every N epochs.")
    save_every_n_steps: Optional[int] = Field(None, ge=1, description="Save a LoRA every N steps.")
    save_last_n_epochs: Optional[int] = Field(None, ge=1, description="Keep only the newest N epoch saves.")
    save_last_n_steps: Optional[int] = Field(None, ge=1, description="Keep only step saves from the last N steps.")
    save_state: bool = Field(True, description="Save a resumable training state with each LoRA save and on stop.")
    save_state_every_n_steps: Optional[int] = Field(None, ge=1, description="Save a state every N steps (default: with each LoRA save).")
    keep_last_n_states: int = Field(2, ge=1, description="Resumable states kept.")
    no_metadata: bool = Field(False, description="Write only the essential metadata keys.")
    metadata_title: Optional[str] = Field(None, description="modelspec.title (default: output_name).")
    metadata_author: Optional[str] = Field(None, description="modelspec.author.")
    metadata_description: Optional[str] = Field(None, description="modelspec.description.")
    metadata_license: Optional[str] = Field(None, description="modelspec.license.")
    metadata_tags: Optional[str] = Field(None, description="modelspec.tags (comma separated).")
    training_comment: Optional[str] = Field(None, description="ss_training_comment.")


class SamplingTable(Table):
    sample_prompts: Optional[Path] = Field(None, description="Preview prompts (.txt with --n --w --h --d --s --l --fs, .toml or .json).")
    sample_every_n_steps: Optional[int] = Field(None, ge=1, description="Render previews every N steps.")
    sample_every_n_epochs: Optional[int] = Field(None, ge=1, description="Render previews every N epochs.")
    sample_at_first: bool = Field(False, description="Render previews before training starts.")
    sample_sampler: Literal["euler"] = Field("euler", description="Preview sampler.")


class LoggingTable(Table):
    log_every_n_steps: int = Field(10, ge=1, description="Plain log line every N steps when not on a terminal.")
    progress: Literal["auto", "rich", "plain"] = Field("auto", description="Progress display: rich bar on a terminal, plain lines otherwise.")
    run_name: Optional[str] = Field(None, description="Run directory name (default: time stamp and output_name).")
    log_with: list[str] = Field(
        default_factory=list,
        description='Training-curve loggers: "tensorboard" and/or "wandb" (extras anima-train[tensorboard] / [wandb]). sd-scripts: --log_with ("all" = both).',
    )
    logging_dir: Optional[Path] = Field(
        None, description="Folder for TensorBoard and W&B files (default: logs/ in the run directory); each run writes to <log_prefix><run name> in it."
    )
    log_prefix: Optional[str] = Field(None, description="Text put before the run name in the log folder name.")
    log_tracker_name: Optional[str] = Field(
        None, description="W&B project and TensorBoard subfolder (default: network_train, as in sd-scripts)."
    )
    wandb_run_name: Optional[str] = Field(None, description="Name of the W&B run (default: the run name). The API key comes from `wandb login` or WANDB_API_KEY, never from a profile.")
    log_tracker_config: Optional[Path] = Field(
        None, description="TOML with a [wandb] table of wandb.init arguments (entity, tags, group, notes ...) and/or a [tensorboard] table of SummaryWriter arguments."
    )
    log_config: bool = Field(False, description="Send the resolved profile to TensorBoard / W&B as the run config.")
    validate_every_n_steps: Optional[int] = Field(
        None, ge=1, description="Validation loss on the held-out split (dataset.validation_split) every N steps."
    )
    validate_every_n_epochs: Optional[int] = Field(
        None, ge=1, description="Validation loss every N epochs (default: every epoch when there is a validation split, as in sd-scripts)."
    )
    max_validation_steps: Optional[int] = Field(
        None, ge=1, description="Validation batches per evaluation (default: the whole split)."
    )


class SliderPair(Table):
    target: str = Field(description="The prompt the slider acts on: its prediction is trained at strength +1 and -1.")
    positive: str = Field(description="The prompt of the attribute's +1 end (e.g. 'old person').")
    negative: str = Field(description="The prompt of its -1 end (e.g. 'young person'); may be empty.")
    neutral: Optional[str] = Field(None, description="The prompt whose base prediction anchors the target; empty: `target`.")
    guidance_scale: Optional[float] = Field(
        None, gt=0, description="This pair's eta; empty: slider.guidance_scale.")
    weight: float = Field(1.0, ge=0, description="This pair's loss weight.")


class SliderTable(Table):
    pairs: list[SliderPair] = Field(
        default_factory=list,
        description="Prompt pairs ([[slider.pairs]] with target, positive, negative, optional neutral, guidance_scale, "
        "weight). Any pair makes the run a slider: no images, the base model's predictions are the targets.",
    )
    guidance_scale: float = Field(
        1.0, gt=0, description="eta: at +1 the LoRA's prediction on the target is trained toward neutral + eta·(positive − "
        "negative), at -1 toward neutral − eta·(positive − negative) (velocities of the base model).")
    resolution: Union[int, list[int]] = Field(
        1024, description="Size of the random latents the slider trains on: one int (square) or [width, height]; multiples of 16.")
    denoise_steps: int = Field(
        0, ge=0, le=50, description="0: the noised state is random latents noised to the drawn σ; N: N Euler steps of the "
        "base model on the target prompt from pure noise down to σ (N more forwards per step, states sampling reaches).")
    preview_strengths: list[float] = Field(
        default_factory=lambda: [-1.0, 0.0, 1.0],
        description="LoRA strengths each preview prompt is rendered at (same seed), side by side in its sheet.")


class Profile(Table):
    model: ModelTable = Field(default_factory=ModelTable, description="Model files and how they run.")
    dataset: DatasetTable = Field(default_factory=DatasetTable, description="Images, captions and buckets.")
    caching: CachingTable = Field(default_factory=CachingTable, description="Latent and text-output caches.")
    network: NetworkTable = Field(default_factory=NetworkTable, description="The LoRA being trained.")
    optimizer: OptimizerTable = Field(default_factory=OptimizerTable, description="Optimizer and learning-rate schedule.")
    training: TrainingTable = Field(default_factory=TrainingTable, description="Steps, precision, flow-matching math.")
    memory: MemoryTable = Field(default_factory=MemoryTable, description="Memory strategies.")
    saving: SavingTable = Field(default_factory=SavingTable, description="What is written and when.")
    sampling: SamplingTable = Field(default_factory=SamplingTable, description="Preview images during training.")
    logging: LoggingTable = Field(default_factory=LoggingTable, description="Progress and logs.")
    slider: SliderTable = Field(default_factory=SliderTable, description="Slider LoRA from prompt pairs (Concept Sliders).")


TABLES = tuple(Profile.model_fields)
