"""sd-scripts command line → profile data, with the original flag text for every key.

The profile trains what sd-scripts would have trained from the same line. Where a default or a meaning differs
between sd-scripts and anima-train, or between the two sd-scripts generations (spec §11: the first release
e21a7736 that the guide documents, and current sd-scripts 48d368fa), the importer writes the sd-scripts value
explicitly and says so.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import tomlkit
from pydantic import ValidationError

from anima_core.config.schema import TABLES, Profile
from anima_core.errors import AnimaError
from anima_core.plugins import default_plugins
from anima_core.config.full_rules import FULL
from anima_core.config.optimizer_rules import KNOBS, USES_WARMUP, is_schedule_free, uses_relative_step
from anima_core.kohya import values as v
from anima_core.kohya.command_line import split_command_line
from anima_core.kohya.launcher import read_launcher
from anima_core.kohya.flags import (
    CURRENT_ONLY_NETWORK_ARGS,
    FIRST_ONLY_NETWORK_ARGS,
    FLAGS,
    HOST,
    SECRET_FLAGS,
    Flag,
    Generation,
)
from anima_core.kohya.lycoris import LYCORIS_MODULE, lycoris_network_rules

SCRIPT = "anima_train_network.py"
FULL_SCRIPT = "anima_train.py"  # full fine-tuning: network.module = "full"
GENERATION_NAMES = {"first": "first release (the guide)", "current": "current sd-scripts"}


class UnknownFlagError(AnimaError):
    """The command line has flags that no version of anima_train_network.py accepts."""

    def __init__(self, unknown: list[str]):
        self.unknown = unknown
        parts = []
        for name in unknown:
            close = difflib.get_close_matches(name, FLAGS, n=1, cutoff=0.6)
            parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
        super().__init__(
            f"unknown sd-scripts flag(s): {', '.join(parts)}. anima_train_network.py accepts none of them, so "
            f"nothing was imported; fix or remove them in the command line and import again."
        )


class CommandLineError(AnimaError):
    """The command line cannot be read: no script, a stray word, or a flag value of the wrong kind."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the sd-scripts command line cannot be imported; fix these and import again:\n{lines}")


@dataclass
class ImportResult:
    data: dict[str, dict[str, Any]]
    warnings: list[str]
    comments: dict[tuple[str, str], str]
    command: str
    generation: Generation

    def toml(self) -> str:
        return render_toml(self)


@dataclass
class _Parsed:
    values: dict[str, Any] = field(default_factory=dict)  # flag -> raw value (True, str or list[str])
    written: dict[str, str] = field(default_factory=dict)  # flag -> how it was written
    unknown: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _parse_args(args: list[str]) -> _Parsed:
    parsed = _Parsed()
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if not token.startswith("--"):
            parsed.problems.append(f"{token!r} is not a flag and follows no flag that takes a value")
            continue
        name, equals, inline = token.partition("=")
        flag = FLAGS.get(name)
        if flag is None:
            parsed.unknown.append(name)
            if not equals and index < len(args) and not args[index].startswith("--"):
                index += 1  # its value, most likely
            continue
        if name in parsed.values:
            parsed.problems.append(f"{name} is given twice; keep one")
        if flag.arity == "switch":
            if equals:
                parsed.problems.append(f"{name} is a switch and takes no value (got {token!r})")
            value, shown = True, name
        elif flag.arity == "value":
            if equals:
                value = inline
            elif index < len(args) and not args[index].startswith("--"):
                value = args[index]
                index += 1
            else:
                parsed.problems.append(f"{name} needs a value")
                continue
            shown = f'{name}="{value}"' if any(c.isspace() for c in value) else f"{name}={value}"
        else:
            value = [inline] if equals else []
            while index < len(args) and not args[index].startswith("--"):
                value.append(args[index])
                index += 1
            shown = name + "".join(f' "{item}"' for item in value)
        parsed.values[name] = value
        parsed.written[name] = f"{name}=<removed>" if name in SECRET_FLAGS else shown
    return parsed


def _generation(parsed: _Parsed, warnings: list[str]) -> Generation:
    first = [name for name in parsed.values if FLAGS[name].generation == "first"]
    current = [name for name in parsed.values if FLAGS[name].generation == "current"]
    args = parsed.values.get("--network_args") or []
    arg_names = [item.split("=", 1)[0].strip() for item in args]
    first += [f"network arg {a}" for a in arg_names if a in FIRST_ONLY_NETWORK_ARGS]
    current += [f"network arg {a}" for a in arg_names if a in CURRENT_ONLY_NETWORK_ARGS]
    for name in ("--pretrained_model_name_or_path", "--vae"):
        if name in parsed.values:
            current.append(name)  # accepted by the first release too, but it read --dit_path / --vae_path
    if first and current:
        chosen: Generation = "first" if len(first) >= len(current) else "current"
        warnings.append(
            f"the command line mixes first-release flags ({', '.join(first)}) and current sd-scripts flags "
            f"({', '.join(current)}); no single sd-scripts version reads all of them. Imported with the "
            f"{GENERATION_NAMES[chosen]} meanings; check the profile."
        )
        return chosen
    if current:
        return "current"
    if not first:
        warnings.append(
            "no flag tells which sd-scripts generation this command line is for; imported with the first "
            "release's meanings (the guide's)."
        )
    return "first"


class _Builder:
    """Collects profile values with the flag text each came from."""

    def __init__(self, parsed: _Parsed):
        self.full = False  # the command line is anima_train.py's (full fine-tuning)
        self.parsed = parsed
        self.data: dict[str, dict[str, Any]] = {}
        self.comments: dict[tuple[str, str], str] = {}
        self.warnings: list[str] = []
        self.problems: list[str] = list(parsed.problems)

    def has(self, name: str) -> bool:
        return name in self.parsed.values

    def raw(self, name: str, default: Any = None) -> Any:
        return self.parsed.values.get(name, default)

    def written(self, name: str) -> str:
        return self.parsed.written[name]

    def convert(self, name: str, convert) -> Any:
        try:
            return convert(self.parsed.values[name])
        except v.ValueProblem as problem:
            self.problems.append(f"{name}: {problem}")
            return None

    def set(self, table: str, key: str, value: Any, comment: str) -> None:
        if value is None:
            return
        self.data.setdefault(table, {})[key] = value
        self.comments[(table, key)] = comment

    def set_from(self, name: str, table: str, key: str, convert=v.as_float) -> None:
        if self.has(name):
            self.set(table, key, self.convert(name, convert), self.written(name))

    def warn(self, text: str) -> None:
        self.warnings.append(text)


def _apply_table(b: _Builder) -> None:
    for name in b.parsed.values:
        flag: Flag = FLAGS[name]
        if flag.mapped:
            b.set(flag.table, flag.key, b.convert(name, flag.convert), b.written(name))
        elif flag.ignored:
            b.warn(f"{b.written(name)}: left out, it {flag.ignored}.")


def _first_of(b: _Builder, *names: str) -> str | None:
    given = [n for n in names if b.has(n)]
    if len(given) > 1:
        b.warn(f"{' and '.join(given)} both name the same file; {given[0]} is used.")
    return given[0] if given else None


def _model_rules(b: _Builder, generation: Generation) -> None:
    for key, names in (
        ("dit", ("--dit_path", "--pretrained_model_name_or_path")),
        ("qwen3", ("--qwen3_path", "--qwen3")),
        ("vae", ("--vae_path", "--vae")),
    ):
        name = _first_of(b, *(names if generation == "first" else names[::-1]))
        if name:
            b.set("model", key, b.raw(name), b.written(name))
    if b.has("--llm_adapter_path"):
        b.set_from("--llm_adapter_path", "model", "llm_adapter", str)
        if generation == "current":
            b.warn(
                f"{b.written('--llm_adapter_path')}: current sd-scripts accepts this flag but never loads the file "
                "(it reads the adapter from the DiT file); anima-train loads it. Remove model.llm_adapter to "
                "train exactly what sd-scripts trained."
            )
    attention = None
    if b.has("--flash_attn"):
        attention = ("flash", b.written("--flash_attn"))
    if b.has("--xformers"):
        if generation == "current" and not b.has("--attn_mode"):
            attention = ("xformers", b.written("--xformers"))
        else:
            b.warn(f"{b.written('--xformers')}: left out, it {HOST}.")
    if b.has("--attn_mode"):
        mode = b.raw("--attn_mode")
        if mode == "sageattn":
            b.warn(f"{b.written('--attn_mode')}: sageattn is for inference only in sd-scripts; imported as sdpa.")
            mode = "sdpa"
        attention = (mode, b.written("--attn_mode"))
    if attention:
        b.set("model", "attn_mode", *attention)


def _timestep_rules(b: _Builder, generation: Generation) -> None:
    if b.has("--discrete_flow_shift"):
        shift = b.convert("--discrete_flow_shift", v.as_float)
        shift_comment = b.written("--discrete_flow_shift")
    else:
        shift, shift_comment = 1.0, "not on the command line: sd-scripts' default 1.0"
        if generation == "first":
            b.warn(
                "--discrete_flow_shift is not on the command line: the guide says its default is 3.0, but "
                "anima_train_network.py (first release) uses 1.0 when the flag is absent, so 1.0 is imported. "
                "Set training.discrete_flow_shift = 3.0 for the guide's documented value."
            )
    if generation == "first":
        name = "--timestep_sample_method"
        method = b.raw(name, "logit_normal")
        comment = b.written(name) if b.has(name) else "not on the command line: the first release's default"
        if method not in ("logit_normal", "uniform"):
            b.problems.append(f"{name}: expected logit_normal or uniform, got {method!r}")
    else:
        name = "--timestep_sampling"
        method = b.raw(name, "sigmoid")
        comment = b.written(name) if b.has(name) else "not on the command line: current sd-scripts' default"
        if method == "uniform" and shift not in (None, 1.0):
            b.warn(
                f"{b.written(name)} with --discrete_flow_shift={shift}: current sd-scripts does not shift "
                "uniform timesteps, anima-train's uniform does; imported with discrete_flow_shift = 1.0 so the "
                "profile trains what sd-scripts trained."
            )
            shift, shift_comment = 1.0, f"{shift_comment} (not applied to uniform by sd-scripts)"
        elif method in ("sigmoid", "flux_shift") and shift not in (None, 1.0):
            b.warn(f"--discrete_flow_shift={shift} has no effect with {b.written(name)}, in sd-scripts as here.")
    b.set("training", "timestep_sampling", method, comment)
    b.set("training", "discrete_flow_shift", shift, shift_comment)
    if b.has("--huber_schedule"):
        b.set_from("--huber_schedule", "training", "huber_schedule", str)
    elif b.data.get("training", {}).get("loss_type") in ("huber", "smooth_l1"):
        b.warn(
            "--huber_schedule is not on the command line: sd-scripts' default 'snr' fails for Anima (no "
            "alphas_cumprod); imported as 'constant'."
        )
        b.set("training", "huber_schedule", "constant", "not on the command line (sd-scripts' snr fails for Anima)")


def _optimizer_rules(b: _Builder, generation: Generation) -> None:
    if b.has("--learning_rate"):
        b.set_from("--learning_rate", "optimizer", "learning_rate")
    else:
        b.set("optimizer", "learning_rate", 2e-6, "not on the command line: sd-scripts' default 2e-6")
    optimizer, comment = None, None
    if b.has("--optimizer_type") and b.raw("--optimizer_type"):
        optimizer, comment = b.raw("--optimizer_type"), b.written("--optimizer_type")
    elif b.has("--use_8bit_adam"):
        optimizer, comment = "AdamW8bit", b.written("--use_8bit_adam")
    elif b.has("--use_lion_optimizer"):
        optimizer, comment = "Lion", b.written("--use_lion_optimizer")
    if optimizer:
        # sd-scripts compares optimizer names without case ("AdaFactor", "adamw8bit").
        ours = default_plugins().registry("register_optimizers").names()
        optimizer = next((name for name in ours if name.lower() == optimizer.lower()), optimizer)
        b.set("optimizer", "optimizer_type", optimizer, comment)
    components = [f"--{c}_lr" for c in ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter")]
    given = [name for name in components if b.has(name)]
    for name in given:
        b.set_from(name, "optimizer", name[2:])
    if given and not b.full:  # anima_train.py applies them; the LoRA script does not
        b.warn(
            f"{', '.join(b.written(n) for n in given)}: the guide documents these, but sd-scripts' LoRA script "
            "ignores them (both generations; they act only in full fine-tuning). anima-train applies them to "
            "the LoRA parameter groups; remove them from [optimizer] to train exactly what sd-scripts trained."
        )


def _schedule_rules(b: _Builder) -> None:
    """What sd-scripts does at run time with the optimizer and schedule flags, written into the profile."""
    data = b.data.setdefault("optimizer", {})
    cfg = SimpleNamespace(optimizer_type=data.get("optimizer_type", "AdamW"), optimizer_args=data.get("optimizer_args", {}))
    kind = data.get("lr_scheduler", "constant")

    def drop(key: str, why: str) -> None:
        if key in data:
            b.warn(f"{b.comments[('optimizer', key)]}: left out, {why}.")
            del data[key]

    if uses_relative_step(cfg):
        why = "sd-scripts' Adafactor uses relative_step (its default), with its own rate for every parameter"
        for key in ("unet_lr", "text_encoder_lr"):
            drop(key, why + " (sd-scripts ignores it)")
        drop("lr_warmup_steps", why + " and the adafactor schedule, which takes no warmup (sd-scripts stops with an error)")
        if kind != "adafactor":
            b.set("optimizer", "lr_scheduler", "adafactor", f"sd-scripts replaces lr_scheduler {kind!r} with its adafactor schedule")
        kind = None
    elif is_schedule_free(cfg) and not data.get("lr_scheduler_type"):
        why = f"sd-scripts gives {cfg.optimizer_type} no schedule (it brings its own)"
        drop("lr_scheduler", why)
        drop("lr_warmup_steps", why)
        kind = None
    elif data.get("lr_scheduler_type"):
        drop("lr_scheduler", "lr_scheduler_type replaces it in sd-scripts")
        kind = None
    elif data.get("lr_warmup_steps") and kind not in USES_WARMUP:
        b.warn(f"{b.comments[('optimizer', 'lr_warmup_steps')]}: sd-scripts stops with an error for warmup with {kind!r}; "
               "use lr_scheduler = 'constant_with_warmup' or remove the warmup.")
    for key, _inert, readers in KNOBS:
        if kind not in readers:
            drop(key, f"sd-scripts ignores it for {kind or 'this optimizer'!r} (only {', '.join(sorted(readers))} read it)")


def _network_rules(b: _Builder, generation: Generation) -> None:
    args = dict(b.data.get("network", {}).get("args", {}))
    preset = "guide" if generation == "first" else "sd-scripts"
    args.setdefault("target_preset", preset)
    b.data.setdefault("network", {})["args"] = args
    b.comments.setdefault(("network", "args"), "no --network_args")
    for item in b.raw("--network_args", []):
        b.comments[("network.args", item.split("=", 1)[0].strip())] = item
    for item in b.raw("--optimizer_args", []):
        b.comments[("optimizer.optimizer_args", item.split("=", 1)[0].strip())] = item
    b.comments[("network.args", "target_preset")] = (
        f"which layers get a LoRA by default: those of the {GENERATION_NAMES[generation]}"
    )
    text_cached = b.has("--cache_text_encoder_outputs") or b.has("--cache_text_encoder_outputs_to_disk")
    if b.has("--network_train_unet_only"):
        b.set("network", "train_unet_only", True, b.written("--network_train_unet_only"))
    elif generation == "first":
        b.set("network", "train_unet_only", True, "not on the command line: the first release never trains Qwen3")
    elif text_cached:
        b.warn(
            "--cache_text_encoder_outputs without --network_train_unet_only: current sd-scripts refuses this "
            "(a cached text encoder cannot get a LoRA); imported with network.train_unet_only = true."
        )
        b.set("network", "train_unet_only", True, "implied by caching the text encoder outputs")
    if b.raw("--network_module") == LYCORIS_MODULE:
        lycoris_network_rules(b.data, b.comments, b.warn, b.written("--network_module"))


def _full_rules(b: _Builder) -> None:
    """anima_train.py: full fine-tuning of the DiT (Qwen3 frozen, as that script keeps it); the component
    rates were read with the optimizer flags (0 freezes a group, as there)."""
    lora_only = [n for n in ("--network_module", "--network_dim", "--network_alpha", "--network_dropout",
                             "--network_args", "--network_weights", "--network_train_unet_only") if b.has(n)]
    if lora_only:
        b.problems.append(f"{', '.join(lora_only)}: LoRA flags, which {FULL_SCRIPT} does not take; import the "
                          f"{SCRIPT} command line for a LoRA, or remove them")
    b.set("network", "module", FULL, f"{FULL_SCRIPT}: full fine-tuning of the DiT's weights")
    if b.has("--cache_text_encoder_outputs") or b.has("--cache_text_encoder_outputs_to_disk"):
        b.set("network", "train_unet_only", True, f"{FULL_SCRIPT} never trains Qwen3")


def _caching_rules(b: _Builder) -> None:
    for name in ("--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"):
        if b.has(name):
            b.set("caching", name[2:], True, b.written(name))


def _precision_rules(b: _Builder, generation: Generation) -> None:
    if b.has("--mixed_precision"):
        b.set_from("--mixed_precision", "training", "mixed_precision", str)
    else:
        b.set("training", "mixed_precision", "no", "not on the command line: sd-scripts' default (full fp32)")
    fp8 = [name for name in ("--fp8_base", "--fp8_base_unet") if b.has(name)]
    if fp8 and generation == "current":
        b.warn(
            f"{' '.join(fp8)}: current sd-scripts switches fp8 off for Anima (with a warning), so it is left out. "
            "Set memory.fp8_base = true to store the frozen DiT in fp8 here."
        )
    elif fp8:
        b.set("memory", "fp8_base", True, " ".join(b.written(n) for n in fp8))


def _dataset_rules(b: _Builder, generation: Generation) -> None:
    name = "--caption_dropout_rate"
    if b.has(name):
        # First release: one global, embedding-level rate. Current: the subset rate's command-line default.
        table = "training" if generation == "first" else "dataset"
        b.set_from(name, table, "caption_dropout_rate")


def _saving_rules(b: _Builder) -> None:
    if b.has("--save_model_as"):
        fmt = b.raw("--save_model_as")
        if fmt != "safetensors":
            b.warn(f"{b.written('--save_model_as')}: anima-train writes safetensors only; imported as safetensors.")
        b.set("saving", "save_model_as", "safetensors", b.written("--save_model_as"))
    if b.has("--sample_sampler"):
        b.set("sampling", "sample_sampler", "euler", b.written("--sample_sampler"))
        if b.raw("--sample_sampler") not in ("euler", "k_euler"):
            b.warn(
                f"{b.written('--sample_sampler')}: sd-scripts' Anima previews ignore this and use the Euler flow "
                "sampler, as anima-train does; imported as euler."
            )


def _logging_rules(b: _Builder) -> None:
    if b.has("--log_with"):
        chosen = b.raw("--log_with")
        b.set("logging", "log_with", ["tensorboard", "wandb"] if chosen == "all" else [chosen], b.written("--log_with"))
    elif b.has("--logging_dir"):  # sd-scripts logs to TensorBoard when only a logging_dir is given
        b.set("logging", "log_with", ["tensorboard"], b.written("--logging_dir"))


def _launcher_rules(b: _Builder, tokens: list[str]) -> None:
    """accelerate launch's process count and CPU threads go into [training]; the rest is named."""
    launcher = read_launcher(tokens)
    b.problems += launcher.problems
    for key, value in launcher.values.items():
        b.set("training", key, value, launcher.written[key])
    if launcher.left_out:
        b.warn(f"launcher options `{' '.join(launcher.left_out)}`: left out; they say how the launcher runs, not "
               "what is trained (the script's own flags set the precision).")


def _without_secrets(text: str, parsed: _Parsed) -> str:
    for name in SECRET_FLAGS:
        value = parsed.values.get(name)
        if isinstance(value, str) and value:
            text = text.replace(value, "<removed>")
    return text


def _schema_warnings(b: _Builder) -> None:
    """Values sd-scripts accepts but the profile schema does not (an lr_scheduler we lack, ...)."""
    try:
        Profile.model_validate(b.data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"])
            source = b.comments.get((loc[0], loc[1])) if len(loc) >= 2 else None
            where = ".".join(loc)
            b.warn(f"{where} ({source or 'imported'}): {error['msg']}; the profile will not validate until it is changed.")


def import_command_line(text: str) -> ImportResult:
    """Read an sd-scripts command line (see command_line.py) and build the equivalent profile data."""
    try:
        command = split_command_line(text)
    except ValueError as exc:
        raise CommandLineError([str(exc)]) from None
    parsed = _parse_args(command.args)
    if parsed.unknown:
        raise UnknownFlagError(parsed.unknown)
    b = _Builder(parsed)
    script = (command.script or "").replace("\\", "/").rsplit("/", 1)[-1]
    full = b.full = script == FULL_SCRIPT
    if command.script and not full and script != SCRIPT:
        b.warn(f"the script is {command.script}, not {SCRIPT}; its flags are read as {SCRIPT}'s (a LoRA profile).")
    if command.launcher:
        _launcher_rules(b, command.launcher)
    generation = _generation(parsed, b.warnings)
    _apply_table(b)
    _model_rules(b, generation)
    _timestep_rules(b, generation)
    _optimizer_rules(b, generation)
    _schedule_rules(b)
    _full_rules(b) if full else _network_rules(b, generation)
    _caching_rules(b)
    _precision_rules(b, generation)
    _dataset_rules(b, generation)
    _saving_rules(b)
    _logging_rules(b)
    if b.problems:
        raise CommandLineError(b.problems)
    _schema_warnings(b)
    ordered = {
        table: {key: b.data[table][key] for key in Profile.model_fields[table].annotation.model_fields if key in b.data[table]}
        for table in TABLES
        if table in b.data
    }
    return ImportResult(ordered, b.warnings, b.comments, _without_secrets(command.text, parsed), generation)


def _wrapped_comment_lines(text: str, width: int = 110) -> list[str]:
    words, lines, line = text.split(" "), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines


def render_toml(result: ImportResult) -> str:
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"Imported by `anima-train import-kohya` ({GENERATION_NAMES[result.generation]} flags) from:"))
    for line in _wrapped_comment_lines(result.command):
        doc.add(tomlkit.comment(f"  {line}"))
    if result.warnings:
        doc.add(tomlkit.comment("Notes from the import:"))
        for warning in result.warnings:
            for index, line in enumerate(_wrapped_comment_lines(warning)):
                doc.add(tomlkit.comment(("- " if index == 0 else "  ") + line))
    doc.add(tomlkit.nl())
    for table_name, values in result.data.items():
        table = tomlkit.table()
        for key, value in values.items():
            if isinstance(value, dict):
                continue
            item = tomlkit.item(value)
            item.comment(result.comments[(table_name, key)])
            table.add(key, item)
        for key, value in values.items():
            if not isinstance(value, dict):
                continue
            sub = tomlkit.table()
            sub.comment(result.comments.get((table_name, key), ""))
            for sub_key, sub_value in value.items():
                item = tomlkit.item(sub_value)
                note = result.comments.get((f"{table_name}.{key}", sub_key))
                if note:
                    item.comment(note)
                sub.add(sub_key, item)
            table.add(key, sub)
        doc.add(table_name, table)
    return tomlkit.dumps(doc)
