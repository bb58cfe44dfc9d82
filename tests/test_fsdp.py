"""Full fine-tuning sharded with FSDP2 (training.fsdp) over 2 gloo processes: the same weights as one process
with twice the batch, whole-tensor saves and states written by the main process, a bitwise resume of a
sharded state, and what sharding refuses."""

from __future__ import annotations

import pytest
import tomli_w
import torch
from safetensors.torch import load_file
from test_distributed import anima_train
from training_helpers import make_run, read_events, tiny_profile_data, write_images

from anima_core.config import profile_from_dict
from anima_core.errors import ProfileError
from anima_core.plugins import build_plugins

FULL = {"module": "full", "dim": None, "alpha": None}
# SGD with momentum: the comparison sees the gradients (AdamW's √v division magnifies rounding-sized
# differences of near-zero gradients) and the optimizer still has a state to shard and gather.
SGD = {"optimizer_type": "SGD", "learning_rate": 1e-2, "optimizer_args": {"momentum": 0.9}, "ema_decay": 0.5,
       "ema_save": "beside"}
STEPS = {"max_train_steps": 4}
HELD_OUT = {"validation_split": 0.25}  # 4 images: 1 held out, 3 trained
VALIDATE = {"validate_every_n_steps": 2}
SAVES = {"save_precision": "float", "save_state": True, "save_state_every_n_steps": 2, "keep_last_n_states": 3}


def weights(path):
    return {k.removeprefix("net."): v for k, v in load_file(path).items()}


def relative_update_difference(base, left, right) -> float:
    """‖Δleft − Δright‖ / ‖Δright‖ over every tensor: the updates, since the untouched weights' size would hide
    a wrong sum."""
    difference = size = 0.0
    for key, b in base.items():
        a_delta, b_delta = left[key].double() - b.double(), right[key].double() - b.double()
        difference += float((a_delta - b_delta).pow(2).sum())
        size += float(b_delta.pow(2).sum())
    assert size > 0
    return (difference / size) ** 0.5


def sharded_profile(root, tiny_model, name, saving=None, **extra):
    data = tiny_profile_data(root, tiny_model, network={"module": "full"}, optimizer=SGD,
                             dataset={"train_batch_size": 1, **HELD_OUT}, saving={**SAVES, **(saving or {})},
                             training={**STEPS, "num_processes": 2, "num_cpu_threads_per_process": 1, "fsdp": True},
                             memory={"gradient_checkpointing": True}, **extra)  # recomputing gathers again
    for key in ("dim", "alpha"):
        data["network"].pop(key)
    data["logging"].update(run_name=name, **VALIDATE)
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_two_sharded_processes_train_one_processs_weights_and_resume_bit_for_bit(tmp_path, tiny_model):
    """3 trained images, global batch 2: every second batch leaves process 1 an empty slice, which must still take
    part in the weight gathers. The validation loss and the final preview run on both processes (each forward
    gathers) and are written once."""
    write_images(tmp_path / "data", count=4, repeats=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 5\n")
    sampling = {"sampling": {"sample_prompts": str(prompts)}}
    anima_train("run", sharded_profile(tmp_path, tiny_model, "sharded", **sampling))
    out = tmp_path / "out"
    run_dir = out / "runs" / "sharded"
    events = read_events(run_dir)
    assert any("sharded over 2 processes" in e.get("message", "") for e in events)
    checks = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith("self-check")]
    assert checks and all("the released layout, equal to the trained weights" in m for m in checks)
    assert [e["path"] for e in events if e["type"] == "sample"] and len(list((run_dir / "samples").glob("*.png"))) == 1

    write_images(tmp_path / "ref" / "data", count=4, repeats=1)
    reference = make_run(tmp_path / "ref", tiny_model, network=FULL, optimizer=SGD, training=STEPS,
                         dataset={"train_batch_size": 2, **HELD_OUT}, logging=VALIDATE,
                         saving={**SAVES, "output_dir": str(tmp_path / "ref" / "out")}).run()
    validation = [(e["step"], e["loss"]) for e in events if e["type"] == "validation"]
    expected = [(e["step"], e["loss"]) for e in read_events(reference.run_dir) if e["type"] == "validation"]
    assert [s for s, _ in validation] == [s for s, _ in expected] == [2, 4]
    assert all(loss == pytest.approx(want, rel=1e-5) for (_, loss), (_, want) in zip(validation, expected))
    base = weights(tiny_model.dit)
    sharded = weights(out / "lora.safetensors")
    assert sharded.keys() == base.keys()
    assert relative_update_difference(base, sharded, weights(reference.lora_path)) <= 1e-5
    assert relative_update_difference(base, weights(out / "lora-ema.safetensors"),
                                      weights(reference.lora_path.with_name("lora-ema.safetensors"))) <= 1e-5
    # the state holds whole tensors under the DiT's own names, as a one-process state does
    state = torch.load(run_dir / "state" / "step-00000002" / "network.pt", weights_only=True)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in base.items()}

    resumed_profile = sharded_profile(tmp_path, tiny_model, "resumed", saving={"output_dir": str(tmp_path / "again")})
    anima_train("run", resumed_profile, "--resume", run_dir / "state" / "step-00000002")
    again = load_file(tmp_path / "again" / "lora.safetensors")
    first = load_file(out / "lora.safetensors")
    assert [k for k in first if not torch.equal(first[k], again[k])] == []


def test_a_state_keyed_by_parameter_name_loads_unsharded_as_torchs_own_does(tmp_path, tiny_model):
    """A sharded run's optimizer state is keyed by parameter name; a run without sharding takes it as it takes
    its own numbered one (the same optimizer state afterwards), and the numbered one converts to names."""
    from anima_core.training.full_weights import named_optimizer_state

    # a frozen group between trained ones: the numbering skips its parameters
    trainer = make_run(tmp_path, tiny_model, network=FULL, optimizer={**SGD, "cross_attn_lr": 0.0},
                       training={"max_train_steps": 2}, saving={"save_state": True})
    result = trainer.run()
    saved = torch.load(sorted((result.run_dir / "state").iterdir())[-1] / "trainer.pt", weights_only=False)["optimizer"]
    target, optimizer = trainer.target, trainer.optimizer
    weights_now = {k: v.clone() for k, v in target.module.state_dict().items()}
    named = named_optimizer_state(saved, target._trained_names())
    assert all(isinstance(k, str) for k in named["state"]) and len(named["state"]) == len(saved["state"])
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"].zero_()
    target.load_state_dicts(optimizer, weights_now, named)
    loaded = optimizer.state_dict()
    assert loaded["state"].keys() == saved["state"].keys()
    assert all(torch.equal(loaded["state"][i]["momentum_buffer"], saved["state"][i]["momentum_buffer"]) for i in saved["state"])


@pytest.mark.parametrize("tables, message", [
    ({"network": {"module": "lora", "dim": 4, "alpha": 4.0}}, "training.fsdp: shards the weights of a full fine-tune"),
    ({"training": {"mixed_precision": "fp16"}}, "training.mixed_precision: fp16's gradient scaler"),
    ({"optimizer": {"optimizer_type": "AdamW8bit"}}, "optimizer.optimizer_type: AdamW8bit is not a torch.optim optimizer"),
    ({"optimizer": {"optimizer_type": "Adafactor"}}, "transformers' Adafactor and bitsandbytes' fail on them"),
    ({"model": {"cuda_graphs": True}}, "model.cuda_graphs: a captured graph cannot hold FSDP's"),
    ({"model": {"compile_blocks": True}}, "model.compile_blocks: blocks compile in place"),
])
def test_what_sharding_cannot_do_is_refused_by_name(tmp_path, tiny_model, tables, message):
    data = tiny_profile_data(tmp_path, tiny_model, network=FULL, training={"num_processes": 2, "fsdp": True})
    for table, values in tables.items():
        data[table] = {**data[table], **values}
    if data["network"]["module"] == "full":
        for key in ("dim", "alpha"):
            data["network"].pop(key, None)
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        profile_from_dict(data, plugins=build_plugins(entry_points=False))


def test_sharding_one_process_is_refused_when_the_run_starts(tmp_path, tiny_model):
    from anima_core.training.distributed import LaunchError

    trainer = make_run(tmp_path, tiny_model, network=FULL, training={"fsdp": True})
    with pytest.raises(LaunchError, match="training.fsdp: shards over the run's processes and this run has one"):
        trainer.run()


def test_accelerates_use_fsdp_imports_as_training_fsdp():
    from anima_core.kohya.importer import import_command_line

    result = import_command_line(
        "accelerate launch --use_fsdp --fsdp_version 2 --num_processes 4 anima_train.py "
        "--pretrained_model_name_or_path a.safetensors --learning_rate 1e-5 --output_dir out")
    assert result.data["training"]["fsdp"] is True and result.data["training"]["num_processes"] == 4
    assert any("--fsdp_version 2" in w for w in result.warnings)
    plain = import_command_line("accelerate launch --num_processes 4 anima_train.py "
                                "--pretrained_model_name_or_path a.safetensors --output_dir out")
    assert "fsdp" not in plain.data["training"]


def test_plan_splits_a_sharded_full_fine_tunes_weights_gradients_and_optimizer_state():
    """Anima 2B, AdamW, 1024² batch 1 with checkpointing: over 4 processes each holds a quarter of the weights,
    gradients and moments, plus the blocks FSDP gathers whole; the activations stay one process's own."""
    from anima_core.config.schema import Profile
    from anima_core.models.dit import DiTConfig
    from anima_core.training.planner import plan

    def training_phase(**training):
        data = {"network": {"module": "full"}, "dataset": {"resolution": 1024, "train_batch_size": 1},
                "caching": {"cache_latents": True, "cache_text_encoder_outputs": True},
                "memory": {"gradient_checkpointing": True}, "optimizer": {"optimizer_type": "AdamW"},
                "training": {"mixed_precision": "bf16", **training}}
        result = plan(Profile.model_validate(data), DiTConfig(), vram_gib=80)
        return next(p for p in result.phases if p.name == "training"), result

    whole, _ = training_phase(num_processes=4)
    sharded, sharded_plan = training_phase(num_processes=4, fsdp=True)
    gathered = "FSDP: 2 blocks gathered, 1 block's gradients"
    for name in ("optimizer state", "float32 trained weights (beyond the DiT's dtype)", "gradients"):
        assert sharded.parts[name] == pytest.approx(whole.parts[name] / 4, rel=1e-6)
    weights = next(k for k in whole.parts if k.startswith("DiT weights"))
    assert sharded.parts["DiT weights (a 1/4 shard)"] == pytest.approx(whole.parts[weights] / 4, rel=1e-6)
    assert sharded.parts["activations"] == whole.parts["activations"]
    assert 0 < sharded.parts[gathered] < 0.1 * whole.parts["optimizer state"]
    assert sharded.peak < 0.4 * whole.peak
    assert any("split 4 ways" in note for note in sharded_plan.notes)
    assert "step path: eager (training.fsdp: blocks are not compiled under FSDP)" in sharded_plan.notes


def test_sharded_blocks_run_eagerly_on_cuda_where_they_would_compile_by_default(tmp_path, tiny_model, monkeypatch):
    from anima_core.training import executors
    from anima_core.training.executors import CompiledStep, choose_step

    monkeypatch.setattr(executors, "compiler_missing", lambda device: None)  # as on a GPU machine with Triton
    write_images(tmp_path / "data")

    def step_for(fsdp):
        data = tiny_profile_data(tmp_path, tiny_model, network=FULL, training={"num_processes": 2, "fsdp": fsdp})
        return choose_step(profile_from_dict(data), torch.device("cuda"), [], warn=print)

    assert isinstance(step_for(False), CompiledStep)
    sharded = step_for(True)
    assert sharded.name == "eager" and "training.fsdp" in sharded.why


def test_an_empty_slices_dummy_step_adds_exactly_zero_in_bf16_weights_under_autocast(tiny_model):
    """What a process without samples runs in a sharded step: under bf16 mixed precision FSDP gathers bf16
    weights, and the dummy forward runs under the step's autocast; every gradient it leaves is exactly 0."""
    from anima_core.models import load_dit
    from anima_core.training.sharding import empty_forward_backward

    dit = load_dit(tiny_model.dit, dtype=torch.bfloat16)
    empty_forward_backward(dit, torch.device("cpu"), lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    grads = [p.grad for p in dit.parameters()]
    assert all(g is not None for g in grads) and all(not g.any() for g in grads)


def test_a_state_resumes_with_sharding_switched_on_or_off(tmp_path, tiny_model):
    """States hold whole tensors, so training.fsdp may change between a save and its resume (the process count
    may not, as for every state)."""
    from anima_core.config.load import profile_to_dict
    from anima_core.training.state import changed_keys

    write_images(tmp_path / "data")

    def profile(**training):
        data = tiny_profile_data(tmp_path, tiny_model, network=FULL, training={"num_processes": 2, **training})
        return profile_to_dict(profile_from_dict(data))

    assert changed_keys(profile(fsdp=True), profile(fsdp=False), allow_lr_change=False) == []
    assert changed_keys(profile(fsdp=True), profile(fsdp=True, seed=8), allow_lr_change=False) == ["training.seed: 7 → 8"]
