"""Validation loss on the held-out split: when it runs, that it repeats exactly, and that it changes nothing."""

from __future__ import annotations

import math

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import make_run, read_events

from anima_core.training.validation import VALIDATION_SIGMAS, evaluate, sigma_label

# 6 images (2 repeats each) with validation_split 0.34: 4 train images (4 batches of 2 per epoch) and 2 held
# out (1 batch; the held-out split has no repeats).
SPLIT = {"validation_split": 0.34, "validation_seed": 5}


def _validations(run_dir):
    return [e for e in read_events(run_dir) if e["type"] == "validation"]


def test_validation_runs_at_the_requested_steps_and_epochs(tmp_path, tiny_model):
    result = make_run(tmp_path, tiny_model, images=6, dataset=SPLIT, training={"max_train_steps": 8},
                      logging={"validate_every_n_steps": 3, "validate_every_n_epochs": 2}).run()
    assert result.status == "finished"
    points = _validations(result.run_dir)
    # every 3 steps: 3, 6; epochs end at steps 4 and 8, and only epoch 2 is due
    assert [p["step"] for p in points] == [3, 6, 8]
    assert [p["epoch"] for p in points] == [1, 2, 2]
    for point in points:
        assert point["images"] == 2 and point["batches"] == 1
        assert set(point["by_sigma"]) == {sigma_label(s) for s in VALIDATION_SIGMAS}
        assert math.isclose(point["loss"], sum(point["by_sigma"].values()) / len(VALIDATION_SIGMAS))
        assert all(math.isfinite(v) and v > 0 for v in point["by_sigma"].values())
    # the LoRA changes between evaluations, so the numbers do too
    assert points[0]["loss"] != points[-1]["loss"]
    log = (result.run_dir / "train.log").read_text()
    assert "validation step=3 epoch=1 loss=" in log and "σ0.2=" in log


def test_validation_defaults_to_every_epoch_and_max_validation_steps_bounds_it(tmp_path, tiny_model):
    # half held out: 3 train images (3 batches per epoch), 3 held out (2 batches, of which 1 is used)
    result = make_run(tmp_path, tiny_model, images=6, dataset={**SPLIT, "validation_split": 0.5},
                      training={"max_train_steps": 8}, logging={"max_validation_steps": 1}).run()
    points = _validations(result.run_dir)
    assert [p["step"] for p in points] == [3, 6]
    assert all(p["batches"] == 1 and p["images"] == 2 for p in points)
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_max_validation_steps"] == "1" and meta["ss_validation_split"] == "0.5"


def test_two_evaluations_of_the_same_weights_agree(tmp_path, tiny_model):
    trainer = make_run(tmp_path, tiny_model, images=6, dataset=SPLIT, training={"max_train_steps": 1})
    trainer.run()
    before = torch.get_rng_state()
    first = evaluate(trainer, trainer.data.validation, seed=5, max_batches=None)
    second = evaluate(trainer, trainer.data.validation, seed=5, max_batches=None)
    assert first == second
    assert torch.equal(torch.get_rng_state(), before)
    other_noise = evaluate(trainer, trainer.data.validation, seed=6, max_batches=None)
    assert other_noise.loss != first.loss


def test_validation_changes_nothing_in_training(tmp_path, tiny_model):
    """Same split, evaluations on (every step, with LoRA dropout drawing from the global generator) and off."""
    common = dict(images=6, network={"dropout": 0.1}, training={"max_train_steps": 5})
    on = make_run(tmp_path / "on", tiny_model, dataset=SPLIT, logging={"validate_every_n_steps": 1}, **common).run()
    off = make_run(tmp_path / "off", tiny_model, dataset=SPLIT, logging={"validate_every_n_epochs": 1000}, **common).run()
    assert len(_validations(on.run_dir)) == 5 and _validations(off.run_dir) == []
    a, b = load_file(on.lora_path), load_file(off.lora_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[e["loss"] for e in read_events(r.run_dir) if e["type"] == "step"] for r in (on, off)]
    assert losses[0] == losses[1]


def test_a_split_too_small_for_one_image_is_a_warning(tmp_path, tiny_model):
    result = make_run(tmp_path, tiny_model, training={"max_train_steps": 1}, dataset={"validation_split": 0.01},
                      logging={"validate_every_n_steps": 1}).run()
    warnings = [e["message"] for e in read_events(result.run_dir) if e["type"] == "warning"]
    assert "no validation loss: the validation split holds no image" in warnings
    assert _validations(result.run_dir) == []


def test_validation_under_block_swap_and_checkpointing_matches_the_plain_run(tmp_path, tiny_model):
    """The one model copy serves validation in its forward-only layout: same numbers as without the strategies."""
    common = dict(images=6, dataset=SPLIT, training={"max_train_steps": 2}, logging={"validate_every_n_steps": 1})
    swapped = make_run(tmp_path / "swap", tiny_model, memory={"blocks_to_swap": 1, "gradient_checkpointing": True},
                       **common).run()
    plain = make_run(tmp_path / "plain", tiny_model, **common).run()
    losses = [[(p["step"], p["loss"]) for p in _validations(r.run_dir)] for r in (swapped, plain)]
    logs = [e["message"] for e in read_events(swapped.run_dir) if e["type"] == "log"]
    assert any(m.startswith("memory strategy: blocks_to_swap") for m in logs), logs
    assert len(losses[0]) == 2 and losses[0] == losses[1]
