"""Non-finite steps: skipped and named, then a reload with a lower learning rate, or a stop with state.

The NaN comes the way it does in practice: a latent cache file on disk holds NaN for one image (latents
are cached to disk, so every batch reads the file). The image chosen is not in the first batch, so the
first step is good and its state exists when the bad steps come.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import make_run, read_events

from anima_core.hookspecs import hookimpl
from anima_core.plugins import build_plugins
from anima_core.training.state import list_states
from anima_core.training.trainer import Trainer

DISK_CACHE = {"cache_latents_to_disk": True, "cache_text_encoder_outputs": True}


class CorruptOneLatent(Trainer):
    """After caching, writes NaN into the cache file of one image that the first batch does not use."""

    def _cache(self):
        super()._cache()
        first = {Path(p).name for p in next(self.data.epoch_batches(0)).paths}
        caches = sorted(self.profile.dataset.train_data_dir.rglob("*_anima.npz"))
        self.victim = next(c for c in caches if c.name.split("_")[0] + ".png" not in first)
        self.victim_image = self.victim.with_name(self.victim.name.split("_")[0] + ".png")
        shutil.copy(self.victim, self.victim.with_suffix(".good"))
        with np.load(self.victim) as data:
            arrays = {k: data[k] for k in data.files}
        for key in arrays:
            if key.startswith("latents"):
                arrays[key] = np.full_like(arrays[key], np.nan)
        np.savez(self.victim, **arrays)


class RepairAfterReload:
    """Puts the good cache file back when the run announces the reload: the trouble was passing."""

    def __init__(self):
        self.trainer = None

    @hookimpl
    def register_event_sinks(self, register):
        def make_sink(run_dir, profile):
            def sink(event):
                if event["type"] == "warning" and "reloading" in event["message"]:
                    shutil.copy(self.trainer.victim.with_suffix(".good"), self.trainer.victim)

            return sink

        register("repair_after_reload", make_sink)


def corrupt_run(root, tiny_model, *, plugins=None, **tables):
    plain = make_run(root, tiny_model, images=3, caching=DISK_CACHE, **tables)
    return CorruptOneLatent(plain.profile, plugins or plain.plugins)


def bad_step_warnings(run_dir):
    return [e for e in read_events(run_dir) if e["type"] == "warning" and "non-finite" in e["message"]]


def test_bad_batches_are_skipped_named_and_not_counted(tmp_path, tiny_model):
    trainer = corrupt_run(tmp_path, tiny_model, training={"max_train_steps": 4})
    result = trainer.run()
    assert result.status == "finished" and result.step == 4
    warnings = bad_step_warnings(result.run_dir)
    assert warnings, "the corrupted image was never drawn"
    for warning in warnings:
        images, sigmas = warning["detail"]["images"], warning["detail"]["sigmas"]
        assert str(trainer.victim_image) in images and trainer.victim_image.name in warning["message"]
        assert len(sigmas) == len(images) == 2 and all(0 <= s <= 1 for s in sigmas)
        assert "σ" in warning["message"] and warning["detail"]["loss"] == "nan"
    steps = [e for e in read_events(result.run_dir) if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(math.isfinite(e["loss"]) for e in steps)
    assert all(torch.isfinite(t).all() for t in load_file(result.lora_path).values())


def test_bad_steps_in_a_row_reload_the_last_state_with_a_lower_rate(tmp_path, tiny_model):
    repair = RepairAfterReload()
    plugins = build_plugins(entry_points=False, extra=(repair,))
    trainer = corrupt_run(tmp_path, tiny_model, plugins=plugins, saving={"save_state_every_n_steps": 1},
                          training={"max_train_steps": 4, "nan_guard_max_bad_steps": 1, "nan_guard_lr_factor": 0.5})
    repair.trainer = trainer
    result = trainer.run()
    assert result.status == "finished" and result.step == 4
    events = read_events(result.run_dir)
    reload_at = next(i for i, e in enumerate(events) if e["type"] == "warning" and "reloading step-" in e["message"])
    before = [e for e in events[:reload_at] if e["type"] == "step"]
    after = [e for e in events[reload_at:] if e["type"] == "step"]
    assert before and all(set(e["lr"]) == {1e-3} for e in before)
    # The reloaded state is the last step before the bad one; training repeats from there at half the rate.
    assert after[0]["step"] == before[-1]["step"] + 1 and all(set(e["lr"]) == {5e-4} for e in after)
    state = list_states(result.run_dir / "state")[-1]
    assert json.loads((state / "progress.json").read_text())["lr_scale"] == 0.5


def test_bad_steps_without_a_remedy_stop_with_state_saved(tmp_path, tiny_model):
    trainer = corrupt_run(tmp_path, tiny_model, training={"max_train_steps": 4, "nan_guard_max_bad_steps": 1})
    result = trainer.run()
    assert result.status == "stopped" and result.step >= 1
    end = read_events(result.run_dir)[-1]
    assert end["type"] == "run_end" and end["status"] == "stopped"
    assert "1 non-finite steps in a row" in end["reason"] and "Likely causes" in end["reason"]
    assert result.lora_path.is_file() and all(torch.isfinite(t).all() for t in load_file(result.lora_path).values())
    progress = json.loads((list_states(result.run_dir / "state")[-1] / "progress.json").read_text())
    assert progress["step"] == result.step and progress["bad_steps"] == 1


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_a_non_finite_gradient_is_never_applied_except_under_fp16s_scaler(max_grad_norm):
    """optimizer_step with a finite loss but an infinite gradient: the update is skipped and the norm says why;
    under fp16 the step is called anyway, since accelerate's gradient scaler skips it itself and lowers its scale."""
    from types import SimpleNamespace

    from anima_core.training.optimizer_step import optimizer_step

    def step(precision):
        weight = torch.nn.Parameter(torch.ones(3))
        weight.grad = torch.tensor([1.0, float("inf"), 0.0])
        calls = []
        optimizer = torch.optim.SGD([weight], lr=0.1)
        optimizer.step = lambda: calls.append("step")
        cfg = SimpleNamespace(fused_backward_pass=False, max_grad_norm=max_grad_norm)
        norm = optimizer_step(optimizer, [weight], optimizer_cfg=cfg, sum_gradients=lambda params: None,
                              accelerator=SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_),
                              precision=precision)
        return norm, calls

    norm, calls = step("bf16")
    assert not math.isfinite(norm) and calls == []
    assert step("fp16")[1] == ["step"]
