"""A dataset config's network_multiplier trains that dataset's batches with the LoRA at that strength, as
sd-scripts does (each batch carries its dataset's value; the network is set to it before the batch's forward).

What is observable: a LoRA module adds m · (alpha/rank) · up(down(x)). At the start up is zero, so the first
step's gradient of up is exactly m times the gradient at m = 1 and down gets none; with SGD (an update linear
in the gradient) the first step's up is therefore linear in each batch's m.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_profile_data, write_images

from anima_core.config import profile_from_dict
from anima_core.data import DataOptions, build_training_data
from anima_core.errors import AnimaError
from anima_core.plugins import build_plugins
from anima_core.training.network import refuse_unsupported_multipliers
from anima_core.training.trainer import Trainer
from anima_core.training.validation import evaluate

SGD = {"optimizer_type": "SGDNesterov", "learning_rate": 0.05, "max_grad_norm": 0.0}


def write_config(root, multipliers: list[float | None], *, images: int = 2, **dataset_values) -> str:
    """One dataset per multiplier (None: the key left out), each its own folder of ``images`` images."""
    lines = ["[general]", 'caption_extension = ".txt"', "resolution = 64", "batch_size = 2", ""]
    for i, multiplier in enumerate(multipliers):
        folder = write_images(root / f"set{i}", count=images, repeats=1) / "1_tiny"
        lines.append("[[datasets]]")
        if multiplier is not None:
            lines.append(f"network_multiplier = {multiplier}")
        lines += [f"{key} = {value}" for key, value in dataset_values.items()]
        lines += ["[[datasets.subsets]]", f"image_dir = '{folder}'", ""]
    path = root / "datasets.toml"
    path.write_text("\n".join(lines))
    return str(path)


def trainer_for(root, tiny_model, config: str, **tables) -> Trainer:
    data = tiny_profile_data(root, tiny_model, optimizer=SGD, **tables)
    data["dataset"] = {"dataset_config": config}
    plugins = build_plugins(entry_points=False)
    return Trainer(profile_from_dict(data, plugins=plugins), plugins)


def ups(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in lora.items() if k.endswith(".lora_up.weight")}


def downs(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in lora.items() if k.endswith(".lora_down.weight")}


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return sum(float(t.double().pow(2).sum()) for t in tensors.values()) ** 0.5


def assert_close(a: dict, b: dict, what: str) -> None:
    difference = norm({k: a[k] - b[k] for k in a})
    assert difference <= 1e-5 * max(norm(b), 1e-12), f"{what}: relative difference {difference / norm(b):.3g}"


def test_each_batch_carries_its_datasets_network_multiplier(tmp_path):
    config = write_config(tmp_path, [0.5, None, -1.0])
    data = build_training_data(DataOptions(dataset_config=config, seed=3), base_dir=tmp_path)
    assert [ds.spec.network_multiplier for ds in data.datasets] == [0.5, 1.0, -1.0]
    seen = set()
    for batch in data.epoch_batches(0):
        (folder,) = {path.split("/")[-3] for path in batch.paths}  # a batch never mixes datasets
        expected = {"set0": 0.5, "set1": 1.0, "set2": -1.0}[folder]
        assert batch.network_multiplier == expected
        seen.add(folder)
    assert seen == {"set0", "set1", "set2"}


NETWORKS = {
    "lora_anima": {},
    "lycoris": {"network": {"module": "lycoris", "args": {"algo": "locon"}}},
    # the text encoder runs in the step, its adapters at the batch's multiplier as well
    "with_text_encoder": {"network": {"train_unet_only": False}, "caching": {"cache_text_encoder_outputs": False}},
}


@pytest.mark.parametrize("network", NETWORKS)
def test_the_first_step_trains_the_lora_in_proportion_to_the_multiplier(tmp_path, tiny_model, network):
    """One dataset, one step: m = -0.5 gives -0.5 × the m = 1 LoRA update, m = 0 none at all; the network is
    back at 1.0 afterwards (previews and saves see the LoRA as ComfyUI loads it)."""
    loras = {}
    for multiplier in (1.0, -0.5, 0.0):
        root = tmp_path / f"m{multiplier}"
        trainer = trainer_for(root, tiny_model, write_config(root, [multiplier]), training={"max_train_steps": 1},
                              **NETWORKS[network])
        result = trainer.run()
        assert result.status == "finished"
        assert {module.multiplier for module in trainer.network.loras.values()} == {1.0}
        loras[multiplier] = load_file(result.lora_path)
    reference = ups(loras[1.0])
    assert norm(reference) > 1e-6
    if network == "with_text_encoder":
        assert norm({k: v for k, v in reference.items() if not k.startswith("lora_unet")}) > 1e-6
    assert_close(ups(loras[-0.5]), {k: -0.5 * v for k, v in reference.items()}, "m = -0.5 against -0.5 × (m = 1)")
    assert norm(ups(loras[0.0])) == 0.0, "multiplier 0 must leave the LoRA untrained"
    for multiplier in (-0.5, 0.0):
        assert all(torch.equal(downs(loras[multiplier])[k], v) for k, v in downs(loras[1.0]).items())


def test_each_accumulated_micro_batch_uses_its_own_datasets_multiplier(tmp_path, tiny_model):
    """Datasets A (at 1.0) and B (at m) are one micro-batch each of one accumulated step, so the step's up is
    X + m·Y: X from A alone (B at 0 still trains A's part) and Y from B. Applying A's value to both would make
    Y = 0, applying B's value to both would make X = 0."""
    loras = {}
    for m in (1.0, 0.0, -1.0):
        root = tmp_path / f"b{m}"
        config = write_config(root, [1.0, m])
        trainer = trainer_for(root, tiny_model, config, training={"max_train_steps": 1, "gradient_accumulation_steps": 2})
        loras[m] = ups(load_file(trainer.run().lora_path))
    x = loras[0.0]
    y = {k: (loras[1.0][k] - loras[-1.0][k]) / 2 for k in x}
    assert norm(x) > 1e-6 and norm(y) > 1e-6
    assert_close({k: (loras[1.0][k] + loras[-1.0][k]) / 2 for k in x}, x, "the step's update is linear in B's m")


def test_validation_judges_held_out_images_at_their_datasets_multiplier(tmp_path, tiny_model):
    trainer = trainer_for(tmp_path, tiny_model, write_config(tmp_path, [1.0], images=6, validation_split=0.34),
                          training={"max_train_steps": 2})
    trainer.run()
    held_out = trainer.data.validation
    at_one = evaluate(trainer, held_out, seed=5, max_batches=None)
    held_out.datasets[0].spec.network_multiplier = 0.0
    at_zero = evaluate(trainer, held_out, seed=5, max_batches=None)
    assert {module.multiplier for module in trainer.network.loras.values()} == {1.0}
    held_out.datasets[0].spec.network_multiplier = 1.0
    trainer.network.set_multiplier(0.0)
    without_lora = evaluate(trainer, held_out, seed=5, max_batches=None)
    trainer.network.set_multiplier(1.0)
    assert at_zero.images == 2 and at_zero.loss == without_lora.loss and at_zero.loss != at_one.loss


def test_a_network_that_cannot_scale_is_refused_only_when_a_dataset_asks():
    def data(*multipliers):
        datasets = [SimpleNamespace(spec=SimpleNamespace(network_multiplier=m)) for m in multipliers]
        return SimpleNamespace(datasets=datasets, validation=None)

    fixed = object()
    refuse_unsupported_multipliers(fixed, "fixed_net", data(1.0, 1.0))
    with pytest.raises(AnimaError, match=r"network_multiplier -1.0, .*'fixed_net' cannot scale"):
        refuse_unsupported_multipliers(fixed, "fixed_net", data(1.0, -1.0))
    refuse_unsupported_multipliers(SimpleNamespace(set_multiplier=lambda m: None), "lora_anima", data(-1.0))
