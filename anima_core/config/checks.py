"""Checks that need more than one field, or the registered plugins. Each returns readable problems."""

from __future__ import annotations

from anima_core.config.full_rules import FULL, fsdp_problems, full_problems
from anima_core.config.optimizer_rules import optimizer_problems
from anima_core.config.schema import Profile
from anima_core.config.slider_rules import is_slider, slider_problems
from anima_core.plugins import Plugins, UnknownNameError, default_plugins

def _file_problems(profile: Profile) -> list[str]:
    problems = []
    model = profile.model
    for key in ("dit", "qwen3", "vae"):
        if getattr(model, key) is None:
            problems.append(f"model.{key}: required; set the path of the {key} file")
    for key in ("dit", "qwen3", "vae", "llm_adapter", "qwen3_tokenizer", "t5_tokenizer"):
        path = getattr(model, key)
        if path is not None and not path.exists():
            problems.append(f"model.{key}: {path} does not exist")
    data = profile.dataset
    if data.dataset_config is None and data.train_data_dir is None and not is_slider(profile):
        problems.append("dataset: set dataset_config (an sd-scripts dataset TOML) or train_data_dir (a folder of N_name folders)")
    for key in ("dataset_config", "train_data_dir", "reg_data_dir"):
        path = getattr(data, key)
        if path is not None and not path.exists():
            problems.append(f"dataset.{key}: {path} does not exist")
    if profile.sampling.sample_prompts is not None and not profile.sampling.sample_prompts.exists():
        problems.append(f"sampling.sample_prompts: {profile.sampling.sample_prompts} does not exist")
    if profile.network.weights is not None and not profile.network.weights.exists():
        problems.append(f"network.weights: {profile.network.weights} does not exist")
    return problems


def _option_problems(profile: Profile) -> list[str]:
    problems = []
    data, training = profile.dataset, profile.training
    resolution = data.resolution
    sides = [resolution] if isinstance(resolution, int) else list(resolution or [])
    if len(sides) not in (0, 1, 2):
        problems.append("dataset.resolution: give one int or [width, height]")
    if any(side < 16 for side in sides):
        problems.append(f"dataset.resolution: {resolution} must be at least 16 on each side (a multiple of 16, like 1024)")
    elif any(side % 16 for side in sides):
        problems.append(f"dataset.resolution: {resolution} must be multiples of 16 (the DiT patches 2×2 latents of an 8× VAE)")
    if data.min_bucket_reso > data.max_bucket_reso:
        problems.append("dataset.min_bucket_reso: larger than max_bucket_reso")
    if profile.model.cuda_graphs and profile.model.compile_blocks is False:
        problems.append("model.cuda_graphs: replays compiled blocks; remove model.compile_blocks = false (or cuda_graphs)")
    if training.loss_type in ("huber", "smooth_l1") and training.huber_schedule == "snr":
        problems.append(
            "training.huber_schedule: 'snr' needs a noise schedule with alphas, which flow matching has not; use 'constant' or 'exponential'"
        )
    caching = profile.caching
    text_cached = caching.cache_text_encoder_outputs or caching.cache_text_encoder_outputs_to_disk
    if text_cached and not profile.network.train_unet_only and profile.network.module != FULL:
        problems.append(
            "caching.cache_text_encoder_outputs: a cached text encoder cannot get a LoRA; set network.train_unet_only = true, or turn caching off to train the Qwen3 LoRA"
        )
    if text_cached:
        for key in ("shuffle_caption", "caption_tag_dropout_rate", "token_warmup_step", "caption_dropout_every_n_epochs"):
            if getattr(data, key):
                problems.append(f"dataset.{key}: changes the caption every epoch, which cached text outputs cannot follow; turn text caching off")
    latents_cached = caching.cache_latents or caching.cache_latents_to_disk
    if latents_cached and data.color_aug:
        problems.append("dataset.color_aug: changes pixels every epoch, which cached latents cannot follow; turn cache_latents off")
    if latents_cached and data.random_crop:
        problems.append("dataset.random_crop: changes the crop every epoch, which cached latents cannot follow; turn cache_latents off")
    return problems


def _plugin_problems(profile: Profile, plugins: Plugins) -> list[str]:
    problems = []
    full = profile.network.module == FULL
    lookups = [
        ("register_model_loaders", "model.loader", profile.model.loader),
        *([] if full else [("register_networks", "network.module", profile.network.module)]),
        ("register_timestep_samplers", "training.timestep_sampling", profile.training.timestep_sampling),
    ]
    if profile.training.loss_weighting:
        lookups.append(("register_loss_weightings", "training.loss_weighting", profile.training.loss_weighting))
    lookups += [("register_memory_strategies", "memory.extra_strategies", n) for n in profile.memory.extra_strategies]
    for hook, key, name in lookups:
        try:
            plugins.registry(hook).resolve(name)
        except UnknownNameError as exc:
            problems.append(f"{key}: {exc}")
    try:
        network = None if full else plugins.registry("register_networks").get(profile.network.module)
    except UnknownNameError:
        network = None
    if hasattr(network, "validate"):  # a network plugin may check its own args and requirements
        problems += network.validate(profile)
    problems += optimizer_problems(profile, plugins)
    for entry in plugins.registry("register_memory_strategies").entries.values():
        strategy = entry.obj
        if strategy.enabled(profile) or entry.name in profile.memory.extra_strategies:
            problems += [f"memory: {p}" for p in strategy.validate(profile)]
    return problems + _logging_problems(profile, plugins)


def _logging_problems(profile: Profile, plugins: Plugins) -> list[str]:
    sinks = plugins.registry("register_event_sinks")
    problems = [f"logging.log_with: {name!r} is not an event sink; known: {', '.join(sinks.names())}"
                for name in profile.logging.log_with if name not in sinks.entries]
    for entry in sinks.entries.values():
        validate = getattr(entry.obj, "validate", None)
        if validate is not None:
            problems += validate(profile)
    logging, data = profile.logging, profile.dataset
    asked = [k for k in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps") if getattr(logging, k)]
    if asked and data.dataset_config is None and not data.validation_split:
        problems.append(f"logging.{asked[0]}: validation loss needs held-out images; set dataset.validation_split "
                        "(for example 0.1)")
    return list(dict.fromkeys(problems))  # trackers sharing one config file report its problems once


def cross_field_problems(profile: Profile, plugins: Plugins | None = None) -> list[str]:
    return (_file_problems(profile) + _option_problems(profile) + process_problems(profile)
            + (full_problems(profile) if profile.network.module == FULL else []) + slider_problems(profile)
            + _plugin_problems(profile, plugins or default_plugins()))


def process_problems(profile: Profile, num_processes: int | None = None) -> list[str]:
    """What several processes cannot do. Memory strategies (checkpointing, CPU offload, block swap, fp8)
    and compiled blocks are all allowed: they change how forward and backward run on each process, not
    the LoRA gradients that are summed after backward. ``num_processes``: a launcher's count (default: the
    profile's)."""
    t = profile.training
    problems = fsdp_problems(profile, num_processes)
    if (num_processes or t.num_processes) == 1:
        return problems
    if profile.optimizer.fused_backward_pass:
        problems.append(
            "optimizer.fused_backward_pass: updates each weight inside backward, before the processes' gradients "
            "are summed, so the processes would drift apart; turn it off with training.num_processes > 1"
        )
    if t.device not in ("auto", "cuda", "cpu"):
        problems.append(
            f"training.device: {t.device!r} names one device, but each process takes the GPU of its local rank; "
            "use auto or cuda (or cpu) with training.num_processes > 1 (CUDA_VISIBLE_DEVICES picks the GPUs)"
        )
    return problems
