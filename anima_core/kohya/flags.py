"""Every argument `anima_train_network.py` accepts (first release e21a7736 and current 48d368fa), and what
each becomes in a profile.

A flag is one of:
* mapped: (table, key, converter), the value lands in the profile as sd-scripts reads it;
* handled by a rule in `importer.py` because its meaning depends on the sd-scripts generation or on other
  flags (timestep sampling, shift, caption dropout, fp8, attention, text-encoder training ...);
* ignored with a reason: it does nothing for Anima in sd-scripts either (`NO_EFFECT`), it only concerns the
  host, logging or launcher (`HOST`), or anima-train has no equivalent (`UNSUPPORTED`). Each is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from anima_core.kohya import values as v

Arity = Literal["switch", "value", "values"]
Generation = Literal["first", "current"]

NO_EFFECT = "does nothing for Anima in sd-scripts either"
HOST = "concerns the launcher, logging or host only; it does not change what is trained"
UNSUPPORTED = "has no equivalent in anima-train; the profile trains without it"


@dataclass(frozen=True)
class Flag:
    name: str
    arity: Arity = "value"
    table: str | None = None
    key: str | None = None
    convert: Callable[[Any], Any] | None = None
    ignored: str | None = None  # why the flag is left out of the profile
    generation: Generation | None = None  # the only sd-scripts generation that has this flag

    @property
    def mapped(self) -> bool:
        return self.table is not None


def _switch(value: Any) -> bool:
    return True


def _text(value: str) -> str:
    return value


def _first_float(items: list[str]) -> float:
    """--text_encoder_lr takes a list (one per text encoder); Anima has one."""
    if len(items) != 1:
        raise v.ValueProblem(f"expected one learning rate for the single Qwen3 text encoder, got {items}")
    return v.as_float(items[0])


FLAGS: dict[str, Flag] = {}


def _add(name: str, arity: Arity = "value", target: str | None = None, convert=None, *, ignored=None, generation=None):
    table, key = target.split(".") if target else (None, None)
    if table and convert is None:
        convert = _switch if arity == "switch" else _text
    FLAGS[name] = Flag(name, arity, table, key, convert, ignored, generation)


def _rule(name: str, arity: Arity = "value", generation: Generation | None = None) -> None:
    """A flag the importer's rules read (see importer.py)."""
    FLAGS[name] = Flag(name, arity, generation=generation)


# --- model files and how they run --------------------------------------------------------------------
_rule("--dit_path", generation="first")
_rule("--pretrained_model_name_or_path")
_rule("--qwen3_path", generation="first")
_rule("--qwen3", generation="current")
_rule("--vae_path", generation="first")
_rule("--vae")
_rule("--llm_adapter_path")
_add("--t5_tokenizer_path", target="model.t5_tokenizer")
_add("--qwen3_max_token_length", target="model.qwen3_max_token_length", convert=v.as_int)
_add("--t5_max_token_length", target="model.t5_max_token_length", convert=v.as_int)
_add("--apply_t5_attn_mask", "switch", "model.apply_t5_attn_mask")  # documented by the guide
_rule("--flash_attn", "switch", generation="first")
_rule("--attn_mode", generation="current")
_add("--split_attn", "switch", "model.split_attn", generation="current")
_rule("--xformers", "switch")
_add("--transformer_dtype", target="model.transformer_dtype", generation="first")
_add("--vae_chunk_size", target="model.vae_chunk_size", convert=v.as_int, generation="current")
_add("--vae_disable_cache", "switch", generation="current",
     ignored="disables the VAE's cache of causal-conv features between video frames; a single image never uses it, "
     "so it changes nothing here")
_add("--tokenizer_cache_dir", ignored=HOST)
_add("--disable_mmap_load_safetensors", "switch", ignored=HOST)

# --- flow matching ---------------------------------------------------------------------------------
_rule("--timestep_sample_method", generation="first")
_rule("--timestep_sampling", generation="current")
_rule("--discrete_flow_shift")
_add("--sigmoid_scale", target="training.sigmoid_scale", convert=v.as_float)
_add("--weighting_scheme", target="training.weighting_scheme")
_add("--logit_mean", target="training.logit_mean", convert=v.as_float)
_add("--logit_std", target="training.logit_std", convert=v.as_float)
_add("--mode_scale", target="training.mode_scale", convert=v.as_float)
_add("--loss_type", target="training.loss_type")
_rule("--huber_schedule")
_add("--huber_c", target="training.huber_c", convert=v.as_float)
_add("--huber_scale", target="training.huber_scale", convert=v.as_float)
_add("--ip_noise_gamma", target="training.ip_noise_gamma", convert=v.as_float)
_add("--ip_noise_gamma_random_strength", "switch", "training.ip_noise_gamma_random_strength")
_rule("--caption_dropout_rate")

# --- learning rates and optimizer ---------------------------------------------------------------------
_rule("--learning_rate")
_add("--unet_lr", target="optimizer.unet_lr", convert=v.as_float)
_add("--text_encoder_lr", "values", "optimizer.text_encoder_lr", _first_float)
for _component in ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter"):
    _rule(f"--{_component}_lr")
_rule("--optimizer_type")
_rule("--use_8bit_adam", "switch")
_rule("--use_lion_optimizer", "switch")
_add("--optimizer_args", "values", "optimizer.optimizer_args", v.optimizer_args)
_add("--max_grad_norm", target="optimizer.max_grad_norm", convert=v.as_float)
_add("--fused_backward_pass", "switch", "optimizer.fused_backward_pass")
_add("--lr_scheduler", target="optimizer.lr_scheduler")
_add("--lr_warmup_steps", target="optimizer.lr_warmup_steps", convert=v.as_int_or_float)
_add("--lr_scheduler_num_cycles", target="optimizer.lr_scheduler_num_cycles", convert=v.as_int)
_add("--lr_scheduler_power", target="optimizer.lr_scheduler_power", convert=v.as_float)
_add("--lr_scheduler_min_lr_ratio", target="optimizer.lr_scheduler_min_lr_ratio", convert=v.as_float)
_add("--lr_scheduler_type", target="optimizer.lr_scheduler_type")
_add("--lr_scheduler_args", "values", "optimizer.lr_scheduler_args", v.lr_scheduler_args)
_add("--lr_decay_steps", target="optimizer.lr_decay_steps", convert=v.as_int_or_float)
_add("--lr_scheduler_timescale", target="optimizer.lr_scheduler_timescale", convert=v.as_int)

# --- training length, precision, randomness -----------------------------------------------------------
_add("--max_train_steps", target="training.max_train_steps", convert=v.as_int)
_add("--max_train_epochs", target="training.max_train_epochs", convert=v.as_int)
_add("--gradient_accumulation_steps", target="training.gradient_accumulation_steps", convert=v.as_int)
_rule("--mixed_precision")
_add("--full_bf16", "switch", "training.full_bf16")
_add("--full_fp16", "switch", ignored=UNSUPPORTED + " (fp16 LoRA weights); use mixed_precision = 'fp16' or full_bf16")
_add("--seed", target="training.seed", convert=v.as_int)

# --- LoRA network ---------------------------------------------------------------------------------------
_add("--network_module", target="network.module")
_add("--network_dim", target="network.dim", convert=v.as_int)
_add("--network_alpha", target="network.alpha", convert=v.as_float)
_add("--network_dropout", target="network.dropout", convert=v.as_float)
_add("--network_args", "values", "network.args", v.network_args)
_add("--network_weights", target="network.weights")
_rule("--network_train_unet_only", "switch")
_add("--network_train_text_encoder_only", "switch", ignored=UNSUPPORTED + " (a Qwen3-only LoRA)")
_add("--dim_from_weights", "switch", ignored=UNSUPPORTED + "; set network.dim to the rank of network.weights")
_add("--scale_weight_norms", target="optimizer.scale_weight_norms", convert=v.as_float)
_add("--base_weights", "values", ignored=UNSUPPORTED + " (LoRAs merged into the base before training)")
_add("--base_weights_multiplier", "values", ignored=UNSUPPORTED + " (LoRAs merged into the base before training)")

# --- memory -------------------------------------------------------------------------------------------
_add("--gradient_checkpointing", "switch", "memory.gradient_checkpointing")
_add("--cpu_offload_checkpointing", "switch", "memory.cpu_offload_checkpointing")
_add("--unsloth_offload_checkpointing", "switch", "memory.unsloth_offload_checkpointing")
_add("--blocks_to_swap", target="memory.blocks_to_swap", convert=v.as_int)
_rule("--fp8_base", "switch")
_rule("--fp8_base_unet", "switch")

# --- caching ------------------------------------------------------------------------------------------
_add("--cache_latents", "switch", "caching.cache_latents")
_add("--cache_latents_to_disk", "switch", "caching.cache_latents_to_disk")
_rule("--cache_text_encoder_outputs", "switch")
_rule("--cache_text_encoder_outputs_to_disk", "switch")
_add("--vae_batch_size", target="caching.vae_batch_size", convert=v.as_int)
_add("--text_encoder_batch_size", target="caching.text_encoder_batch_size", convert=v.as_int)
_add("--skip_cache_check", "switch", "caching.skip_cache_check")

# --- dataset ------------------------------------------------------------------------------------------
_add("--dataset_config", target="dataset.dataset_config")
_add("--train_data_dir", target="dataset.train_data_dir")
_add("--reg_data_dir", target="dataset.reg_data_dir")
_add("--resolution", target="dataset.resolution", convert=v.as_resolution)
_add("--train_batch_size", target="dataset.train_batch_size", convert=v.as_int)
_add("--enable_bucket", "switch", "dataset.enable_bucket")
_add("--min_bucket_reso", target="dataset.min_bucket_reso", convert=v.as_int)
_add("--max_bucket_reso", target="dataset.max_bucket_reso", convert=v.as_int)
_add("--bucket_reso_steps", target="dataset.bucket_reso_steps", convert=v.as_int)
_add("--bucket_no_upscale", "switch", "dataset.bucket_no_upscale")
_add("--caption_extension", target="dataset.caption_extension")
_add("--caption_extention", target="dataset.caption_extension")  # sd-scripts' old misspelling
_add("--dataset_repeats", target="dataset.dataset_repeats", convert=v.as_int)
_add("--shuffle_caption", "switch", "dataset.shuffle_caption")
_add("--caption_separator", target="dataset.caption_separator")
_add("--keep_tokens", target="dataset.keep_tokens", convert=v.as_int)
_add("--keep_tokens_separator", target="dataset.keep_tokens_separator")
_add("--secondary_separator", target="dataset.secondary_separator")
_add("--enable_wildcard", "switch", "dataset.enable_wildcard")
_add("--caption_prefix", target="dataset.caption_prefix")
_add("--caption_suffix", target="dataset.caption_suffix")
_add("--color_aug", "switch", "dataset.color_aug")
_add("--flip_aug", "switch", "dataset.flip_aug")
_add("--random_crop", "switch", "dataset.random_crop")
_add("--caption_dropout_every_n_epochs", target="dataset.caption_dropout_every_n_epochs", convert=v.as_int)
_add("--caption_tag_dropout_rate", target="dataset.caption_tag_dropout_rate", convert=v.as_float)
_add("--token_warmup_min", target="dataset.token_warmup_min", convert=v.as_int)
_add("--token_warmup_step", target="dataset.token_warmup_step", convert=v.as_float)
_add("--prior_loss_weight", target="dataset.prior_loss_weight", convert=v.as_float)
_add("--alpha_mask", "switch", "dataset.alpha_mask")
_add("--masked_loss", "switch", "dataset.alpha_mask")  # sd-scripts: masked loss from the alpha channel here
_add("--resize_interpolation", target="dataset.resize_interpolation")
_add("--validation_split", target="dataset.validation_split", convert=v.as_float)
_add("--validation_seed", target="dataset.validation_seed", convert=v.as_int)
_add("--max_data_loader_n_workers", target="dataset.max_data_loader_n_workers", convert=v.as_int)
_add("--persistent_data_loader_workers", "switch", "dataset.persistent_data_loader_workers")
_add("--cache_info", "switch", ignored=HOST + " (sd-scripts writes the image sizes to a file to start faster; "
     "anima-train reads every image at start)")
_add("--face_crop_aug_range", ignored=UNSUPPORTED + " (face-centred crops)")
_add("--in_json", ignored=UNSUPPORTED + " as a flag; put metadata_file in the dataset config")
_add("--dataset_class", ignored=UNSUPPORTED + " (custom dataset classes)")
_add("--conditioning_data_dir", ignored=NO_EFFECT + " (ControlNet data)")
_add("--debug_dataset", "switch", ignored=HOST)
_add("--validate_every_n_steps", target="logging.validate_every_n_steps", convert=v.as_int)
_add("--validate_every_n_epochs", target="logging.validate_every_n_epochs", convert=v.as_int)
_add("--max_validation_steps", target="logging.max_validation_steps", convert=v.as_int)

# --- saving and metadata ----------------------------------------------------------------------------
_add("--output_dir", target="saving.output_dir")
_add("--output_name", target="saving.output_name")
_rule("--save_model_as")
_add("--save_precision", target="saving.save_precision")
_add("--save_every_n_epochs", target="saving.save_every_n_epochs", convert=v.as_int)
_add("--save_every_n_steps", target="saving.save_every_n_steps", convert=v.as_int)
_add("--save_last_n_epochs", target="saving.save_last_n_epochs", convert=v.as_int)
_add("--save_last_n_steps", target="saving.save_last_n_steps", convert=v.as_int)
_add("--save_state", "switch", "saving.save_state")
_add("--save_state_on_train_end", "switch", "saving.save_state")
_add("--save_last_n_epochs_state", ignored=UNSUPPORTED + " by epochs; saving.keep_last_n_states counts states")
_add("--save_last_n_steps_state", ignored=UNSUPPORTED + " by steps; saving.keep_last_n_states counts states")
_add("--save_n_epoch_ratio", ignored=UNSUPPORTED + "; use save_every_n_epochs")
_add("--resume", ignored=UNSUPPORTED + " as a profile key; continue a run with `anima-train resume RUN_DIR`")
_add("--no_metadata", "switch", "saving.no_metadata")
_add("--training_comment", target="saving.training_comment")
for _meta in ("title", "author", "description", "license", "tags"):
    _add(f"--metadata_{_meta}", target=f"saving.metadata_{_meta}")
for _meta in ("usage_hint", "thumbnail", "merged_from", "trigger_phrase", "preprocessor", "is_negative_embedding"):
    _add(f"--metadata_{_meta}", ignored=UNSUPPORTED + " (this modelspec field is not written)")
for _hub in ("repo_id", "repo_type", "path_in_repo", "token", "repo_visibility"):
    _add(f"--huggingface_{_hub}", ignored=UNSUPPORTED + " (uploads to the Hugging Face Hub)")
_add("--save_state_to_huggingface", "switch", ignored=UNSUPPORTED + " (uploads to the Hugging Face Hub)")
_add("--resume_from_huggingface", "switch", ignored=UNSUPPORTED + " (uploads to the Hugging Face Hub)")
_add("--async_upload", "switch", ignored=UNSUPPORTED + " (uploads to the Hugging Face Hub)")

# --- previews -----------------------------------------------------------------------------------------
_add("--sample_prompts", target="sampling.sample_prompts")
_add("--sample_every_n_steps", target="sampling.sample_every_n_steps", convert=v.as_int)
_add("--sample_every_n_epochs", target="sampling.sample_every_n_epochs", convert=v.as_int)
_add("--sample_at_first", "switch", "sampling.sample_at_first")
_rule("--sample_sampler")

# --- SD 1.x/2.x options (guide §4.1, spec §5.5) -------------------------------------------------------
for _name in ("--v2", "--v_parameterization", "--noise_offset_random_strength", "--zero_terminal_snr",
              "--scale_v_pred_loss_like_noise_pred", "--debiased_estimation_loss", "--weighted_captions",
              "--no_half_vae"):
    _add(_name, "switch", ignored=NO_EFFECT)
for _name in ("--clip_skip", "--noise_offset", "--multires_noise_iterations", "--multires_noise_discount",
              "--adaptive_noise_scale", "--min_snr_gamma", "--v_pred_like_loss", "--max_token_length",
              "--min_timestep", "--max_timestep"):
    _add(_name, ignored=NO_EFFECT)

# --- host, logging, launcher ----------------------------------------------------------------------------
for _name in ("--console_log_simple", "--lowram", "--highvram", "--sdpa", "--mem_eff_attn",
              "--ddp_gradient_as_bucket_view", "--ddp_static_graph", "--output_config", "--torch_compile"):
    _add(_name, "switch", ignored=HOST)
_add("--skip_until_initial_step", "switch", ignored=UNSUPPORTED + " (starting part-way through the schedule)")
_add("--initial_epoch", ignored=UNSUPPORTED + " (starting part-way through the schedule)")
_add("--initial_step", ignored=UNSUPPORTED + " (starting part-way through the schedule)")
for _name in ("--console_log_level", "--console_log_file", "--dynamo_backend"):
    _add(_name, ignored=HOST)
_add("--ddp_timeout", target="training.ddp_timeout", convert=v.as_int)

# --- TensorBoard / W&B ----------------------------------------------------------------------------------
_rule("--log_with")  # "all" means both; --logging_dir alone means TensorBoard
for _key in ("logging_dir", "log_prefix", "log_tracker_name", "wandb_run_name", "log_tracker_config"):
    _add(f"--{_key}", target=f"logging.{_key}")
_add("--log_config", "switch", "logging.log_config")
_add("--wandb_api_key", ignored="is never stored: W&B reads its key from `wandb login` or WANDB_API_KEY")
# Credentials: their values are kept out of the profile, its comments and the import notes.
SECRET_FLAGS = ("--wandb_api_key", "--huggingface_token")
_add("--config_file", ignored=UNSUPPORTED + " here; import the command line that config file stands for")
for _name in ("--deepspeed", "--zero3_init_flag", "--zero3_save_16bit_model", "--fp16_master_weights_and_gradients"):
    _add(_name, "switch", ignored=UNSUPPORTED + " (DeepSpeed)")
for _name in ("--zero_stage", "--offload_optimizer_device", "--offload_optimizer_nvme_path", "--offload_param_device",
              "--offload_param_nvme_path"):
    _add(_name, ignored=UNSUPPORTED + " (DeepSpeed)")

FIRST_ONLY_NETWORK_ARGS = ("self_attn_dim", "cross_attn_dim", "mlp_dim", "mod_dim", "llm_adapter_dim", "emb_dims",
                           "train_block_indices")
CURRENT_ONLY_NETWORK_ARGS = ("exclude_patterns", "include_patterns", "network_reg_dims", "network_reg_lrs")
