"""sd-scripts command lines → profiles (anima_core.kohya)."""

from __future__ import annotations

import tomllib

import pytest

from anima_core.config import profile_from_dict
from anima_core.kohya import CommandLineError, UnknownFlagError, import_command_line
from anima_core.kohya.flags import FLAGS

# Guide §4, verbatim.
GUIDE_COMMAND = r"""accelerate launch --num_cpu_threads_per_process 1 anima_train_network.py \
  --dit_path="<path to Anima DiT model>" \
  --qwen3_path="<path to Qwen3-0.6B model or directory>" \
  --vae_path="<path to WanVAE model>" \
  --llm_adapter_path="<path to LLM adapter model>" \
  --dataset_config="my_anima_dataset_config.toml" \
  --output_dir="<output directory>" \
  --output_name="my_anima_lora" \
  --save_model_as=safetensors \
  --network_module=networks.lora_anima \
  --network_dim=8 \
  --network_alpha=8 \
  --learning_rate=1e-4 \
  --optimizer_type="AdamW8bit" \
  --lr_scheduler="constant" \
  --timestep_sample_method="logit_normal" \
  --discrete_flow_shift=3.0 \
  --max_train_epochs=10 \
  --save_every_n_epochs=1 \
  --mixed_precision="bf16" \
  --gradient_checkpointing \
  --cache_latents \
  --cache_text_encoder_outputs \
  --blocks_to_swap=18
"""

PLACEHOLDERS = {
    "<path to Anima DiT model>": "dit.safetensors",
    "<path to Qwen3-0.6B model or directory>": "qwen3.safetensors",
    "<path to WanVAE model>": "vae.safetensors",
    "<path to LLM adapter model>": "adapter.safetensors",
}


def imported(args: str, script: str = "python anima_train_network.py "):
    return import_command_line(script + args)


def test_guide_example_imports_and_validates(tmp_path):
    command = GUIDE_COMMAND.replace("<output directory>", str(tmp_path / "out"))
    for placeholder, name in PLACEHOLDERS.items():
        (tmp_path / name).write_bytes(b"")
        command = command.replace(placeholder, str(tmp_path / name))
    (tmp_path / "my_anima_dataset_config.toml").write_text("[[datasets]]\n")
    result = import_command_line(command)
    profile = profile_from_dict(result.data, base_dir=tmp_path)
    assert profile.model.dit == tmp_path / "dit.safetensors"
    assert profile.dataset.dataset_config == tmp_path / "my_anima_dataset_config.toml"
    assert result.data["dataset"]["dataset_config"] == "my_anima_dataset_config.toml"  # kept as written
    assert (profile.network.dim, profile.network.alpha, profile.network.module) == (8, 8.0, "networks.lora_anima")
    assert (profile.training.timestep_sampling, profile.training.discrete_flow_shift) == ("logit_normal", 3.0)
    assert profile.optimizer.optimizer_type == "AdamW8bit" and profile.optimizer.learning_rate == 1e-4
    assert profile.memory.blocks_to_swap == 18 and profile.memory.gradient_checkpointing
    assert profile.caching.cache_latents and profile.caching.cache_text_encoder_outputs
    assert profile.network.train_unet_only  # the first release never trains Qwen3
    assert profile.network.args == {"target_preset": "guide"}
    assert result.generation == "first"
    assert profile.training.num_cpu_threads_per_process == 1  # the launcher's option
    assert profile.training.num_processes == 1


# (flag text, table, key, value): every documented flag of guide §4.1, §7, §8 and the shared ones.
FLAG_CASES = [
    ("--dit_path=d.safetensors", "model", "dit", "d.safetensors"),
    ("--pretrained_model_name_or_path d.safetensors", "model", "dit", "d.safetensors"),
    ("--qwen3_path q", "model", "qwen3", "q"),
    ("--qwen3 q", "model", "qwen3", "q"),
    ("--vae_path v.pth", "model", "vae", "v.pth"),
    ("--vae v.safetensors", "model", "vae", "v.safetensors"),
    ("--llm_adapter_path a.safetensors", "model", "llm_adapter", "a.safetensors"),
    ("--t5_tokenizer_path configs/t5_old", "model", "t5_tokenizer", "configs/t5_old"),
    ("--qwen3_max_token_length 256", "model", "qwen3_max_token_length", 256),
    ("--t5_max_token_length 128", "model", "t5_max_token_length", 128),
    ("--apply_t5_attn_mask", "model", "apply_t5_attn_mask", True),
    ("--flash_attn", "model", "attn_mode", "flash"),
    ("--attn_mode flash", "model", "attn_mode", "flash"),
    ("--attn_mode torch", "model", "attn_mode", "torch"),
    ("--split_attn", "model", "split_attn", True),
    ("--transformer_dtype bfloat16", "model", "transformer_dtype", "bfloat16"),
    ("--vae_chunk_size 64", "model", "vae_chunk_size", 64),
    ("--timestep_sample_method uniform", "training", "timestep_sampling", "uniform"),
    ("--timestep_sampling shift", "training", "timestep_sampling", "shift"),
    ("--timestep_sampling flux_shift", "training", "timestep_sampling", "flux_shift"),
    ("--timestep_sampling sigma", "training", "timestep_sampling", "sigma"),
    ("--discrete_flow_shift 3.0", "training", "discrete_flow_shift", 3.0),
    ("--sigmoid_scale 1.5", "training", "sigmoid_scale", 1.5),
    ("--weighting_scheme cosmap", "training", "weighting_scheme", "cosmap"),
    ("--logit_mean -0.5", "training", "logit_mean", -0.5),
    ("--logit_std 1.2", "training", "logit_std", 1.2),
    ("--mode_scale 1.1", "training", "mode_scale", 1.1),
    ("--loss_type l1", "training", "loss_type", "l1"),
    ("--huber_schedule exponential", "training", "huber_schedule", "exponential"),
    ("--huber_c 0.2", "training", "huber_c", 0.2),
    ("--huber_scale 2", "training", "huber_scale", 2.0),
    ("--ip_noise_gamma 0.1", "training", "ip_noise_gamma", 0.1),
    ("--ip_noise_gamma_random_strength", "training", "ip_noise_gamma_random_strength", True),
    ("--caption_dropout_rate 0.1", "training", "caption_dropout_rate", 0.1),
    ("--self_attn_lr 1e-5", "optimizer", "self_attn_lr", 1e-5),
    ("--cross_attn_lr 0", "optimizer", "cross_attn_lr", 0.0),
    ("--mlp_lr 2e-5", "optimizer", "mlp_lr", 2e-5),
    ("--mod_lr 3e-5", "optimizer", "mod_lr", 3e-5),
    ("--llm_adapter_lr 0", "optimizer", "llm_adapter_lr", 0.0),
    ("--unet_lr 1e-4", "optimizer", "unet_lr", 1e-4),
    ("--text_encoder_lr 5e-5", "optimizer", "text_encoder_lr", 5e-5),
    ("--learning_rate 1e-4", "optimizer", "learning_rate", 1e-4),
    ("--optimizer_type adafactor", "optimizer", "optimizer_type", "Adafactor"),
    ("--use_8bit_adam", "optimizer", "optimizer_type", "AdamW8bit"),
    ("--max_grad_norm 0.0", "optimizer", "max_grad_norm", 0.0),
    ("--fused_backward_pass", "optimizer", "fused_backward_pass", True),
    ("--lr_scheduler constant_with_warmup", "optimizer", "lr_scheduler", "constant_with_warmup"),
    ("--lr_warmup_steps 100", "optimizer", "lr_warmup_steps", 100),
    ("--lr_warmup_steps 0.1", "optimizer", "lr_warmup_steps", 0.1),
    ("--lr_scheduler_num_cycles 3 --lr_scheduler cosine_with_restarts", "optimizer", "lr_scheduler_num_cycles", 3),
    ("--lr_scheduler_power 2 --lr_scheduler polynomial", "optimizer", "lr_scheduler_power", 2.0),
    ("--lr_scheduler_min_lr_ratio 0.1 --lr_scheduler cosine_with_min_lr", "optimizer", "lr_scheduler_min_lr_ratio", 0.1),
    ("--lr_decay_steps 0.2 --lr_scheduler warmup_stable_decay", "optimizer", "lr_decay_steps", 0.2),
    ("--lr_scheduler_timescale 50 --lr_scheduler inverse_sqrt", "optimizer", "lr_scheduler_timescale", 50),
    ("--lr_scheduler_type CosineAnnealingLR", "optimizer", "lr_scheduler_type", "CosineAnnealingLR"),
    ('--lr_scheduler_args "T_max=100" "eta_min=1e-6"', "optimizer", "lr_scheduler_args", {"T_max": 100, "eta_min": 1e-6}),
    ("--scale_weight_norms 1.0", "optimizer", "scale_weight_norms", 1.0),
    ("--optimizer_type prodigy", "optimizer", "optimizer_type", "Prodigy"),
    ("--optimizer_type pagedadamw8bit", "optimizer", "optimizer_type", "PagedAdamW8bit"),
    ("--use_lion_optimizer", "optimizer", "optimizer_type", "Lion"),
    ("--optimizer_type came_pytorch.CAME", "optimizer", "optimizer_type", "came_pytorch.CAME"),
    ("--max_train_epochs 10", "training", "max_train_epochs", 10),
    ("--max_train_steps 500", "training", "max_train_steps", 500),
    ("--gradient_accumulation_steps 4", "training", "gradient_accumulation_steps", 4),
    ("--mixed_precision bf16", "training", "mixed_precision", "bf16"),
    ("--full_bf16", "training", "full_bf16", True),
    ("--seed 7", "training", "seed", 7),
    ("--network_module networks.lora_anima", "network", "module", "networks.lora_anima"),
    ("--network_dim 16", "network", "dim", 16),
    ("--network_alpha 8", "network", "alpha", 8.0),
    ("--network_dropout 0.1", "network", "dropout", 0.1),
    ("--network_weights old.safetensors", "network", "weights", "old.safetensors"),
    ("--network_train_unet_only", "network", "train_unet_only", True),
    ("--gradient_checkpointing", "memory", "gradient_checkpointing", True),
    ("--cpu_offload_checkpointing", "memory", "cpu_offload_checkpointing", True),
    ("--unsloth_offload_checkpointing", "memory", "unsloth_offload_checkpointing", True),
    ("--blocks_to_swap 18", "memory", "blocks_to_swap", 18),
    ("--fp8_base", "memory", "fp8_base", True),
    ("--cache_latents", "caching", "cache_latents", True),
    ("--cache_latents_to_disk", "caching", "cache_latents_to_disk", True),
    ("--cache_text_encoder_outputs", "caching", "cache_text_encoder_outputs", True),
    ("--cache_text_encoder_outputs_to_disk", "caching", "cache_text_encoder_outputs_to_disk", True),
    ("--vae_batch_size 4", "caching", "vae_batch_size", 4),
    ("--dataset_config ../data/set.toml", "dataset", "dataset_config", "../data/set.toml"),
    ("--train_data_dir ./train", "dataset", "train_data_dir", "./train"),
    ("--reg_data_dir ./reg", "dataset", "reg_data_dir", "./reg"),
    ("--resolution 512,768", "dataset", "resolution", [512, 768]),
    ("--resolution 1024", "dataset", "resolution", 1024),
    ("--train_batch_size 2", "dataset", "train_batch_size", 2),
    ("--enable_bucket", "dataset", "enable_bucket", True),
    ("--min_bucket_reso 512", "dataset", "min_bucket_reso", 512),
    ("--max_bucket_reso 2048", "dataset", "max_bucket_reso", 2048),
    ("--bucket_reso_steps 32", "dataset", "bucket_reso_steps", 32),
    ("--bucket_no_upscale", "dataset", "bucket_no_upscale", True),
    ("--caption_extension .txt", "dataset", "caption_extension", ".txt"),
    ("--shuffle_caption", "dataset", "shuffle_caption", True),
    ("--keep_tokens 1", "dataset", "keep_tokens", 1),
    ("--flip_aug", "dataset", "flip_aug", True),
    ("--color_aug", "dataset", "color_aug", True),
    ("--random_crop", "dataset", "random_crop", True),
    ("--prior_loss_weight 0.5", "dataset", "prior_loss_weight", 0.5),
    ("--max_data_loader_n_workers 2", "dataset", "max_data_loader_n_workers", 2),
    ("--persistent_data_loader_workers", "dataset", "persistent_data_loader_workers", True),
    ("--output_dir out", "saving", "output_dir", "out"),
    ("--output_name my_lora", "saving", "output_name", "my_lora"),
    ("--save_model_as safetensors", "saving", "save_model_as", "safetensors"),
    ("--save_precision bf16", "saving", "save_precision", "bf16"),
    ("--save_every_n_epochs 2", "saving", "save_every_n_epochs", 2),
    ("--save_every_n_steps 100", "saving", "save_every_n_steps", 100),
    ("--save_last_n_epochs 3", "saving", "save_last_n_epochs", 3),
    ("--save_last_n_steps 300", "saving", "save_last_n_steps", 300),
    ("--save_state", "saving", "save_state", True),
    ("--save_state_on_train_end", "saving", "save_state", True),
    ("--no_metadata", "saving", "no_metadata", True),
    ("--metadata_title Title", "saving", "metadata_title", "Title"),
    ("--metadata_author me", "saving", "metadata_author", "me"),
    ("--training_comment hello", "saving", "training_comment", "hello"),
    ("--sample_prompts prompts.txt", "sampling", "sample_prompts", "prompts.txt"),
    ("--sample_every_n_steps 50", "sampling", "sample_every_n_steps", 50),
    ("--sample_every_n_epochs 1", "sampling", "sample_every_n_epochs", 1),
    ("--sample_at_first", "sampling", "sample_at_first", True),
    ("--sample_sampler euler", "sampling", "sample_sampler", "euler"),
    ("--validate_every_n_steps 50", "logging", "validate_every_n_steps", 50),
    ("--validate_every_n_epochs 2", "logging", "validate_every_n_epochs", 2),
    ("--max_validation_steps 4", "logging", "max_validation_steps", 4),
    ("--log_with all", "logging", "log_with", ["tensorboard", "wandb"]),
    ("--log_with wandb", "logging", "log_with", ["wandb"]),
    ("--logging_dir logs", "logging", "log_with", ["tensorboard"]),
    ("--logging_dir logs", "logging", "logging_dir", "logs"),
    ("--log_prefix lr1e-4-", "logging", "log_prefix", "lr1e-4-"),
    ("--log_tracker_name anima", "logging", "log_tracker_name", "anima"),
    ("--wandb_run_name first", "logging", "wandb_run_name", "first"),
    ("--log_tracker_config trackers.toml", "logging", "log_tracker_config", "trackers.toml"),
    ("--log_config", "logging", "log_config", True),
]


@pytest.mark.parametrize(("flag", "table", "key", "value"), FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_each_flag_maps_to_its_profile_key(flag, table, key, value):
    result = imported(flag)
    assert result.data[table][key] == value
    assert type(result.data[table][key]) is type(value)
    assert flag.split()[0].split("=")[0] in result.comments[(table, key)]


def test_every_flag_is_mapped_or_reported():
    """No flag of either sd-scripts generation disappears without a profile key or a warning."""
    for name, flag in FLAGS.items():
        text = name if flag.arity == "switch" else f"{name} 1"
        try:
            result = imported(text)
        except CommandLineError:
            continue  # a value of the wrong kind is reported too
        mentioned = any(name in c for c in result.comments.values()) or any(name in w for w in result.warnings)
        assert mentioned, name


def test_both_generations_give_the_same_profile():
    shared = (
        "--network_module networks.lora_anima --network_dim 8 --network_alpha 8 --learning_rate 1e-4 "
        "--mixed_precision bf16 --cache_latents --cache_text_encoder_outputs --network_train_unet_only "
        "--dataset_config d.toml --output_dir out --blocks_to_swap 18 "
    )
    first = imported(
        shared + "--dit_path dit.safetensors --qwen3_path qwen --vae_path vae.safetensors --flash_attn "
        "--timestep_sample_method uniform --discrete_flow_shift 1.0 --caption_dropout_rate 0.1"
    )
    current = imported(
        shared + "--pretrained_model_name_or_path dit.safetensors --qwen3 qwen --vae vae.safetensors "
        "--attn_mode flash --timestep_sampling uniform"
    )
    assert (first.generation, current.generation) == ("first", "current")
    # The generations differ in the default LoRA targets and in where caption dropout lives.
    assert first.data["network"]["args"].pop("target_preset") == "guide"
    assert current.data["network"]["args"].pop("target_preset") == "sd-scripts"
    assert first.data["training"].pop("caption_dropout_rate") == 0.1
    assert first.data == current.data


def test_current_generation_writes_sd_scripts_defaults():
    result = imported("--pretrained_model_name_or_path d --qwen3 q --vae v")
    training = result.data["training"]
    assert (training["timestep_sampling"], training["discrete_flow_shift"]) == ("sigmoid", 1.0)
    assert training["mixed_precision"] == "no"
    assert result.data["optimizer"]["learning_rate"] == 2e-6
    assert result.data["network"]["args"]["target_preset"] == "sd-scripts"
    assert "train_unet_only" not in result.data.get("network", {})


def test_first_generation_without_shift_uses_the_code_default_and_says_so():
    result = imported("--dit_path d")
    assert result.data["training"]["discrete_flow_shift"] == 1.0
    assert any("3.0" in w and "discrete_flow_shift" in w for w in result.warnings)


def test_current_uniform_is_not_shifted():
    result = imported("--pretrained_model_name_or_path d --timestep_sampling uniform --discrete_flow_shift 3")
    assert result.data["training"]["discrete_flow_shift"] == 1.0
    assert any("does not shift" in w for w in result.warnings)


def test_current_generation_caption_dropout_is_the_subset_rate_and_fp8_is_off():
    result = imported("--qwen3 q --caption_dropout_rate 0.2 --fp8_base --cache_text_encoder_outputs")
    assert result.data["dataset"]["caption_dropout_rate"] == 0.2
    assert "memory" not in result.data
    assert result.data["network"]["train_unet_only"] is True
    assert any("fp8" in w for w in result.warnings)
    assert any("refuses" in w for w in result.warnings)


def test_unknown_flags_are_named_with_suggestions():
    with pytest.raises(UnknownFlagError) as info:
        imported("--network_dimm 8 --dit_pth=x --totally_new")
    message = str(info.value)
    assert info.value.unknown == ["--network_dimm", "--dit_pth", "--totally_new"]
    assert "--network_dimm (did you mean --network_dim?)" in message
    assert "--dit_pth (did you mean --dit_path?)" in message
    assert "--totally_new" in message


def test_flags_without_effect_are_warned_about():
    result = imported("--dit_path d --v2 --v_parameterization --clip_skip 2 --noise_offset 0.1 --console_log_level INFO")
    for name in ("--v2", "--v_parameterization", "--clip_skip", "--noise_offset", "--console_log_level"):
        assert any(w.startswith(name) for w in result.warnings), name


def test_credentials_never_reach_the_profile():
    secret, token = "wandb-secret-0123456789", "hf-secret-9876543210"
    result = imported(f"--dit_path d --log_with wandb --wandb_api_key {secret} --huggingface_token={token}")
    text = result.toml()
    assert secret not in text and token not in text and "--wandb_api_key=<removed>" in text
    assert any(w.startswith("--wandb_api_key=<removed>: left out, it is never stored") for w in result.warnings)


def test_windows_caret_continuations_keep_backslashes():
    text = (
        "accelerate launch anima_train_network.py ^\n"
        '  --dit_path="C:\\models\\anima preview.safetensors" ^\n'
        "  --output_dir=D:\\out ^\n"
        "  --network_dim 4\n"
    )
    result = import_command_line(text)
    assert result.data["model"]["dit"] == "C:\\models\\anima preview.safetensors"
    assert result.data["saving"]["output_dir"] == "D:\\out"
    assert result.data["network"]["dim"] == 4


def test_powershell_backticks_comments_and_quotes():
    text = (
        "# my run\n"
        "python anima_train_network.py `\n"
        "  --output_name 'my lora' `\n"
        "  # a comment line\n"
        "  --network_dim=4\n"
    )
    result = import_command_line(text)
    assert result.data["saving"]["output_name"] == "my lora"
    assert result.data["network"]["dim"] == 4


def test_network_args_are_typed():
    result = imported(
        '--network_args "self_attn_dim=8" "train_llm_adapter=True" "verbose=false" "emb_dims=[8,4,8]" '
        '"train_block_indices=0-5,10,15-27" "rank_dropout=0.1" "exclude_patterns=[\'.*mlp.*\']" '
        '"network_reg_lrs=.*llm_adapter.*=5e-5" --dit_path d'
    )
    args = result.data["network"]["args"]
    assert args["self_attn_dim"] == 8 and args["rank_dropout"] == 0.1
    assert args["train_llm_adapter"] is True and args["verbose"] is False
    assert args["emb_dims"] == [8, 4, 8]
    assert args["train_block_indices"] == "0-5,10,15-27"
    assert args["exclude_patterns"] == [".*mlp.*"]
    assert args["network_reg_lrs"] == ".*llm_adapter.*=5e-5"


def test_optimizer_args_are_python_literals():
    result = imported(
        '--optimizer_type adafactor --optimizer_args "relative_step=False" "scale_parameter=False" '
        '"warmup_init=False" "betas=0.9,0.999" "weight_decay=0.01" --lr_scheduler constant_with_warmup '
        "--max_grad_norm 0.0"
    )
    assert result.data["optimizer"]["optimizer_args"] == {
        "relative_step": False,
        "scale_parameter": False,
        "warmup_init": False,
        "betas": [0.9, 0.999],
        "weight_decay": 0.01,
    }


def test_bad_values_and_stray_words_are_errors():
    with pytest.raises(CommandLineError) as info:
        imported("--network_dim eight stray --resolution 1,2,3 --cache_latents=yes")
    text = str(info.value)
    assert "--network_dim" in text and "'stray'" in text and "--resolution" in text and "--cache_latents" in text


def test_toml_has_comments_and_round_trips():
    result = import_command_line(GUIDE_COMMAND)
    text = result.toml()
    assert text.startswith("# Imported by `anima-train import-kohya`")
    assert 'dit = "<path to Anima DiT model>" # --dit_path="<path to Anima DiT model>"' in text
    assert "blocks_to_swap = 18 # --blocks_to_swap=18" in text
    assert tomllib.loads(text) == result.data

    with_args = imported('--dit_path d --network_args "emb_dims=[8,4,8]" --optimizer_args "betas=0.9,0.99"')
    assert "# emb_dims=[8,4,8]" in with_args.toml()
    assert tomllib.loads(with_args.toml()) == with_args.data


def test_vae_disable_cache_is_explained_not_mapped():
    """sd-scripts' cache carries causal-conv features between video frames; an image has one frame."""
    result = imported("--pretrained_model_name_or_path d --vae_disable_cache")
    (note,) = [w for w in result.warnings if w.startswith("--vae_disable_cache")]
    assert "single image never uses it" in note
    assert "vae_disable_cache" not in result.data.get("model", {})


@pytest.mark.parametrize(("line", "expected", "note"), [
    # sd-scripts' Adafactor default (relative_step) replaces the schedule and ignores group rates and warmup.
    ("--optimizer_type AdaFactor --lr_scheduler cosine --lr_warmup_steps 10 --unet_lr 1e-4",
     {"optimizer_type": "Adafactor", "lr_scheduler": "adafactor"}, "relative_step"),
    # Schedule-free optimizers get no schedule in sd-scripts.
    ("--optimizer_type adamwschedulefree --lr_scheduler linear --lr_warmup_steps 5",
     {"optimizer_type": "AdamWScheduleFree"}, "no schedule"),
    # A knob the chosen schedule does not read is dropped, as sd-scripts ignores it.
    ("--lr_scheduler cosine --lr_scheduler_min_lr_ratio 0.1 --lr_scheduler_num_cycles 2",
     {"lr_scheduler": "cosine"}, "sd-scripts ignores it for 'cosine'"),
    ("--lr_scheduler_type StepLR --lr_scheduler cosine", {"lr_scheduler_type": "StepLR"}, "replaces it"),
])
def test_run_time_rules_of_sd_scripts_are_written_into_the_profile(line, expected, note):
    from anima_core.config.schema import OptimizerTable
    from anima_core.config.optimizer_rules import schedule_problems

    result = imported(line)
    optimizer = {k: v for k, v in result.data["optimizer"].items() if k != "learning_rate"}
    assert optimizer == expected
    assert any(note in w for w in result.warnings), result.warnings
    assert schedule_problems(OptimizerTable(**result.data["optimizer"])) == []


def test_the_launchers_process_count_and_threads_are_imported():
    result = import_command_line(
        "accelerate launch --num_processes=4 --multi_gpu --num_cpu_threads_per_process 2 --main_process_port 29501 "
        "anima_train_network.py --output_dir out --ddp_timeout 45")
    training = tomllib.loads(result.toml())["training"]
    assert (training["num_processes"], training["num_cpu_threads_per_process"], training["ddp_timeout"]) == (4, 2, 45)
    assert any("--multi_gpu --main_process_port 29501" in w and "left out" in w for w in result.warnings)
    with pytest.raises(CommandLineError, match="--num_processes: expected a whole number"):
        import_command_line("accelerate launch --num_processes many anima_train_network.py --output_dir out")
