"""What the trackers share: which events become which scalars, the log folder, the tracker config file.

Scalar names follow sd-scripts (`loss/current`, `loss/average`, `lr/<group>`, `loss/validation`), so runs of
both trainers compare in one TensorBoard or W&B project; `loss/prior` (prior preservation) is ours. Every value
is logged at the optimizer step.
"""

from __future__ import annotations

import importlib.util
import tomllib
from abc import ABC, abstractmethod
from pathlib import Path

from anima_core.config.load import profile_to_dict, profile_to_toml

DEFAULT_TRACKER_NAME = "network_train"  # sd-scripts' default for train_network.py
GIB = 2**30


def _number(value) -> float | None:
    """Events write non-finite floats as strings; trackers get finite numbers only."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def step_scalars(event: dict) -> dict[str, float]:
    scalars = {
        "loss/current": _number(event.get("loss")),
        "loss/average": _number(event.get("loss_avg")),
        "loss/prior": _number(event.get("prior_loss")),  # prior preservation's samples (absent: none this step)
        "grad_norm": _number(event.get("grad_norm")),
        "time/s_per_step": _number(event.get("s_per_it")),
    }
    lrs = event.get("lr") if isinstance(event.get("lr"), list) else [event.get("lr")]
    names = event.get("lr_groups") or [f"group{i}" for i in range(len(lrs))]
    for name, lr in zip(names, lrs):
        scalars[f"lr/{name}"] = _number(lr)
    norms = event.get("weight_norms") if isinstance(event.get("weight_norms"), dict) else {}
    for key, tag in (("keys_scaled", "max_norm/keys_scaled"), ("max_norm", "max_norm/max_key_norm"),
                     ("mean_norm", "norm/avg_key_norm")):  # sd-scripts' names under scale_weight_norms
        scalars[tag] = _number(norms.get(key))
    for key in ("vram_allocated", "vram_reserved", "vram_peak"):
        value = _number(event.get(key))
        scalars[f"memory/{key}_gib"] = value / GIB if value is not None else None
    return {k: v for k, v in scalars.items() if v is not None}


def validation_scalars(event: dict) -> dict[str, float]:
    scalars = {"loss/validation": _number(event.get("loss"))}
    for sigma, value in (event.get("by_sigma") or {}).items():
        scalars[f"loss/validation/sigma_{sigma}"] = _number(value)
    return {k: v for k, v in scalars.items() if v is not None}


def log_folder(run_dir: Path, logging) -> Path:
    """`<logging_dir or run dir/logs>/<log_prefix><run name>` (sd-scripts: logging_dir/log_prefix+time stamp)."""
    base = Path(logging.logging_dir) if logging.logging_dir is not None else Path(run_dir) / "logs"
    return base / f"{logging.log_prefix or ''}{Path(run_dir).name}"


def read_tracker_config(profile) -> dict:
    path = profile.logging.log_tracker_config
    if path is None:
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def _secret_keys(table, where: str) -> list[str]:
    found = []
    if isinstance(table, dict):
        for key, value in table.items():
            if "api_key" in str(key).lower() or str(key).lower() in ("key", "token"):
                found.append(f"{where}{key}")
            found += _secret_keys(value, f"{where}{key}.")
    return found


def tracker_config_problems(profile, table: str) -> list[str]:
    """Problems of the log_tracker_config file as far as tracker ``table`` reads it."""
    path = profile.logging.log_tracker_config
    if path is None:
        return []
    where = f"logging.log_tracker_config ({path})"
    try:
        config = read_tracker_config(profile)
    except OSError as exc:
        return [f"{where}: cannot be read ({exc.strerror or exc})"]
    except tomllib.TOMLDecodeError as exc:
        return [f"{where}: not valid TOML ({exc})"]
    problems = [f"{where}: unknown table [{name}]; only [tensorboard] and [wandb] are read"
                for name in config if name not in ("tensorboard", "wandb")]
    if table in config and not isinstance(config[table], dict):
        problems.append(f"{where}: `{table}` must be a table of keyword arguments")
    secrets = _secret_keys(config, "")
    if secrets:
        problems.append(f"{where}: {', '.join(secrets)} looks like a credential; W&B takes its key from `wandb login` "
                        "or WANDB_API_KEY, never from a file of the run. Remove it.")
    return problems


class TrackerSink(ABC):
    """Turns events into tracker calls; subclasses write scalars and images, and close.

    ``package``: the import name the tracker needs (also its extra's name in pyproject.toml)."""

    package: str

    def __init__(self, run_dir: Path, profile):
        self.folder = log_folder(run_dir, profile.logging)
        self.tracker_name = profile.logging.log_tracker_name or DEFAULT_TRACKER_NAME
        self.run_name = Path(run_dir).name
        self.profile_dict = profile_to_dict(profile) if profile.logging.log_config else None
        self.profile_toml = profile_to_toml(profile) if profile.logging.log_config else None
        self._samples_at: dict[int, int] = {}
        self.closed = False

    def __call__(self, event: dict) -> None:
        if self.closed:
            return
        kind = event.get("type")
        step = event.get("step")
        if kind == "step":
            self.scalars(step_scalars(event), step)
        elif kind == "validation":
            self.scalars(validation_scalars(event), step)
        elif kind == "sample" and event.get("path") and isinstance(step, int):
            index = self._samples_at.get(step, 0)
            self._samples_at[step] = index + 1
            self.image(f"samples/{index:02d}", Path(event["path"]), str(event.get("prompt", "")), step)
        elif kind == "run_end":
            self.closed = True
            self.close(event.get("status", "finished"))

    @abstractmethod
    def scalars(self, values: dict[str, float], step: int) -> None:
        ...

    @abstractmethod
    def image(self, tag: str, path: Path, caption: str, step: int) -> None:
        ...

    @abstractmethod
    def close(self, status: str) -> None:
        ...


class TrackerFactory:
    """The registered event-sink factory: off (None) unless `logging.log_with` names it."""

    def __init__(self, name: str, sink_class: type[TrackerSink]):
        self.name = name
        self.sink_class = sink_class

    def validate(self, profile) -> list[str]:
        if self.name not in profile.logging.log_with:
            return []
        problems = []
        if importlib.util.find_spec(self.sink_class.package) is None:
            problems.append(f"logging.log_with: {self.name!r} needs the {self.sink_class.package} package; "
                            f"install it with: pip install 'anima-train[{self.name}]'")
        return problems + tracker_config_problems(profile, self.name)

    def __call__(self, run_dir: Path, profile) -> TrackerSink | None:
        if self.name not in profile.logging.log_with:
            return None
        return self.sink_class(run_dir, profile, read_tracker_config(profile).get(self.name, {}))
