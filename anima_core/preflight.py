"""What a run would find wrong that the profile alone cannot tell: the model files (read from their headers, no
weights), the tokenizers, what this device and the installed packages can do, the dataset config, and the images.

`validate` runs all of it; `run` runs it (without the image scan, which it does itself) before it caches anything,
so a profile `validate` calls valid does not fail later on anything knowable in advance.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anima_core.config.schema import DatasetTable, Profile
from anima_core.errors import AnimaError, DatasetError, TokenizerNotFoundError
from anima_core.models.tokenizer_files import tokenizer_problems
from anima_core.plugins import Plugins, UnknownNameError
from anima_core.training.executors import compiler_missing


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the run will do differently or skip; not errors
    summary: list[str] = field(default_factory=list)  # what the run will train on


def _loader(profile: Profile, plugins: Plugins):
    try:
        return plugins.registry("register_model_loaders").get(profile.model.loader)
    except UnknownNameError:
        return None  # already reported by the profile checks


def model_file_problems(profile: Profile, plugins: Plugins, skip_tokenizers: bool, reported: set[str],
                        notes: list[str] | None = None) -> list[str]:
    """Each model file loaded onto the meta device: names, shapes and dtypes from the header, strictly matched; the
    DiT against ``network.weights`` (the model the LoRA was made for). Keys in ``reported`` already have a problem
    (a missing file) and are not checked again. ``notes`` receives what is worth saying but not refused."""
    notes = [] if notes is None else notes
    model = profile.model
    loader = _loader(profile, plugins)
    if loader is None:
        return []
    problems = []
    if "model.llm_adapter" in reported:
        model = model.model_copy(update={"llm_adapter": None})
    elif model.llm_adapter is not None:
        from anima_core.models.dit_loading import read_adapter

        try:
            read_adapter(model.llm_adapter, header_only=True)
        except AnimaError as exc:
            problems.append(f"model.llm_adapter: {exc}")
            model = model.model_copy(update={"llm_adapter": None})  # still check the DiT file on its own
    checks = [("model.dit", lambda: loader.load_dit(model, dtype=torch.bfloat16, device="meta")),
              ("model.vae", lambda: loader.load_vae(model, dtype=torch.float32, device="meta"))]
    if not skip_tokenizers:  # the text encoder loader reads the tokenizers first
        checks.append(("model.qwen3", lambda: loader.load_text_encoder(model, dtype=torch.bfloat16, device="meta")))
    for key, load in checks:
        if key in reported or getattr(model, key.removeprefix("model.")) is None:
            continue
        try:
            loaded = load()
        except TokenizerNotFoundError:
            continue  # reported by tokenizer_problems
        except AnimaError as exc:
            problems.append(f"{key}: {exc}")
            continue
        if key == "model.dit":
            problems += _dit_problems(profile, loaded, adapter_given=model.llm_adapter is not None or
                                      profile.model.llm_adapter is not None)
            if profile.network.weights is not None and "network.weights" not in reported:
                problems += network_weights_problems(profile, loaded, notes)
    return problems


def _dit_problems(profile: Profile, dit, adapter_given: bool) -> list[str]:
    from anima_plugins.memory.block_swap import check_swap_count

    problems = []
    if dit.config.llm_adapter is None and not adapter_given:
        problems.append(
            f"model.llm_adapter: {profile.model.dit} holds no LLM adapter (no llm_adapter.* weights); set "
            "model.llm_adapter to the adapter file (sd-scripts --llm_adapter_path)"
        )
    swap = profile.memory.blocks_to_swap
    if swap:
        try:
            check_swap_count(swap, dit.config.num_blocks)
        except AnimaError as exc:
            problems.append(str(exc))
    return problems


def network_weights_problems(profile: Profile, dit, notes: list[str]) -> list[str]:
    """``network.weights`` against the DiT at hand (a meta-device load): a LoRA made for another model (Anima 2B on
    2.9B, another block count) is refused unless ``network.allow_other_model``; one whose keys reach blocks this
    DiT lacks is refused either way (those modules have nowhere to go); the blocks the file has must be those the
    profile's network selects, or loading it would fail after caching."""
    from anima_plugins.lora.files import LoRAFileError
    from anima_plugins.lora.model_match import DIFFERENT, UNKNOWN, block_ranges, match_lora, selected_blocks

    network = profile.network
    try:
        match = match_lora(network.weights, dit)
    except LoRAFileError as exc:
        return [f"network.weights: {exc}"]
    if match.missing:
        return [f"network.weights: {match.message} Their modules have nowhere to go, so it cannot be continued on "
                "this DiT, whatever network.allow_other_model says: use the DiT it was made for, or start without "
                "network.weights."]
    if match.verdict == DIFFERENT and not network.allow_other_model:
        return [f"network.weights: {match.message} Use the DiT it was made for, or set network.allow_other_model = "
                "true to continue it on this one anyway (block N of the file onto block N here), or start without "
                "network.weights."]
    if match.verdict == DIFFERENT:
        notes.append(f"network.weights: {match.message} Continued on this DiT anyway (network.allow_other_model = true).")
    elif match.verdict == UNKNOWN:
        notes.append(f"network.weights: {match.message} Make sure it was made for this DiT.")
    selected = selected_blocks(network, dit)
    reached = set(match.lora.reached)
    if selected is None or selected == reached:
        return []
    fix = (f'set network.args.train_block_indices = "{block_ranges(reached)}"' if reached
           else "use the network args the file was trained with")
    return [f"network.weights: {match.name} has modules on DiT block(s) {block_ranges(reached) or 'none'}, but the "
            f"profile's network selects block(s) {block_ranges(selected) or 'none'} of this DiT; continuing needs the "
            f"same blocks: {fix}, or start without network.weights."]


def device_problems(profile: Profile, device: torch.device) -> list[str]:
    """Choices this device or the installed packages cannot honour, each with the fix."""
    problems = []
    name = profile.training.device
    if device.type == "cuda" and not torch.cuda.is_available():
        problems.append(f"training.device: {name!r} but this machine has no CUDA GPU; set it to \"auto\" or \"cpu\"")
    elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        problems.append(f"training.device: {name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    optimizer = profile.optimizer.optimizer_type
    if optimizer.lower() in ("adamw8bit", "bitsandbytes.optim.adamw8bit"):
        if device.type != "cuda":
            problems.append(
                f"optimizer.optimizer_type: {optimizer!r} needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on the "
                "GPU); on this machine set optimizer.optimizer_type = \"AdamW\""
            )
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                f"optimizer.optimizer_type: {optimizer!r} needs bitsandbytes: `pip install 'anima-train[cuda]'`, or set "
                "optimizer.optimizer_type = \"AdamW\""
            )
    elif "." in optimizer and importlib.util.find_spec(optimizer.split(".")[0]) is None:
        problems.append(f"optimizer.optimizer_type: {optimizer!r}: the module {optimizer.split('.')[0]!r} is not installed")
    missing = compiler_missing(device) if profile.model.compile_blocks else None  # unset: eager where it cannot
    if missing:
        problems.append(f"model.compile_blocks: {missing}; or set it to false")
    if profile.memory.fp8_base or profile.memory.fp8_base_unet:
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
            problems.append("memory.fp8_base: computes in bf16, which this GPU (before Ampere) lacks; turn fp8_base off")
    return problems


def dataset_findings(profile: Profile, result: Preflight, scan_images: bool, plugins: Plugins | None = None) -> None:
    """The dataset config (or folder form) resolved with the profile's values, and with ``scan_images`` every image
    and caption read and checked as `run` does, its skips reported once; prior preservation's needs of the network."""
    from anima_core.data import build_training_data
    from anima_core.data.config import resolve_datasets
    from anima_core.plugins import default_plugins
    from anima_core.training.data_phase import data_options
    from anima_core.training.prior import prior_problems

    opts = data_options(profile)
    try:
        if not scan_images:
            result.problems += prior_problems(profile, plugins or default_plugins(), resolve_datasets(opts, Path.cwd())[0])
            return
        data = build_training_data(opts, base_dir=Path.cwd(), on_warning=result.notes.append)
    except DatasetError as exc:
        result.problems.append("dataset: " + str(exc).replace("\n", "\n    "))  # its own list, nested
        return
    result.problems += prior_problems(profile, plugins or default_plugins(), [ds.spec for ds in data.datasets])
    per_epoch = -(-data.num_batches_per_epoch // profile.training.gradient_accumulation_steps)
    training = profile.training
    total = training.max_train_epochs * per_epoch if training.max_train_epochs else training.max_train_steps
    result.summary.append(
        f"dataset: {data.num_train_images} training image(s) per epoch with repeats"
        + (f", {data.num_reg_images} regularisation" if data.num_reg_images else "")
        + f", {per_epoch} step(s) per epoch, {total} step(s) in all"
    )
    from anima_core.training.cache_report import cache_memory_report

    result.summary += cache_memory_report(profile, data)


def preflight(profile: Profile, plugins: Plugins, *, scan_images: bool, earlier: list[str] = ()) -> Preflight:
    """Every problem knowable without training. ``earlier``: problems the profile checks found (their keys are
    not checked again, so one mistake is reported once)."""
    from anima_core.training.precision import choose_precision
    from anima_core.training.devices import resolve_device

    result = Preflight()
    model = profile.model
    tokenizers = tokenizer_problems(model.qwen3_tokenizer, model.t5_tokenizer, model.qwen3)
    reported = {p.split(":", 1)[0] for p in earlier}
    result.problems += model_file_problems(profile, plugins, skip_tokenizers=bool(tokenizers), reported=reported,
                                           notes=result.notes)
    result.problems += [p for p in tokenizers if p.split(":", 1)[0] not in reported]
    try:
        device = resolve_device(profile.training.device)
    except RuntimeError as exc:
        result.problems.append(f"training.device: {exc}")
        device = torch.device("cpu")
    result.problems += device_problems(profile, device)
    note = choose_precision(profile.training, device)[1]
    if note:
        result.notes.append(note)
    # A wrong dataset value is reported once, by the profile checks, not again by the dataset resolution.
    dataset_keys = {"dataset"} | {f"dataset.{key}" for key in DatasetTable.model_fields}
    if profile.slider.pairs:  # prompt pairs, no images (training/slider.py)
        from anima_core.training.slider import slider_network_problems, slider_summary

        result.problems += slider_network_problems(profile, plugins)
        result.summary += slider_summary(profile)
    elif not reported & dataset_keys:
        dataset_findings(profile, result, scan_images, plugins)
    return result
