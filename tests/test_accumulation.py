"""Gradient accumulation divides the loss by the number of micro-batches: batch 1 × 2 accumulated
micro-batches trains the LoRA that batch 2 trains.

The two runs see the same samples with the same draws: one image with 4 repeats (every sample is the same
image and caption, so how the epoch plan groups them does not matter), and a sample's σ and noise are
seeded by its place among the step's samples, not by its micro-batch. What remains is float rounding (one
batched forward against two). The optimizer is SGD with Nesterov momentum and no clipping: its update is
linear in the gradient, so a missing or doubled division shows as a LoRA twice as far from its start.
(AdamW divides by √v and would hide a constant factor; clipping would too.)
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from training_helpers import make_run, write_images

SGD = {"optimizer_type": "SGDNesterov", "learning_rate": 0.05, "max_grad_norm": 0.0}


def weight_changes(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = alpha/rank · up @ down of every module: all of it the training's doing (up starts at zero)."""
    changes = {}
    for key in lora:
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            up, down = lora[key].double(), lora[f"{name}.lora_down.weight"].double()
            changes[name] = up @ down * (float(lora[f"{name}.alpha"]) / down.shape[0])
    return changes


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    difference = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return difference / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5


def test_batch_one_accumulated_twice_trains_the_batch_two_lora(tmp_path, tiny_model):
    data = write_images(tmp_path / "data", count=1, repeats=4)
    changes = {}
    for batch, accumulation in ((2, 1), (1, 2)):
        root = tmp_path / f"b{batch}a{accumulation}"
        root.mkdir()
        (root / "data").symlink_to(data, target_is_directory=True)
        # 3 steps: 2 steps an epoch (4 samples), so the third starts a new epoch plan
        result = make_run(root, tiny_model, dataset={"train_batch_size": batch}, optimizer=SGD,
                          training={"max_train_steps": 3, "gradient_accumulation_steps": accumulation}).run()
        assert result.status == "finished" and result.step == 3
        changes[batch] = weight_changes(load_file(result.lora_path))
    size = sum(float(c.pow(2).sum()) for c in changes[2].values()) ** 0.5
    assert size > 1e-6, "the LoRA did not train: the comparison would prove nothing"
    difference = relative_difference(changes[1], changes[2])
    # float rounding of one batched forward against two gives ~2e-7; a missing division gives ~1
    assert difference < 1e-5, f"relative difference {difference:.3g} between batch 1 × 2 and batch 2 × 1"
