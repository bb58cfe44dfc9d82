"""Resumable training state: one complete-or-absent folder per save under ``run_dir/state``."""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from anima_core.atomic import atomic_directory
from anima_core.config.load import profile_to_dict
from anima_core.config.schema import Profile
from anima_core.errors import AnimaError

STATE_VERSION = 1
# What may change between a run and its resume without changing what the state means.
MUTABLE_TABLES = {"saving", "logging", "sampling", "memory"}
MUTABLE_KEYS = {
    ("training", "max_train_steps"),
    ("training", "max_train_epochs"),
    ("training", "nan_guard_max_bad_steps"),
    ("training", "nan_guard_lr_factor"),
    ("training", "device"),
    ("training", "num_processes"),  # checked against the state's own record (check_processes)
    ("training", "num_cpu_threads_per_process"),
    ("training", "ddp_timeout"),
    ("training", "fsdp"),  # how the weights are laid out over the processes; states hold them whole
    ("dataset", "max_data_loader_n_workers"),
    ("dataset", "persistent_data_loader_workers"),
    ("dataset", "bad_image_policy"),
    ("caching", "vae_batch_size"),
    ("caching", "text_encoder_batch_size"),
    ("caching", "skip_cache_check"),
}
LR_KEYS = {("optimizer", k) for k in ("learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps")}


class ResumeError(AnimaError):
    """The state cannot be resumed with this profile, or is missing or broken."""


@dataclass
class Progress:
    step: int  # optimizer steps done
    epoch: int  # epoch the next batch belongs to
    batch_in_epoch: int  # batches of that epoch already consumed
    bad_steps: int = 0
    lr_scale: float = 1.0
    num_processes: int = 1  # processes that trained it: the global batch depends on the count


def epoch_number(progress: Progress) -> int:
    """The 1-based epoch people see: the one in progress, or the one just completed at an epoch boundary."""
    return progress.epoch + (1 if progress.batch_in_epoch else 0)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_torch(obj, path: Path) -> None:
    """torch.save through memory: a full disk then raises OSError (ENOSPC), which atomic_directory turns
    into a DiskWriteError naming the state, instead of torch's opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def state_path(state_root: Path, step: int) -> Path:
    return state_root / f"step-{step:08d}"


def save_state(state_root: Path, *, progress: Progress, network_state: dict, optimizer_state: dict, scheduler, scaler,
               profile: Profile, keep_last: int, extra: dict | None = None) -> Path:
    """``network_state``, ``optimizer_state``: the training target's (targets.py ``state_dicts``); ``extra``: more
    trainer state to restore with the rest (the EMA weights)."""
    target = state_path(state_root, progress.step)
    with atomic_directory(target) as tmp:
        _write_torch(network_state, tmp / "network.pt")
        _write_torch(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
                **(extra or {}),
            },
            tmp / "trainer.pt",
        )
        (tmp / "progress.json").write_text(json.dumps({"version": STATE_VERSION, **asdict(progress)}))
        (tmp / "profile.json").write_text(json.dumps(profile_to_dict(profile), indent=1, sort_keys=True))
    for old in list_states(state_root)[:-keep_last]:
        if old != target:  # an older step resumed into a folder that holds later ones keeps its own save
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_states(state_root: Path) -> list[Path]:
    """Complete states, oldest first (incomplete ones never get their final name)."""
    if not state_root.exists():
        return []
    return sorted(p for p in state_root.glob("step-*") if (p / "progress.json").exists())


def find_state(resume: str, output_dir: Path) -> Path:
    """``latest`` → newest state of any run under output_dir; a run dir → its newest; else a state dir."""
    if resume == "latest":
        candidates = sorted(output_dir.glob("runs/*/state/step-*"), key=lambda p: (p / "progress.json").stat().st_mtime if (p / "progress.json").exists() else 0)
        candidates = [p for p in candidates if (p / "progress.json").exists()]
        if not candidates:
            raise ResumeError(f"--resume latest: no saved state under {output_dir / 'runs'}; start without --resume.")
        return candidates[-1]
    path = Path(resume)
    if (path / "progress.json").exists():
        return path
    states = list_states(path / "state")
    if states:
        return states[-1]
    raise ResumeError(f"--resume {resume}: neither a state folder (with progress.json) nor a run folder with saved states.")


def _flatten(data: dict, prefix=()) -> dict[tuple, object]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and not (prefix and prefix[0] in ("network", "optimizer") and key in ("args", "optimizer_args")):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def changed_keys(saved: dict, current: dict, *, allow_lr_change: bool) -> list[str]:
    """Profile keys that differ and that the state depends on."""
    old, new = _flatten(saved), _flatten(current)
    allowed = MUTABLE_KEYS | (LR_KEYS if allow_lr_change else set())
    changed = []
    for key in sorted(set(old) | set(new)):
        if key[0] in MUTABLE_TABLES or key[:2] in allowed or old.get(key) == new.get(key):
            continue
        changed.append(f"{'.'.join(key)}: {old.get(key)!r} → {new.get(key)!r}")
    return changed


def check_profile(state_dir: Path, profile: Profile, *, allow_lr_change: bool) -> None:
    """Refuse a profile that changed what the state depends on, naming every changed key."""
    try:
        saved_profile = json.loads((state_dir / "profile.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{state_dir}: cannot read the state ({exc}); pick another state folder.") from None
    changes = changed_keys(saved_profile, profile_to_dict(profile), allow_lr_change=allow_lr_change)
    if changes:
        raise ResumeError(
            f"{state_dir}: the profile changed what this state depends on:\n  "
            + "\n  ".join(changes)
            + "\nRestore those values to resume (learning-rate keys may change with --allow-lr-change)."
        )


def check_processes(state_dir: Path, num_processes: int) -> None:
    """The global batch depends on the number of processes, so a state resumes only with the same number."""
    try:
        saved = json.loads((state_dir / "progress.json").read_text()).get("num_processes", 1)
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{state_dir}: cannot read the state ({exc}); pick another state folder.") from None
    if saved != num_processes:
        raise ResumeError(
            f"{state_dir} was saved by a run of {saved} process(es); this run has {num_processes}. The global batch "
            f"(and so every step) depends on the number of processes: resume with training.num_processes = {saved} "
            "(or the same launcher settings), or start a new run."
        )


def load_state(state_dir: Path, *, profile: Profile, allow_lr_change: bool) -> tuple[Progress, dict, dict]:
    """Check the profile against the state's, then return (progress, network state, trainer state)."""
    check_profile(state_dir, profile, allow_lr_change=allow_lr_change)
    try:
        info = json.loads((state_dir / "progress.json").read_text())
        version = info.pop("version", None)
        if version != STATE_VERSION:
            raise ResumeError(f"{state_dir}: state format {version}, this version reads {STATE_VERSION}; resume with the version that saved it.")
        network_state = torch.load(state_dir / "network.pt", map_location="cpu", weights_only=True)
        trainer_state = torch.load(state_dir / "trainer.pt", map_location="cpu", weights_only=False)
        return Progress(**info), network_state, trainer_state
    except (OSError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        raise ResumeError(f"{state_dir}: cannot read the state ({exc}); pick another state folder.") from None
