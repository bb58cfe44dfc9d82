"""Every option has a test that fails when the option stops having its effect (issue #16).

LEDGER maps each key anima-train accepts to the test(s) that catch it doing nothing:
* every field of every profile table ("training.ip_noise_gamma"), read from the pydantic schema;
* every key of an sd-scripts dataset config ("dataset_config.num_repeats"), read from the allowed-key tables of
  anima_core/data/config.py ([general], [[datasets]] and [[datasets.subsets]] share one name space);
* every network arg of lora_anima ("network.args.rank_dropout") and of the lycoris plugin
  ("network.args.lycoris.factor"), read from their parsers' known-arg lists.

A key without an entry fails here: add the test that proves the key does what it is for, and name it below as
"tests/file.py::test_name" (a parametrized case as "tests/file.py::test_name[case id]"). A key whose reader was
removed must leave the ledger too. The sd-scripts flags of anima_core/kohya/flags.py are checked against the same
ledger: a flag lands on a ledger key, is read by an importer rule, or is ignored with a reason.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import get_args, get_origin

from pydantic import BaseModel

from anima_core.config.schema import Profile
from anima_core.data import config as dataset_config
from anima_core.kohya.flags import FLAGS
from anima_plugins.lora.args import KNOWN_ARGS
from anima_plugins.lycoris.args import ALGO_ARGS

ROOT = Path(__file__).resolve().parent.parent

S = "tests/test_option_sensitivity.py::test_the_option_changes_the_trained_lora"  # one changed LoRA per case
E = "tests/test_option_effects.py::"
DC = "tests/test_data_config.py::"
DI = "tests/test_data_images.py::"
DCA = "tests/test_data_caching.py::"
LN = "tests/test_lora_network.py::"
LS = "tests/test_lora_selection.py::"
LY = "tests/test_lycoris.py::"
MS = "tests/test_memory_strategies.py::"
OPT = "tests/test_optimizers.py::"
SCH = "tests/test_schedules.py::"
FL = "tests/test_flow.py::"
TR = "tests/test_trackers.py::"
ES = "tests/test_option_effect_sizes.py::"  # the size of the effect: a share of draws, a scale, a range
VA = "tests/test_validation.py::"
PP = "tests/test_prior_preservation.py::"
SL = "tests/test_slider.py::"
# Keys of the dataset config that are also [dataset] keys are resolved by one lookup (subset, dataset, [general],
# profile); this test proves each reaches the resolved spec, the test named beside it what the spec does with it.
RESOLVED = DC + "test_every_dataset_config_key_reaches_the_resolved_spec"
MEMORY = MS + "test_each_memory_key_of_a_profile_enables_its_strategy"  # the key enables its strategy
PROFILE_DATA = DC + "test_every_profile_dataset_key_reaches_the_data_options"

LEDGER: dict[str, list[str]] = {
    # ---- [model] ------------------------------------------------------------------------------------------
    "model.loader": [E + "test_model_and_caching_options_reach_the_loaders"],
    "model.dit": ["tests/test_train.py::test_tiny_run_learns_and_writes_everything",
                  "tests/test_validate.py::test_model_files_tokenizers_device_and_dataset_values_are_reported_together"],
    "model.qwen3": ["tests/test_train.py::test_text_encoder_lora_trains_when_not_cached",
                    "tests/test_validate.py::test_model_files_tokenizers_device_and_dataset_values_are_reported_together"],
    "model.vae": ["tests/test_data_images.py::test_cached_latents_match_encoding_the_batch_pixels",
                  "tests/test_validate.py::test_model_files_tokenizers_device_and_dataset_values_are_reported_together"],
    "model.llm_adapter": ["tests/test_models_errors.py::test_adapter_from_a_separate_file",
                          "tests/test_validate.py::test_block_count_adapter_and_dataset_config_are_read_before_training"],
    "model.qwen3_tokenizer": [E + "test_model_and_caching_options_reach_the_loaders", "tests/test_models_text_vae.py::test_a_named_tokenizer_folder_wins_and_a_wrong_one_names_the_key"],
    "model.t5_tokenizer": [E + "test_model_and_caching_options_reach_the_loaders", "tests/test_models_errors.py::test_tokenizer_folder_without_tokenizer_files"],
    "model.qwen3_max_token_length": [S + "[qwen3_max_token_length]",
                                    ES + "test_token_lengths_pad_and_cut_the_encoded_text_to_that_many_tokens"],
    "model.t5_max_token_length": [S + "[t5_max_token_length]",
                                 ES + "test_token_lengths_pad_and_cut_the_encoded_text_to_that_many_tokens"],
    "model.apply_t5_attn_mask": [S + "[apply_t5_attn_mask]", "tests/test_models_dit.py::test_t5_attn_mask_option"],
    "model.attn_mode": [E + "test_model_and_caching_options_reach_the_loaders",
                        "tests/test_models_dit.py::test_missing_attention_package_warns_and_falls_back"],
    "model.split_attn": [E + "test_model_and_caching_options_reach_the_loaders",
                         "tests/test_models_dit.py::test_split_attention_matches_batched_attention"],
    "model.compile_blocks": [E + "test_model_compile_blocks_compiles_the_trainers_dit",
                             "tests/test_step_executors.py::test_blocks_are_compiled_by_default_on_cuda_and_eager_on_the_cpu"],
    "model.cuda_graphs": ["tests/test_step_executors.py::test_graph_capture_is_refused_with_each_reason_and_the_run_stays_compiled",
                          "tests/test_step_executors.py::test_graphs_without_compiled_blocks_is_a_profile_error"],
    "model.transformer_dtype": [E + "test_model_and_caching_options_reach_the_loaders"],
    "model.vae_chunk_size": [E + "test_model_and_caching_options_reach_the_loaders",
                             "tests/test_models_text_vae.py::test_chunked_vae_is_exact_and_tiled_vae_keeps_shapes"],
    "model.vae_tiled": [E + "test_model_and_caching_options_reach_the_loaders",
                        "tests/test_models_text_vae.py::test_chunked_vae_is_exact_and_tiled_vae_keeps_shapes"],
    "model.vae_dtype": [E + "test_model_and_caching_options_reach_the_loaders"],
    # ---- [dataset] (each also reaches the data options: PROFILE_DATA) -------------------------------------
    "dataset.dataset_config": [DI + "test_dataset_config_with_finetuning_metadata",
                               "tests/test_cli_first_hour.py::test_plan_uses_the_named_files_and_the_dataset_configs_resolution_and_batch"],
    "dataset.train_data_dir": [PROFILE_DATA, DI + "test_kohya_folders_buckets_and_step_counts"],
    "dataset.reg_data_dir": [PROFILE_DATA, DI + "test_regularisation_images_are_balanced_and_weighted"],
    "dataset.resolution": [S + "[resolution]", PROFILE_DATA],
    "dataset.train_batch_size": [PROFILE_DATA, "tests/test_accumulation.py::test_batch_one_accumulated_twice_trains_the_batch_two_lora"],
    "dataset.enable_bucket": [PROFILE_DATA, DC + "test_fixed_resolution_without_buckets"],
    "dataset.min_bucket_reso": [PROFILE_DATA, DC + "test_bucket_limits_and_steps_shape_the_buckets"],
    "dataset.max_bucket_reso": [PROFILE_DATA, DC + "test_bucket_limits_and_steps_shape_the_buckets"],
    "dataset.bucket_reso_steps": [PROFILE_DATA, DC + "test_bucket_limits_and_steps_shape_the_buckets"],
    "dataset.bucket_no_upscale": [PROFILE_DATA, DC + "test_no_upscale_buckets",
                                 DC + "test_no_upscale_places_large_images_as_sd_scripts_rounds_them"],
    "dataset.caption_extension": [PROFILE_DATA, DI + "test_caption_extension_and_class_tokens_choose_the_caption"],
    "dataset.dataset_repeats": [PROFILE_DATA, DC + "test_options_fill_in_below_config_values"],
    "dataset.shuffle_caption": [S + "[shuffle_caption]", DC + "test_shuffle_keeps_the_first_tokens",
                               ES + "test_shuffle_caption_puts_every_tag_at_every_position_equally_often_after_keep_tokens"],
    "dataset.caption_separator": [S + "[caption_separator]",
                                 DC + "test_caption_separator_splits_the_tags"],
    "dataset.keep_tokens": [S + "[keep_tokens]", DC + "test_shuffle_keeps_the_first_tokens",
                           ES + "test_shuffle_caption_puts_every_tag_at_every_position_equally_often_after_keep_tokens"],
    "dataset.keep_tokens_separator": [PROFILE_DATA, DC + "test_keep_tokens_separator_example",
                                     DC + "test_a_third_keep_tokens_separator_stays_in_the_suffix"],
    "dataset.secondary_separator": [PROFILE_DATA, DC + "test_secondary_separator_keeps_a_group_together"],
    "dataset.enable_wildcard": [PROFILE_DATA, DC + "test_wildcards",
                               DC + "test_wildcard_picks_whole_lines"],
    "dataset.caption_prefix": [S + "[caption_prefix]", DC + "test_prefix_suffix_and_first_line"],
    "dataset.caption_suffix": [S + "[caption_suffix]", DC + "test_prefix_suffix_and_first_line"],
    "dataset.color_aug": [S + "[color_aug]",
                         ES + "test_color_aug_changes_a_third_of_the_samples"],
    "dataset.flip_aug": [S + "[flip_aug]",
                        ES + "test_flip_aug_mirrors_half_of_the_samples"],
    "dataset.random_crop": [S + "[random_crop]",
                           ES + "test_random_crop_offsets_are_uniform_over_the_slack_and_the_centre_crop_is_centred"],
    "dataset.caption_dropout_rate": [S + "[dataset.caption_dropout_rate]", DC + "test_caption_dropout_rate_and_every_n_epochs",
                                    ES + "test_caption_dropout_rate_empties_that_share_of_the_captions",
                                    ES + "test_caption_dropout_rate_with_cached_text_empties_that_share"],
    "dataset.caption_dropout_every_n_epochs": [PROFILE_DATA, DC + "test_caption_dropout_rate_and_every_n_epochs",
                                              DC + "test_caption_dropout_every_epoch"],
    "dataset.caption_tag_dropout_rate": [S + "[caption_tag_dropout_rate]", DC + "test_tag_dropout_keeps_fixed_tokens",
                                        ES + "test_caption_tag_dropout_rate_drops_that_share_of_the_tags_after_keep_tokens"],
    "dataset.token_warmup_min": [PROFILE_DATA, DC + "test_token_warmup"],
    "dataset.token_warmup_step": [PROFILE_DATA, DC + "test_token_warmup",
                                 DC + "test_token_warmup_step_one_is_one_step_and_the_caption_is_whole_from_that_step_on"],
    "dataset.prior_loss_weight": [PROFILE_DATA, DI + "test_regularisation_images_are_balanced_and_weighted",
                                  PP + "test_reg_subsets_keep_their_images_unless_prior_preservation_is_asked",
                                  PP + "test_a_run_trains_prior_samples_toward_the_base_model_and_reports_their_loss"],
    "dataset.reg_prior_preservation": [PROFILE_DATA, PP + "test_the_folder_forms_reg_data_dir_follows_reg_prior_preservation",
                                       PP + "test_reg_subsets_keep_their_images_unless_prior_preservation_is_asked",
                                       PP + "test_a_run_trains_prior_samples_toward_the_base_model_and_reports_their_loss"],
    "dataset.alpha_mask": [E + "test_an_alpha_mask_that_masks_everything_leaves_the_lora_untrained"],
    "dataset.resize_interpolation": [PROFILE_DATA, DI + "test_resize_interpolation_is_the_named_filter"],
    "dataset.validation_split": [VA + "test_validation_defaults_to_every_epoch_and_max_validation_steps_bounds_it",
                                 DI + "test_validation_split_uses_its_own_seed"],
    "dataset.validation_seed": [PROFILE_DATA, DI + "test_validation_split_uses_its_own_seed"],
    "dataset.max_data_loader_n_workers": [PROFILE_DATA, DI + "test_loader_workers_give_the_same_batches"],
    "dataset.persistent_data_loader_workers": [PROFILE_DATA, DI + "test_loader_workers_give_the_same_batches"],
    "dataset.bad_image_policy": [DI + "test_error_policy_lists_every_bad_input",
                                 "tests/test_validate.py::test_the_image_scan_reports_each_bad_image_once_and_can_be_skipped"],
    # ---- [caching] ----------------------------------------------------------------------------------------
    "caching.cache_latents": [E + "test_model_and_caching_options_reach_the_loaders",
                              DCA + "test_run_with_cached_latents_does_not_load_the_vae"],
    "caching.cache_latents_to_disk": [DCA + "test_run_with_cached_latents_does_not_load_the_vae"],
    "caching.cache_text_encoder_outputs": [E + "test_model_and_caching_options_reach_the_loaders",
                                           DI + "test_caption_dropout_with_cached_text_gives_the_empty_caption_values",
                                           "tests/test_train.py::test_text_encoder_lora_trains_when_not_cached"],
    "caching.cache_text_encoder_outputs_to_disk": [DCA + "test_run_with_cached_latents_does_not_load_the_vae"],
    "caching.vae_batch_size": [E + "test_model_and_caching_options_reach_the_loaders"],
    "caching.text_encoder_batch_size": [E + "test_model_and_caching_options_reach_the_loaders"],
    "caching.skip_cache_check": [DCA + "test_skip_cache_check_trusts_existing_files",
                                 E + "test_skip_cache_check_makes_the_trainer_trust_disk_caches"],
    # ---- [network] ----------------------------------------------------------------------------------------
    "network.module": [LY + "test_run_trains_saves_and_self_checks_against_comfyui",
                       "tests/test_full_finetune.py::test_the_save_is_the_released_format_and_trains_a_lora_as_a_base"],
    "network.dim": [S + "[network.dim]", ES + "test_network_alpha_over_dim_is_the_scale_of_every_module"],
    "network.alpha": [S + "[network.alpha]", ES + "test_network_alpha_over_dim_is_the_scale_of_every_module"],
    "network.dropout": [S + "[network.dropout]", E + "test_network_dropout_drops_the_down_projection_as_sd_scripts_does",
                       ES + "test_network_dropout_zeroes_that_share_of_the_hidden_elements_and_rescales_the_rest"],
    "network.args": [S + "[rank_dropout]", LS + "test_arg_forms_of_both_generations"],
    "network.weights": [LN + "test_file_reloads_and_reproduces_the_trained_output", LY + "test_network_weights_continue_from_the_file"],
    "network.train_unet_only": ["tests/test_train.py::test_text_encoder_lora_trains_when_not_cached"],
    "network.allow_other_model": ["tests/test_lora_model_match.py::test_validate_names_the_mismatch_and_run_refuses_before_caching",
                                  "tests/test_lora_model_match.py::test_run_continues_on_another_model_when_the_profile_allows_it"],
    # ---- [optimizer] --------------------------------------------------------------------------------------
    "optimizer.optimizer_type": ["tests/test_train.py::test_other_optimizers_train", OPT + "test_optimizer_names_follow_sd_scripts"],
    "optimizer.optimizer_args": [S + "[optimizer_args.weight_decay]",
                                ES + "test_optimizer_args_reach_the_optimizer_weight_decay_shrinks_lora_down_by_lr_times_it"],
    "optimizer.learning_rate": [S + "[learning_rate]",
                               ES + "test_learning_rate_and_unet_lr_scale_the_step"],
    "optimizer.unet_lr": [S + "[unet_lr]",
                         ES + "test_learning_rate_and_unet_lr_scale_the_step",
                         LN + "test_component_learning_rates_loraplus_and_freezing"],
    "optimizer.text_encoder_lr": [LN + "test_component_learning_rates_loraplus_and_freezing"],
    "optimizer.self_attn_lr": [S + "[self_attn_lr]",
                              LN + "test_component_learning_rates_loraplus_and_freezing"],
    "optimizer.cross_attn_lr": [S + "[cross_attn_lr]",
                               ES + "test_cross_attn_lr_is_the_rate_of_exactly_the_cross_attention_modules"],
    "optimizer.mlp_lr": [S + "[mlp_lr]",
                        LN + "test_component_learning_rates_loraplus_and_freezing"],
    "optimizer.mod_lr": [LN + "test_component_learning_rates_loraplus_and_freezing"],
    "optimizer.llm_adapter_lr": [LN + "test_component_learning_rates_loraplus_and_freezing"],
    "optimizer.max_grad_norm": [S + "[max_grad_norm]",
                               ES + "test_max_grad_norm_is_the_norm_of_the_clipped_gradient"],
    "optimizer.fused_backward_pass": [OPT + "test_fused_backward_pass_updates_as_the_unfused_optimizer"],
    "optimizer.scale_weight_norms": [OPT + "test_scale_weight_norms_caps_every_pair_and_reports_it"],
    "optimizer.lr_scheduler": [SCH + "test_each_schedule_gives_the_library_functions_rates[linear]"],
    "optimizer.lr_warmup_steps": [SCH + "test_warmup_follows_sd_scripts_first_step_at_zero_and_fractions_of_all_steps",
                                 SCH + "test_a_step_count_of_one_written_as_a_float_is_one_step"],
    "optimizer.lr_decay_steps": [SCH + "test_each_schedule_gives_the_library_functions_rates[warmup_stable_decay]",
                                SCH + "test_warmup_stable_decay_with_a_fraction_of_decay_steps_cycles_and_no_floor"],
    "optimizer.lr_scheduler_num_cycles": [SCH + "test_each_schedule_gives_the_library_functions_rates[cosine_with_restarts]"],
    "optimizer.lr_scheduler_power": [SCH + "test_each_schedule_gives_the_library_functions_rates[polynomial]"],
    "optimizer.lr_scheduler_min_lr_ratio": [SCH + "test_each_schedule_gives_the_library_functions_rates[cosine_with_min_lr]"],
    "optimizer.lr_scheduler_timescale": [SCH + "test_each_schedule_gives_the_library_functions_rates[inverse_sqrt]"],
    "optimizer.lr_scheduler_type": [SCH + "test_a_scheduler_class_by_path_with_its_arguments",
                                   SCH + "test_a_scheduler_class_from_any_module_by_its_path"],
    "optimizer.lr_scheduler_args": [SCH + "test_a_scheduler_class_by_path_with_its_arguments",
                                    SCH + "test_each_schedule_gives_the_library_functions_rates[piecewise_constant]",
                                   SCH + "test_lr_scheduler_args_reach_every_schedule"],
    "optimizer.ema_decay": [OPT + "test_ema_options_set_the_decay_the_interval_and_the_device",
                            OPT + "test_ema_is_the_saved_lora_and_serves_previews_when_asked"],
    "optimizer.ema_every_n_steps": [OPT + "test_ema_options_set_the_decay_the_interval_and_the_device"],
    "optimizer.ema_device": [OPT + "test_ema_options_set_the_decay_the_interval_and_the_device"],
    "optimizer.ema_save": [OPT + "test_ema_is_saved_beside_the_lora_and_resumes_bit_for_bit"],
    "optimizer.ema_for_previews": [OPT + "test_ema_is_the_saved_lora_and_serves_previews_when_asked"],
    "optimizer.ema_for_validation": [OPT + "test_validation_uses_the_ema_when_asked"],
    # ---- [training] ---------------------------------------------------------------------------------------
    "training.max_train_steps": ["tests/test_train.py::test_tiny_run_learns_and_writes_everything"],
    "training.max_train_epochs": [E + "test_epoch_options_set_the_length_the_saves_and_the_previews"],
    "training.gradient_accumulation_steps": [S + "[gradient_accumulation_steps]",
                                             "tests/test_accumulation.py::test_batch_one_accumulated_twice_trains_the_batch_two_lora"],
    "training.mixed_precision": ["tests/test_validate.py::test_bf16_on_the_cpu_trains_in_float32_unless_asked_for_explicitly"],
    "training.full_bf16": [E + "test_model_and_caching_options_reach_the_loaders"],
    "training.seed": [S + "[seed]", "tests/test_train.py::test_same_seed_gives_identical_loras"],
    "training.device": [E + "test_process_options_reach_the_process_group_and_torch",
                        "tests/test_distributed.py::test_validate_refuses_what_several_processes_cannot_do"],
    "training.timestep_sampling": [S + "[timestep_sampling=uniform]", E + "test_the_profiles_timestep_sampler_is_the_one_called"],
    "training.discrete_flow_shift": [S + "[discrete_flow_shift]", FL + "test_shift_formula"],
    "training.sigmoid_scale": [S + "[sigmoid_scale]", FL + "test_logit_normal_is_shifted_sigmoid_of_scaled_normal_then_clamped"],
    "training.weighting_scheme": [S + "[weighting_scheme=cosmap]", FL + "test_weightings"],
    "training.logit_mean": [S + "[logit_mean]", FL + "test_sigma_table_sampling"],
    "training.logit_std": [S + "[logit_std]", FL + "test_sigma_table_sampling"],
    "training.mode_scale": [S + "[mode_scale]", FL + "test_mode_density_formula"],
    "training.loss_type": [S + "[loss_type=l1]", FL + "test_loss_types"],
    "training.huber_schedule": [S + "[huber_schedule]", FL + "test_loss_types"],
    "training.huber_c": [S + "[huber_c]", FL + "test_loss_types"],
    "training.huber_scale": [S + "[huber_scale]", FL + "test_loss_types"],
    "training.ip_noise_gamma": [S + "[ip_noise_gamma]", FL + "test_noising_and_input_perturbation"],
    "training.ip_noise_gamma_random_strength": [S + "[ip_noise_gamma_random_strength]",
                                                "tests/test_step_reference.py::test_input_perturbation_strength_is_gamma_or_uniform_below_it"],
    "training.caption_dropout_rate": [S + "[training.caption_dropout_rate]",
                                      E + "test_caption_dropout_rate_one_makes_the_captions_irrelevant"],
    "training.loss_weighting": ["tests/test_plugins.py::test_profile_selects_the_third_party_weighting_by_name"],
    "training.nan_guard_max_bad_steps": ["tests/test_nan_guard.py::test_bad_steps_without_a_remedy_stop_with_state_saved"],
    "training.nan_guard_lr_factor": ["tests/test_nan_guard.py::test_bad_steps_in_a_row_reload_the_last_state_with_a_lower_rate"],
    "training.num_processes": ["tests/test_distributed.py::test_a_trainer_built_in_python_does_not_ignore_num_processes",
                               "tests/test_distributed.py::test_detached_two_process_run_trains_the_one_process_lora"],
    "training.num_cpu_threads_per_process": [E + "test_process_options_reach_the_process_group_and_torch"],
    "training.ddp_timeout": [E + "test_process_options_reach_the_process_group_and_torch"],
    "training.fsdp": ["tests/test_fsdp.py::test_two_sharded_processes_train_one_processs_weights_and_resume_bit_for_bit",
                      "tests/test_fsdp.py::test_sharding_one_process_is_refused_when_the_run_starts"],
    # ---- [memory] -----------------------------------------------------------------------------------------
    "memory.gradient_checkpointing": [MEMORY + "[gradient_checkpointing]"],
    "memory.selective_checkpointing": [MEMORY + "[selective_checkpointing]",
                                       "tests/test_selective_checkpointing.py::test_loss_and_lora_gradients_equal_training_without_checkpointing"],
    "memory.cpu_offload_checkpointing": [MEMORY + "[cpu_offload_checkpointing]", MS + "test_cpu_offload_keeps_block_inputs_in_cpu_memory"],
    "memory.unsloth_offload_checkpointing": [MEMORY + "[unsloth_offload_checkpointing]", MS + "test_unsloth_does_not_keep_the_graph_of_the_block"],
    "memory.blocks_to_swap": [MEMORY + "[blocks_to_swap]",
                              "tests/test_memory_block_swap.py::test_training_and_sampling_move_each_block_exactly_as_planned"],
    "memory.fp8_base": [MEMORY + "[fp8_base]", MS + "test_fp8_stores_linear_weights_as_float8_and_keeps_names"],
    "memory.fp8_base_unet": [MEMORY + "[fp8_base_unet]"],
    "memory.extra_strategies": [E + "test_model_and_caching_options_reach_the_loaders"],
    # ---- [saving] -----------------------------------------------------------------------------------------
    "saving.output_dir": [E + "test_saving_options_shape_the_saved_file"],
    "saving.output_name": [E + "test_saving_options_shape_the_saved_file"],
    "saving.save_model_as": [E + "test_saving_options_shape_the_saved_file"],
    "saving.save_precision": [E + "test_saving_options_shape_the_saved_file"],
    "saving.save_every_n_epochs": [E + "test_epoch_options_set_the_length_the_saves_and_the_previews"],
    "saving.save_every_n_steps": ["tests/test_train.py::test_tiny_run_learns_and_writes_everything"],
    "saving.save_last_n_epochs": [E + "test_epoch_options_set_the_length_the_saves_and_the_previews"],
    "saving.save_last_n_steps": [E + "test_save_last_n_steps_keeps_the_saves_of_the_last_n_steps"],
    "saving.save_state": [E + "test_saving_options_shape_the_saved_file", E + "test_epoch_options_set_the_length_the_saves_and_the_previews",
                          "tests/test_resume.py::test_stops_mid_epoch_at_the_boundary_and_after_it_resume_exactly"],
    "saving.save_state_every_n_steps": ["tests/test_nan_guard.py::test_bad_steps_in_a_row_reload_the_last_state_with_a_lower_rate"],
    "saving.keep_last_n_states": [E + "test_saving_options_shape_the_saved_file"],
    "saving.no_metadata": [E + "test_epoch_options_set_the_length_the_saves_and_the_previews"],
    "saving.metadata_title": [E + "test_saving_options_shape_the_saved_file"],
    "saving.metadata_author": [E + "test_saving_options_shape_the_saved_file"],
    "saving.metadata_description": [E + "test_saving_options_shape_the_saved_file"],
    "saving.metadata_license": [E + "test_saving_options_shape_the_saved_file"],
    "saving.metadata_tags": [E + "test_saving_options_shape_the_saved_file"],
    "saving.training_comment": [E + "test_saving_options_shape_the_saved_file"],
    # ---- [sampling] ---------------------------------------------------------------------------------------
    "sampling.sample_prompts": ["tests/test_previews_e2e.py::test_previews_do_not_change_training"],
    "sampling.sample_every_n_steps": ["tests/test_previews_e2e.py::test_previews_do_not_change_training"],
    "sampling.sample_every_n_epochs": [E + "test_epoch_options_set_the_length_the_saves_and_the_previews"],
    "sampling.sample_at_first": ["tests/test_previews_e2e.py::test_previews_do_not_change_training"],
    # a single value: the Euler flow sampler, checked against its formula
    "sampling.sample_sampler": ["tests/test_sampling_math.py::test_one_step_without_guidance_is_one_euler_step"],
    # ---- [logging] ----------------------------------------------------------------------------------------
    "logging.log_every_n_steps": [E + "test_epoch_options_set_the_length_the_saves_and_the_previews"],
    "logging.progress": [E + "test_epoch_options_set_the_length_the_saves_and_the_previews",
                         "tests/test_progress_terminal.py::test_live_bar_shows_the_real_total_and_ctrl_c_is_acknowledged_at_once"],
    "logging.run_name": [E + "test_saving_options_shape_the_saved_file"],
    "logging.log_with": [TR + "test_tensorboard_and_wandb_get_every_step_validation_previews_and_config"],
    "logging.logging_dir": [TR + "test_tracker_config_reaches_the_writer"],
    "logging.log_prefix": [TR + "test_tensorboard_and_wandb_get_every_step_validation_previews_and_config"],
    "logging.log_tracker_name": [TR + "test_tracker_config_reaches_the_writer"],
    "logging.wandb_run_name": [TR + "test_tensorboard_and_wandb_get_every_step_validation_previews_and_config"],
    "logging.log_tracker_config": [TR + "test_tracker_config_reaches_the_writer"],
    "logging.log_config": [TR + "test_tensorboard_and_wandb_get_every_step_validation_previews_and_config"],
    "logging.validate_every_n_steps": [VA + "test_validation_runs_at_the_requested_steps_and_epochs"],
    "logging.validate_every_n_epochs": [VA + "test_validation_runs_at_the_requested_steps_and_epochs"],
    "logging.max_validation_steps": [VA + "test_validation_defaults_to_every_epoch_and_max_validation_steps_bounds_it"],
    # ---- sd-scripts dataset config ([general] / [[datasets]] / [[datasets.subsets]]) --------------------------
    "dataset_config.alpha_mask": [RESOLVED, E + "test_an_alpha_mask_that_masks_everything_leaves_the_lora_untrained"],
    "dataset_config.batch_size": [RESOLVED, DI + "test_kohya_folders_buckets_and_step_counts"],
    "dataset_config.bucket_no_upscale": [RESOLVED, DC + "test_no_upscale_buckets",
                                        DC + "test_no_upscale_places_large_images_as_sd_scripts_rounds_them"],
    "dataset_config.bucket_reso_steps": [RESOLVED, DC + "test_bucket_limits_and_steps_shape_the_buckets"],
    "dataset_config.min_bucket_reso": [RESOLVED, DC + "test_bucket_limits_and_steps_shape_the_buckets"],
    "dataset_config.max_bucket_reso": [RESOLVED, DC + "test_bucket_limits_and_steps_shape_the_buckets"],
    "dataset_config.enable_bucket": [RESOLVED, DC + "test_fixed_resolution_without_buckets"],
    "dataset_config.resolution": [RESOLVED, DC + "test_readme_example_loads_with_sd_scripts_lookup_order"],
    "dataset_config.network_multiplier": [RESOLVED, "tests/test_network_multiplier.py::test_each_batch_carries_its_datasets_network_multiplier"],
    "dataset_config.resize_interpolation": [RESOLVED, DI + "test_resize_interpolation_is_the_named_filter"],
    "dataset_config.validation_seed": [RESOLVED, DI + "test_validation_split_uses_its_own_seed"],
    "dataset_config.validation_split": [RESOLVED, DI + "test_validation_split_uses_its_own_seed"],
    "dataset_config.cache_info": [DC + "test_bad_configs_are_refused_with_the_reason"],  # no reader: refused
    "dataset_config.caption_dropout_every_n_epochs": [RESOLVED, DC + "test_caption_dropout_rate_and_every_n_epochs",
                                                     DC + "test_caption_dropout_every_epoch"],
    "dataset_config.caption_dropout_rate": [RESOLVED, DC + "test_caption_dropout_rate_and_every_n_epochs",
                                           ES + "test_caption_dropout_rate_empties_that_share_of_the_captions",
                                           ES + "test_caption_dropout_rate_with_cached_text_empties_that_share"],
    "dataset_config.caption_extension": [RESOLVED, DI + "test_caption_extension_and_class_tokens_choose_the_caption"],
    "dataset_config.caption_prefix": [RESOLVED, DC + "test_prefix_suffix_and_first_line"],
    "dataset_config.caption_separator": [RESOLVED, DC + "test_caption_separator_splits_the_tags"],
    "dataset_config.caption_suffix": [RESOLVED, DC + "test_prefix_suffix_and_first_line"],
    "dataset_config.caption_tag_dropout_rate": [RESOLVED, DC + "test_tag_dropout_keeps_fixed_tokens",
                                               ES + "test_caption_tag_dropout_rate_drops_that_share_of_the_tags_after_keep_tokens"],
    "dataset_config.class_tokens": [RESOLVED, DI + "test_caption_extension_and_class_tokens_choose_the_caption"],
    "dataset_config.color_aug": [RESOLVED, S + "[color_aug]",
                                ES + "test_color_aug_changes_a_third_of_the_samples"],
    "dataset_config.custom_attributes": [DC + "test_bad_configs_are_refused_with_the_reason"],  # no reader: refused
    "dataset_config.enable_wildcard": [RESOLVED, DC + "test_wildcards",
                                      DC + "test_wildcard_picks_whole_lines"],
    "dataset_config.face_crop_aug_range": [DC + "test_bad_configs_are_refused_with_the_reason"],  # unsupported: refused
    "dataset_config.flip_aug": [RESOLVED, S + "[flip_aug]",
                               ES + "test_flip_aug_mirrors_half_of_the_samples"],
    "dataset_config.image_dir": [DI + "test_dataset_config_with_finetuning_metadata", DC + "test_options_fill_in_below_config_values"],
    "dataset_config.is_reg": [DC + "test_readme_example_loads_with_sd_scripts_lookup_order",
                              DI + "test_regularisation_images_are_balanced_and_weighted"],
    "dataset_config.keep_tokens": [RESOLVED, DC + "test_shuffle_keeps_the_first_tokens",
                                  ES + "test_shuffle_caption_puts_every_tag_at_every_position_equally_often_after_keep_tokens"],
    "dataset_config.keep_tokens_separator": [RESOLVED, DC + "test_keep_tokens_separator_example",
                                            DC + "test_a_third_keep_tokens_separator_stays_in_the_suffix"],
    "dataset_config.metadata_file": [DI + "test_dataset_config_with_finetuning_metadata"],
    "dataset_config.num_repeats": [RESOLVED, DI + "test_kohya_folders_buckets_and_step_counts"],
    "dataset_config.prior_preservation": [RESOLVED, PP + "test_reg_subsets_keep_their_images_unless_prior_preservation_is_asked",
                                          PP + "test_the_prior_loss_is_the_mse_to_the_lora_off_prediction",
                                          PP + "test_prior_subsets_are_never_held_out_for_validation"],
    "dataset_config.random_crop": [RESOLVED, S + "[random_crop]",
                                  ES + "test_random_crop_offsets_are_uniform_over_the_slack_and_the_centre_crop_is_centred"],
    "dataset_config.secondary_separator": [RESOLVED, DC + "test_secondary_separator_keeps_a_group_together"],
    "dataset_config.shuffle_caption": [RESOLVED, DC + "test_shuffle_keeps_the_first_tokens",
                                      ES + "test_shuffle_caption_puts_every_tag_at_every_position_equally_often_after_keep_tokens"],
    "dataset_config.token_warmup_min": [RESOLVED, DC + "test_token_warmup"],
    "dataset_config.token_warmup_step": [RESOLVED, DC + "test_token_warmup",
                                        DC + "test_token_warmup_step_one_is_one_step_and_the_caption_is_whole_from_that_step_on"],
    # ---- network args of lora_anima ---------------------------------------------------------------------------
    "network.args.target_preset": [LS + "test_guide_default_is_16_modules_per_block_with_adaln",
                                   LS + "test_sd_scripts_default_is_10_modules_per_block"],
    "network.args.self_attn_dim": [LS + "test_component_dims_of_the_guide"],
    "network.args.cross_attn_dim": [LS + "test_component_dims_of_the_guide"],
    "network.args.mlp_dim": [LS + "test_component_dims_of_the_guide"],
    "network.args.mod_dim": [LS + "test_component_dims_of_the_guide",
                            LS + "test_an_explicit_rank_of_one_lifts_the_preset_exclusion"],
    "network.args.llm_adapter_dim": [LS + "test_llm_adapter_dim_and_emb_dims"],
    "network.args.emb_dims": [LS + "test_llm_adapter_dim_and_emb_dims",
                             LS + "test_an_explicit_rank_of_one_lifts_the_preset_exclusion"],
    "network.args.train_block_indices": [S + "[train_block_indices]", LS + "test_train_block_indices"],
    "network.args.train_llm_adapter": [LS + "test_llm_adapter_blocks_join_with_train_llm_adapter"],
    "network.args.verbose": [LN + "test_reg_lrs_override_and_verbose_table",
                            LS + "test_each_module_left_out_is_listed_with_its_reason"],
    "network.args.rank_dropout": [S + "[rank_dropout]", LN + "test_lora_module_formula_and_rank_dropout_on_5d_input",
                                   ES + "test_rank_dropout_zeroes_that_share_of_ranks_per_sample_and_rescales_the_rest"],
    "network.args.module_dropout": [S + "[module_dropout]", LN + "test_dropouts_in_training_mode_run_through_the_dit",
                                     ES + "test_module_dropout_skips_that_share_of_the_modules_in_training_only",
                                     ES + "test_a_skipped_module_gives_exactly_the_base_output_and_a_kept_one_the_whole_lora"],
    "network.args.loraplus_lr_ratio": [LY + "test_loraplus_and_component_rates_group_the_parameters"],
    "network.args.loraplus_unet_lr_ratio": [LN + "test_component_learning_rates_loraplus_and_freezing"],
    "network.args.loraplus_text_encoder_lr_ratio": [LN + "test_component_learning_rates_loraplus_and_freezing"],
    "network.args.exclude_patterns": [LS + "test_sd_scripts_patterns_and_reg_dims"],
    "network.args.include_patterns": [LS + "test_sd_scripts_patterns_and_reg_dims",
                                     LS + "test_an_embedder_brought_in_by_include_patterns_gets_the_network_dim"],
    "network.args.network_reg_dims": [LS + "test_sd_scripts_patterns_and_reg_dims"],
    "network.args.network_reg_lrs": [LN + "test_reg_lrs_override_and_verbose_table"],
    "network.args.fused": ["tests/test_fused_lora.py::test_the_fused_arg_selects_the_path_and_auto_is_off_on_the_cpu",
                           "tests/test_fused_lora.py::test_a_short_training_trains_the_same_lora_fused_on_and_off"],
    # ---- network args of the lycoris plugin (the selection args above are shared) -----------------------------
    "network.args.lycoris.algo": [LY + "test_every_key_is_a_form_comfyui_maps"],
    "network.args.lycoris.factor": [LY + "test_lycoris_args_change_the_modules"],
    "network.args.lycoris.decompose_both": [LY + "test_lycoris_args_change_the_modules"],
    "network.args.lycoris.full_matrix": [LY + "test_lycoris_args_change_the_modules"],
    "network.args.lycoris.unbalanced_factorization": [LY + "test_lycoris_args_change_the_modules"],
    "network.args.lycoris.use_scalar": [LY + "test_lycoris_args_change_the_modules"],
    "network.args.lycoris.dora_wd": [LY + "test_comfyui_rule_for_dora_uses_the_input_column_norm"],
    "network.args.lycoris.wd_on_output": [LY + "test_args_lycoris_cannot_honour_are_validate_errors"],  # only false
    "network.args.lycoris.rs_lora": [LY + "test_lycoris_args_change_the_modules"],
    "network.args.lycoris.rank_dropout_scale": [LY + "test_lycoris_args_change_the_modules"],
    "network.args.lycoris.bypass_mode": [LY + "test_bypass_mode_with_network_dropout_trains_and_self_checks"],
    # ---- [slider] (and the keys of each [[slider.pairs]] entry) -----------------------------------------------
    "slider.pairs": [SL + "test_a_trained_slider_moves_plus_and_minus_one_in_opposite_directions",
                     SL + "test_targets_are_the_base_models_velocities_combined_as_by_hand"],
    "slider.pairs.target": [SL + "test_the_step_trains_plus_one_toward_v_plus_and_minus_one_toward_v_minus"],
    "slider.pairs.positive": [SL + "test_targets_are_the_base_models_velocities_combined_as_by_hand"],
    "slider.pairs.negative": [SL + "test_targets_are_the_base_models_velocities_combined_as_by_hand"],
    "slider.pairs.neutral": [SL + "test_targets_are_the_base_models_velocities_combined_as_by_hand"],
    "slider.pairs.guidance_scale": [SL + "test_targets_are_the_base_models_velocities_combined_as_by_hand"],
    "slider.pairs.weight": [SL + "test_the_step_trains_plus_one_toward_v_plus_and_minus_one_toward_v_minus"],
    "slider.guidance_scale": [SL + "test_targets_are_the_base_models_velocities_combined_as_by_hand"],
    "slider.resolution": [SL + "test_targets_are_the_base_models_velocities_combined_as_by_hand",
                          SL + "test_the_run_reports_its_pairs_and_the_file_records_them"],
    "slider.denoise_steps": [SL + "test_the_step_trains_plus_one_toward_v_plus_and_minus_one_toward_v_minus[2]"],
    "slider.preview_strengths": [SL + "test_previews_render_each_prompt_at_every_strength_with_one_seed"],
}


def importer_flag_patterns() -> list[re.Pattern]:
    """The flag names importer.py's rules read: its "--name" strings, f-strings as patterns."""
    tree = ast.parse((ROOT / "anima_core/kohya/importer.py").read_text())
    patterns = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
            patterns.append(re.escape(node.value))
        elif isinstance(node, ast.JoinedStr):
            parts = [re.escape(p.value) if isinstance(p, ast.Constant) else r"\w+" for p in node.values]
            if parts and parts[0].startswith(re.escape("--")):
                patterns.append("".join(parts))
    return [re.compile(p) for p in patterns]


def accepted_keys() -> set[str]:
    """Every key a user can set, read from the code that accepts it."""
    keys = {f"{table}.{name}" for table, field in Profile.model_fields.items() for name in field.annotation.model_fields}
    # a list of tables (slider.pairs): the keys of its entries too ("slider.pairs.target")
    keys |= {f"{table}.{name}.{key}" for table, field in Profile.model_fields.items()
             for name, info in field.annotation.model_fields.items() if get_origin(info.annotation) is list
             for entry in get_args(info.annotation) if isinstance(entry, type) and issubclass(entry, BaseModel)
             for key in entry.model_fields}
    config_tables = (dataset_config.GENERAL_KEYS, dataset_config.DREAMBOOTH_SUBSET_ONLY_KEYS,
                     dataset_config.FINETUNE_SUBSET_ONLY_KEYS)
    keys |= {f"dataset_config.{name}" for table in config_tables for name in table}
    keys |= {f"network.args.{name}" for name in KNOWN_ARGS}
    keys |= {f"network.args.lycoris.{name}" for name in ALGO_ARGS}
    return keys


@cache
def functions_of(path: str) -> dict[str, set[str] | None]:
    """test function name -> its parametrize ids when they are literal (None: any id is accepted)."""
    tree = ast.parse((ROOT / path).read_text())
    literals = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    found: dict[str, set[str] | None] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            found[node.name] = parametrize_ids(node, literals)
    return found


def parametrize_ids(function: ast.FunctionDef, literals: dict[str, ast.expr]) -> set[str] | None:
    for decorator in function.decorator_list:
        if isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("parametrize"):
            ids = [k.value for k in decorator.keywords if k.arg == "ids"]
            values = ids[0] if ids else decorator.args[1] if len(decorator.args) > 1 else None
            if isinstance(values, ast.Call) and ast.unparse(values.func) in ("sorted", "list") and len(values.args) == 1:
                values = values.args[0]
            if isinstance(values, ast.Name):
                values = literals.get(values.id)
            if isinstance(values, ast.Dict):
                values = ast.List(elts=values.keys)
            if isinstance(values, (ast.List, ast.Tuple)) and all(isinstance(e, ast.Constant) for e in values.elts):
                return {str(e.value) for e in values.elts}
            return None
    return None


def missing_test(reference: str) -> str | None:
    """Why ``reference`` names no test, or None."""
    path, _, name = reference.partition("::")
    if not (ROOT / path).is_file():
        return f"{reference}: no file {path}"
    function, _, case = name.partition("[")
    tests = functions_of(path)
    if function not in tests:
        return f"{reference}: {path} has no test {function}"
    ids = tests[function]
    if case and ids is not None and case.rstrip("]") not in ids:
        return f"{reference}: {function} has no case {case.rstrip(']')!r} (cases: {', '.join(sorted(ids))})"
    return None


def test_every_accepted_key_has_a_test_that_catches_it_doing_nothing():
    missing = sorted(accepted_keys() - set(LEDGER))
    assert not missing, (
        f"{len(missing)} key(s) have no entry in LEDGER of tests/test_option_ledger.py: {', '.join(missing)}. Write a "
        "test that fails when the key stops having its effect (the trained LoRA, a saved file, a gradient, a drawn σ, "
        "a pruned file ...), check it fails with the key's reader broken, and add \"key\": [\"tests/file.py::test\"].")


def test_the_ledger_names_no_key_that_is_gone():
    gone = sorted(set(LEDGER) - accepted_keys())
    assert not gone, f"LEDGER names key(s) nothing accepts any more: {', '.join(gone)}; remove their entries."


def test_every_named_test_exists():
    problems = [why for key, refs in LEDGER.items() for ref in (refs or [None])
                for why in [missing_test(ref) if ref else f"{key}: no test named"] if why]
    assert not problems, "\n".join(problems)


def test_every_sd_scripts_flag_lands_on_a_ledger_key_or_says_why_not():
    problems, rules = [], importer_flag_patterns()
    for name, flag in FLAGS.items():
        if flag.mapped:
            if f"{flag.table}.{flag.key}" not in LEDGER:
                problems.append(f"{name} maps to {flag.table}.{flag.key}, which is not in the ledger")
            if flag.ignored:
                problems.append(f"{name} is both mapped and ignored")
        elif flag.ignored is not None:
            if not flag.ignored.strip():
                problems.append(f"{name} is ignored without a reason")
        elif not any(p.fullmatch(name) for p in rules):
            problems.append(f"{name} is neither mapped, ignored with a reason, nor read by a rule of importer.py")
    assert not problems, "\n".join(problems)
