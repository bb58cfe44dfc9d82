"""Each optimizer people use for Anima LoRAs trains the tiny model, saves, and resumes bit for bit; the EMA,
the fused backward pass, schedule-free modes and max-norm regularisation do what sd-scripts (or the
profile) says."""

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import make_run, read_events

from anima_core.config.schema import OptimizerTable
from anima_core.errors import AnimaError
from anima_core.plugins import build_plugins
from anima_core.training.ema import WeightEMA
from anima_core.config.optimizer_rules import optimizer_factory
from anima_core.training.optim import apply_max_norm, create_optimizer
from anima_core.training.state import list_states

STEPS = 4


def run(root, tiny_model, name, optimizer, *, resume=None, steps=STEPS, **tables):
    saving = {"save_state_every_n_steps": 2, "keep_last_n_states": 3, **tables.pop("saving", {})}
    return make_run(root, tiny_model, images=3, resume=resume, optimizer=optimizer, logging={"run_name": name},
                    training={"max_train_steps": steps}, saving=saving, **tables).run()


def assert_same_file(a, b):
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def trains_and_resumes_exactly(root, tiny_model, optimizer, **tables):
    """The run, and a second run resumed from its step-2 state: same losses after step 2, same LoRA."""
    ref = run(root, tiny_model, "reference", optimizer, **tables)
    assert ref.status == "finished"
    assert any(v.abs().sum() > 0 for k, v in load_file(ref.lora_path).items() if k.endswith("lora_up.weight"))
    state = next(s for s in list_states(ref.run_dir / "state") if s.name == "step-00000002")
    resumed = run(root, tiny_model, "resumed", optimizer, resume=str(state), **tables)
    steps = {e["step"]: e["loss"] for e in read_events(ref.run_dir) if e["type"] == "step"}
    again = {e["step"]: e["loss"] for e in read_events(resumed.run_dir) if e["type"] == "step"}
    assert again == {s: loss for s, loss in steps.items() if s > 2}
    assert_same_file(resumed.lora_path, ref.lora_path)
    return ref, resumed


OPTIMIZERS = {
    "AdamW": {"optimizer_type": "AdamW", "optimizer_args": {"weight_decay": 0.01}},
    "Adafactor-default": {"optimizer_type": "Adafactor", "lr_scheduler": "adafactor"},
    "Adafactor-fused": {"optimizer_type": "Adafactor", "fused_backward_pass": True, "max_grad_norm": 0.0},
    "Prodigy": {"optimizer_type": "Prodigy", "learning_rate": 1.0,
                "optimizer_args": {"d_coef": 2.0, "decouple": True, "use_bias_correction": True, "safeguard_warmup": True}},
    "AdamWScheduleFree": {"optimizer_type": "AdamWScheduleFree", "optimizer_args": {"warmup_steps": 2}},
    "CAME": {"optimizer_type": "CAME", "learning_rate": 1e-3},
    "DAdaptAdam": {"optimizer_type": "dadaptadam", "learning_rate": 1.0, "optimizer_args": {"decouple": True}},
    "Lion": {"optimizer_type": "lion", "learning_rate": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 1},
    "SGDNesterov": {"optimizer_type": "SGDNesterov", "lr_scheduler": "linear"},
    "by-path": {"optimizer_type": "torch.optim.RAdam", "lr_scheduler_type": "StepLR", "lr_scheduler_args": {"step_size": 2}},
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_trains_saves_and_resumes_bit_for_bit(tmp_path, tiny_model, name):
    trains_and_resumes_exactly(tmp_path, tiny_model, OPTIMIZERS[name])


def test_ema_is_saved_beside_the_lora_and_resumes_bit_for_bit(tmp_path, tiny_model):
    optimizer = {"ema_decay": 0.5, "ema_every_n_steps": 2, "ema_device": "cpu", "ema_save": "beside"}
    ref, resumed = trains_and_resumes_exactly(tmp_path, tiny_model, optimizer)
    ema_path = ref.lora_path.with_name("lora-ema.safetensors")
    assert_same_file(resumed.lora_path.with_name("lora-ema.safetensors"), ema_path)
    trained, averaged = load_file(ref.lora_path), load_file(ema_path)
    key = next(k for k in trained if k.endswith("lora_up.weight"))
    # Two updates (steps 2 and 4) from lora_up = 0: ema = 0.5·(0.5·0 + 0.5·w2) + 0.5·w4, never the trained w4.
    assert not torch.equal(trained[key], averaged[key]) and averaged[key].abs().sum() > 0


def test_ema_average_and_swap_are_exact():
    layer = torch.nn.Linear(3, 2, bias=False)
    start = layer.weight.detach().clone()
    ema = WeightEMA(layer, decay=0.75, every=2, device=torch.device("cpu"))
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not ema.update(1) and torch.equal(ema.shadow["weight"], start)
    assert ema.update(2)
    expected = 0.75 * start + 0.25 * (start + 1.0)
    assert torch.allclose(ema.shadow["weight"], expected)
    trained = layer.weight.detach().clone()
    with ema.applied():
        assert torch.equal(layer.weight, ema.shadow["weight"])
    assert torch.equal(layer.weight, trained)


def test_ema_options_set_the_decay_the_interval_and_the_device():
    """The profile's EMA: shadow = decay·shadow + (1 − decay)·weight every ema_every_n_steps optimizer steps, kept
    in CPU memory with ema_device = "cpu" and on the training device otherwise."""
    from anima_core.training.ema import build_ema

    layer = torch.nn.Linear(3, 2, bias=False)
    start = layer.weight.detach().clone()
    ema = build_ema(OptimizerTable(ema_decay=0.75, ema_every_n_steps=3, ema_device="cpu"), layer, torch.device("meta"))
    assert ema.shadow["weight"].device.type == "cpu"
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert [ema.update(step) for step in (1, 2, 3)] == [False, False, True]
    assert torch.allclose(ema.shadow["weight"], 0.75 * start + 0.25 * (start + 1.0))
    on_device = build_ema(OptimizerTable(ema_decay=0.5), layer, torch.device("meta"))
    assert on_device.shadow["weight"].device.type == "meta"
    assert build_ema(OptimizerTable(), layer, torch.device("cpu")) is None


def test_schedule_free_saves_its_eval_weights(tmp_path, tiny_model):
    trainer = make_run(tmp_path, tiny_model, optimizer={"optimizer_type": "AdamWScheduleFree"},
                       training={"max_train_steps": 2}, saving={"save_state": False})
    assert trainer.run().status == "finished"
    saved = load_file(trainer.lora_path())
    train_weights = trainer.network.file_tensors()  # the run ends in train mode
    trainer.optimizer.eval()  # back to the eval weights (train → eval → train → eval rounds in the last bits)
    eval_weights = trainer.network.file_tensors()
    assert saved.keys() == eval_weights.keys() == train_weights.keys()
    assert all(torch.allclose(saved[k], eval_weights[k], rtol=1e-5, atol=1e-7) for k in saved)
    assert not all(torch.allclose(saved[k], train_weights[k], rtol=1e-3, atol=1e-5) for k in saved)


def test_fused_backward_pass_updates_as_the_unfused_optimizer(tmp_path, tiny_model):
    args = {"optimizer_type": "Adafactor", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 1,
            "optimizer_args": {"relative_step": False, "scale_parameter": False, "warmup_init": False}}
    for clip in (0.0, 0.01):
        plain = run(tmp_path / f"p{clip}", tiny_model, "plain", {**args, "max_grad_norm": clip}, saving={"save_state": False})
        fused = run(tmp_path / f"f{clip}", tiny_model, "fused", {**args, "max_grad_norm": clip, "fused_backward_pass": True},
                    saving={"save_state": False})
        assert_same_file(fused.lora_path, plain.lora_path)
        norms = [[e["grad_norm"] for e in read_events(r.run_dir) if e["type"] == "step"] for r in (plain, fused)]
        assert norms[1] == (norms[0] if clip else [None] * STEPS)
        rates = [[e["lr"] for e in read_events(r.run_dir) if e["type"] == "step"] for r in (plain, fused)]
        assert rates[1] == rates[0] and len(rates[0][0]) == 4  # one rate per LoRA group, not per parameter
        warned = [e for e in read_events(fused.run_dir) if e["type"] == "warning" and "fused_backward_pass" in e["message"]]
        assert bool(warned) == bool(clip)


def test_scale_weight_norms_caps_every_pair_and_reports_it(tmp_path, tiny_model):
    result = run(tmp_path, tiny_model, "maxnorm", {"learning_rate": 1e-2, "scale_weight_norms": 0.05},
                 saving={"save_state": False})
    norms = [e["weight_norms"] for e in read_events(result.run_dir) if e["type"] == "step"]
    assert len(norms) == STEPS and norms[-1]["keys_scaled"] > 0 and norms[-1]["max_norm"] <= 0.05 * (1 + 1e-5)
    tensors = load_file(result.lora_path)
    for key in [k for k in tensors if k.endswith("lora_down.weight")]:
        up, down = tensors[key.replace("lora_down", "lora_up")], tensors[key]
        delta = up @ down * (tensors[key.replace("lora_down.weight", "alpha")] / down.shape[0])
        assert float(delta.norm()) <= 0.05 * (1 + 1e-5)


def test_max_norm_scales_up_and_down_alike_and_leaves_small_pairs():
    from anima_plugins.lora.module import LoRAModule

    big, small = (LoRAModule(n, torch.nn.Linear(6, 5), rank=2, alpha=1.0) for n in ("big", "small"))
    holder = torch.nn.ModuleList([big, small])
    with torch.no_grad():
        big.lora_up.weight.fill_(1.0)
        small.lora_up.weight.fill_(1e-4)
    before = {n: (m.lora_up.weight.clone(), m.lora_down.weight.clone()) for n, m in (("big", big), ("small", small))}
    norm_before = float(big.delta_weight().detach().norm())
    stats = apply_max_norm(holder, 0.5)
    assert stats["keys_scaled"] == 1 and stats["max_norm"] == pytest.approx(0.5)
    assert float(big.delta_weight().detach().norm()) == pytest.approx(0.5, rel=1e-5)
    factor = (0.5 / norm_before) ** 0.5
    assert torch.allclose(big.lora_up.weight, before["big"][0] * factor)
    assert torch.allclose(big.lora_down.weight, before["big"][1] * factor)
    assert torch.equal(small.lora_up.weight, before["small"][0]) and torch.equal(small.lora_down.weight, before["small"][1])


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit",
                                  "SGDNesterov8bit", "PagedAdamW"])
def test_bitsandbytes_optimizers_refuse_cleanly_without_cuda(name):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only message")
    factory = optimizer_factory(build_plugins(entry_points=False), name.lower())
    with pytest.raises(AnimaError, match=f"'{name}' needs a CUDA GPU.*optimizer_type = 'AdamW'"):
        factory([{"params": [torch.nn.Parameter(torch.ones(2))]}], 1e-3, {})


def test_optimizer_names_follow_sd_scripts():
    plugins = build_plugins(entry_points=False)
    param = torch.nn.Parameter(torch.ones(2))
    # Adafactor without arguments: relative_step (sd-scripts' default), so the learning rate is not used.
    adafactor = create_optimizer(plugins, OptimizerTable(optimizer_type="AdaFactor"), [{"params": [param], "lr": 1e-4}])
    assert adafactor.param_groups[0]["relative_step"] and adafactor.param_groups[0]["lr"] is None
    nesterov = create_optimizer(plugins, OptimizerTable(optimizer_type="sgdnesterov"), [{"params": [param]}])
    assert nesterov.param_groups[0]["nesterov"] and nesterov.param_groups[0]["momentum"] == 0.9
    assert type(create_optimizer(plugins, OptimizerTable(optimizer_type="RAdam"), [{"params": [param]}])) is torch.optim.RAdam
    import dadaptation.experimental

    dadapt = create_optimizer(plugins, OptimizerTable(optimizer_type="DAdaptation"), [{"params": [param]}])
    assert type(dadapt) is dadaptation.experimental.DAdaptAdamPreprint
    with pytest.raises(AnimaError, match="did you mean 'Prodigy'"):
        optimizer_factory(plugins, "Prodigi")


def test_ema_is_the_saved_lora_and_serves_previews_when_asked(tmp_path, tiny_model):
    trainer = make_run(tmp_path, tiny_model, optimizer={"ema_decay": 0.9, "ema_for_previews": True},
                       training={"max_train_steps": 2}, saving={"save_state": False})
    assert trainer.run().status == "finished"
    trained = trainer.network.file_tensors()
    with trainer.ema_weights("previews"):
        averaged = trainer.network.file_tensors()
    with trainer.ema_weights("validation"):  # not asked for validation: the trained weights
        assert all(torch.equal(v, trained[k]) for k, v in trainer.network.file_tensors().items())
    assert all(torch.equal(v, trained[k]) for k, v in trainer.network.file_tensors().items())
    assert any(not torch.equal(v, trained[k]) for k, v in averaged.items())
    saved = load_file(trainer.lora_path())
    assert saved.keys() == averaged.keys() and all(torch.equal(saved[k], averaged[k]) for k in saved)


def test_validation_uses_the_ema_when_asked(tmp_path, tiny_model):
    from anima_core.training.validation import evaluate

    trainer = make_run(tmp_path, tiny_model, images=6, dataset={"validation_split": 0.34, "validation_seed": 5},
                       optimizer={"learning_rate": 1e-2, "ema_decay": 0.5, "ema_for_validation": True},
                       training={"max_train_steps": 2}, saving={"save_state": False})
    assert trainer.run().status == "finished"
    with_ema = evaluate(trainer, trainer.data.validation, seed=5, max_batches=None)
    trainer.profile.optimizer.ema_for_validation = False
    trained = evaluate(trainer, trainer.data.validation, seed=5, max_batches=None)
    with trainer.ema.applied():
        by_hand = evaluate(trainer, trainer.data.validation, seed=5, max_batches=None)
    assert with_ema == by_hand and with_ema.loss != trained.loss
