"""A run stopped at step k and resumed ends with the same LoRA, bit for bit, as the run never stopped.

Three images with two repeats and batch 2 give three batches an epoch, so steps 1-3 are epoch 1 and
steps 4-5 epoch 2: stops at 1 and 4 are mid-epoch, 3 is the epoch boundary. The stop comes through the
real control file, created by an event sink when it sees the step event.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import make_run, read_events, tiny_profile_data

from anima_core.config import profile_from_dict
from anima_core.hookspecs import hookimpl
from anima_core.plugins import build_plugins
from anima_core.training.state import ResumeError, check_profile, find_state, list_states
from anima_core.training.trainer import Trainer

CACHED = {"cache_latents": True, "cache_text_encoder_outputs": True}
UNCACHED = {"cache_latents": False, "cache_text_encoder_outputs": False}


class StopAtStep:
    """Creates run_dir/control/stop when the step event for `step` arrives, as the TUI's stop does."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def register_event_sinks(self, register):
        def make_sink(run_dir, profile):
            def sink(event):
                if event["type"] == "step" and event["step"] == self.step:
                    (run_dir / "control" / "stop").touch()

            return sink

        register("stop_at_step", make_sink)


def run(root, tiny_model, name, *, stop_at=None, resume=None, caching=CACHED, training=None, saving=None):
    plugins = build_plugins(entry_points=False, extra=(StopAtStep(stop_at),) if stop_at else ())
    return make_run(root, tiny_model, images=3, plugins=plugins, resume=resume, caching=caching,
                    logging={"run_name": name}, training={"max_train_steps": 5, **(training or {})},
                    saving={"output_dir": str(root / "out"), **(saving or {})}).run()


def losses(result) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(result.run_dir) if e["type"] == "step"}


def assert_same_lora(a, b):
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The uninterrupted 5-step run with cached latents and text."""
    root = tmp_path_factory.mktemp("resume")
    return root, run(root, tiny_model, "reference")


def test_stops_mid_epoch_at_the_boundary_and_after_it_resume_exactly(reference, tiny_model):
    root, ref = reference
    ref_losses = losses(ref)
    assert ref.status == "finished" and sorted(ref_losses) == [1, 2, 3, 4, 5]

    first = run(root, tiny_model, "a", stop_at=1)
    assert first.status == "stopped" and first.step == 1
    end = read_events(first.run_dir)[-1]
    assert end["type"] == "run_end" and end["status"] == "stopped" and "control file" in end["reason"]
    progress = json.loads((list_states(first.run_dir / "state")[-1] / "progress.json").read_text())
    assert (progress["step"], progress["epoch"], progress["batch_in_epoch"]) == (1, 0, 1)

    # Resumed from the run folder; the step count and the save cadence may change (a finished run may be
    # extended), here ending exactly at the epoch boundary.
    second = run(root, tiny_model, "b", resume=str(first.run_dir), training={"max_train_steps": 3},
                 saving={"save_every_n_steps": 2, "keep_last_n_states": 1})
    assert second.status == "finished" and second.step == 3
    states = list_states(second.run_dir / "state")
    assert [s.name for s in states] == ["step-00000003"]
    progress = json.loads((states[-1] / "progress.json").read_text())
    assert (progress["epoch"], progress["batch_in_epoch"]) == (1, 0)

    third = run(root, tiny_model, "c", stop_at=4, resume=str(states[-1]))
    assert third.status == "stopped" and third.step == 4
    last = run(root, tiny_model, "d", resume=str(third.run_dir))
    assert last.status == "finished" and last.step == 5

    for part in (first, second, third, last):
        for step, loss in losses(part).items():
            assert loss == ref_losses[step], f"{part.run_dir.name}: step {step} loss differs"
    assert sorted(losses(first) | losses(second) | losses(third) | losses(last)) == [1, 2, 3, 4, 5]
    assert_same_lora(last.lora_path, ref.lora_path)


def test_uncached_run_with_accumulation_resumes_exactly(tmp_path, tiny_model):
    # batch 1 and 2 micro-batches: 6 batches, 3 steps an epoch; the stop at 2 is mid-epoch.
    options = {"caching": UNCACHED, "training": {"max_train_steps": 3, "gradient_accumulation_steps": 2,
                                                 "caption_dropout_rate": 0.3}}
    dataset = {"train_batch_size": 1}

    def go(name, **kw):
        plugins = build_plugins(entry_points=False, extra=(StopAtStep(kw.pop("stop_at")),) if "stop_at" in kw else ())
        return make_run(tmp_path, tiny_model, images=3, plugins=plugins, dataset=dataset, logging={"run_name": name},
                        **options, **kw).run()

    ref = go("reference")
    stopped = go("a", stop_at=2)
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = go("b", resume=str(stopped.run_dir))
    assert resumed.status == "finished" and resumed.step == 3
    assert losses(stopped) | losses(resumed) == losses(ref)
    assert_same_lora(resumed.lora_path, ref.lora_path)


def profile_with(root, tiny_model, **tables):
    return profile_from_dict(tiny_profile_data(root, tiny_model, **{
        "training": {"max_train_steps": 5}, "saving": {"output_dir": str(root / "out")}, **tables}))


def test_changed_profile_is_refused_before_any_model_loads(reference, tiny_model):
    root, ref = reference
    state = find_state(str(ref.run_dir), root / "out")
    changed = profile_with(root, tiny_model, network={"dim": 8, "alpha": 4.0, "train_unet_only": True},
                           training={"max_train_steps": 5, "seed": 8})
    trainer = Trainer(changed, build_plugins(entry_points=False), resume=str(ref.run_dir))
    trainer._cache = lambda: pytest.fail("models loaded before the profile was checked")
    with pytest.raises(ResumeError) as info:
        trainer.run()
    message = str(info.value)
    assert "network.dim: 4 → 8" in message and "training.seed: 7 → 8" in message and str(state) in message
    assert read_events(trainer.run_dir)[-1]["status"] == "failed"


def test_allowed_changes_and_learning_rate_only_when_asked(reference, tiny_model):
    root, ref = reference
    state = find_state(str(ref.run_dir), root / "out")
    allowed = profile_with(root, tiny_model, training={"max_train_steps": 9, "device": "cpu"},
                           saving={"output_dir": str(root / "elsewhere"), "save_every_n_steps": 3, "keep_last_n_states": 4},
                           logging={"run_name": "other", "log_every_n_steps": 5})
    check_profile(state, allowed, allow_lr_change=False)
    faster = profile_with(root, tiny_model, optimizer={"learning_rate": 2e-3, "lr_scheduler": "cosine"})
    with pytest.raises(ResumeError, match="(?s)optimizer.learning_rate: 0.001 → 0.002.*--allow-lr-change"):
        check_profile(state, faster, allow_lr_change=False)
    check_profile(state, faster, allow_lr_change=True)
    with pytest.raises(ResumeError, match="optimizer.optimizer_type: 'AdamW' → 'Adafactor'"):
        check_profile(state, profile_with(root, tiny_model, optimizer={"optimizer_type": "Adafactor"}), allow_lr_change=True)


def test_find_state_latest_and_bad_arguments(reference, tmp_path):
    root, ref = reference
    newest = find_state("latest", root / "out")
    assert newest.parent.parent.parent == root / "out" / "runs" and (newest / "progress.json").is_file()
    assert find_state(str(ref.run_dir), root / "out") == list_states(ref.run_dir / "state")[-1]
    with pytest.raises(ResumeError, match="no saved state"):
        find_state("latest", tmp_path)
    with pytest.raises(ResumeError, match="neither a state folder"):
        find_state(str(tmp_path), tmp_path)
