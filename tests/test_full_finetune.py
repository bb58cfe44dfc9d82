"""Full fine-tuning (network.module = "full"): anima_train.py's parameter groups and rates, the released
single-file save that our strict loader and a LoRA run take as a base, exact resume, the refusals, the import
of an anima_train.py command line, and extract-lora."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_resume import StopAtStep
from training_helpers import make_run, read_events, tiny_profile_data, write_images

from anima_core.config import profile_from_dict
from anima_core.errors import ProfileError
from anima_core.hookspecs import hookimpl
from anima_core.kohya.importer import import_command_line
from anima_core.models import load_dit
from anima_core.models.checkpoint import save_safetensors_atomic
from anima_core.plugins import build_plugins
from anima_core.training.full_weights import component_of
from anima_core.training.state import list_states

FULL = {"module": "full", "dim": None, "alpha": None}


def full_run(root, tiny_model, *, optimizer=None, training=None, **tables):
    return make_run(root, tiny_model, network=FULL, optimizer={"optimizer_type": "SGD", "learning_rate": 1e-2,
                                                               "max_grad_norm": 0.0, **(optimizer or {})},
                    training={"max_train_steps": 1, **(training or {})}, **tables)


def sd_scripts_group(name: str) -> str:
    """anima_train_utils.get_anima_param_groups' rule, as its source reads (first match wins)."""
    if "llm_adapter" in name:
        return "llm_adapter"
    for part, group in ((".self_attn", "self_attn"), (".cross_attn", "cross_attn"), (".mlp", "mlp"),
                        (".adaln_modulation", "mod")):
        if part in name:
            return group
    return "base"


def test_the_parameter_groups_are_anima_train_pys(tiny_model):
    dit = load_dit(tiny_model.dit, dtype=torch.float32)
    names = [name for name, _ in dit.named_parameters()]
    assert [component_of(n) for n in names] == [sd_scripts_group(n) for n in names]
    assert {component_of(n) for n in names} == {"base", "self_attn", "cross_attn", "mlp", "mod", "llm_adapter"}


def weights(path):
    return {k.removeprefix("net."): v for k, v in load_file(path).items()}


def test_component_rates_scale_each_groups_update_and_zero_freezes(tmp_path, tiny_model):
    """One SGD step from the same weights, unclipped (clipping would couple the groups through the total norm):
    the update is rate × gradient, so doubling a group's rate doubles its update and leaves the others' as they
    were; a rate of 0 leaves the group untouched."""
    base = weights(tiny_model.dit)
    save = {"save_precision": "float"}
    plain = weights(full_run(tmp_path / "a", tiny_model, saving=save).run().lora_path)
    trainer = full_run(tmp_path / "b", tiny_model, saving=save, optimizer={"self_attn_lr": 2e-2, "mlp_lr": 0.0})
    scaled = weights(trainer.run().lora_path)
    # frozen: no gradient is even computed (nor counted in the clipped norm), as anima_train.py's requires_grad_(False)
    mlp = [p for name, p in trainer.dit.named_parameters() if component_of(name) == "mlp"]
    assert mlp and not any(p.requires_grad for p in mlp) and not any(p is q for p in mlp for q in trainer.params)
    moved = 0
    for key, before in base.items():
        if not key.endswith((".weight", ".bias")) or key not in plain:
            continue
        group = component_of(key)
        step_plain, step_scaled = plain[key] - before.float(), scaled[key] - before.float()
        if group == "mlp":
            assert torch.equal(step_scaled, torch.zeros_like(step_scaled)), key
        elif group == "self_attn":
            torch.testing.assert_close(step_scaled, 2 * step_plain, rtol=1e-4, atol=3e-7)  # a weight ulp near 1
        else:
            torch.testing.assert_close(step_scaled, step_plain, rtol=1e-5, atol=3e-7)
        moved += bool(step_plain.abs().sum() > 0)
    assert moved > 50  # the steps did train the weights


def test_the_save_is_the_released_format_and_trains_a_lora_as_a_base(tmp_path, tiny_model):
    trainer = full_run(tmp_path, tiny_model, training={"max_train_steps": 2, "mixed_precision": "bf16"})
    result = trainer.run()
    assert result.status == "finished"
    trained = {p.dtype for p in trainer.dit.parameters() if p.requires_grad}
    assert trained == {torch.float32}  # bf16 precision, the trained weights float32 (no full_bf16)
    with safe_open(str(result.lora_path), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in keys}
    with safe_open(str(tiny_model.dit), framework="pt") as f:
        assert sorted(keys) == sorted(f.keys())  # the released file's keys: net. prefix, adapter inside
    assert dtypes == {torch.bfloat16} and metadata["format"] == "pt"  # bf16 unless save_precision says
    load_dit(result.lora_path, dtype=torch.float32)  # strict key and shape matching
    events = read_events(result.run_dir)
    assert [e["kind"] for e in events if e["type"] == "save"] == ["model", "state"]
    assert any(e["type"] == "log" and "the released layout, equal to the trained weights" in e["message"] for e in events)
    lora = make_run(tmp_path / "lora", dataclasses.replace(tiny_model, dit=result.lora_path), training={"max_train_steps": 1}).run()
    assert lora.status == "finished" and any(k.startswith("lora_unet_") for k in load_file(lora.lora_path))


def test_a_stopped_full_fine_tune_resumes_bit_for_bit(tmp_path, tiny_model):
    def go(name, **kw):
        plugins = build_plugins(entry_points=False, extra=(StopAtStep(kw.pop("stop_at")),) if "stop_at" in kw else ())
        return make_run(tmp_path, tiny_model, images=3, plugins=plugins, network=FULL, logging={"run_name": name},
                        optimizer={"optimizer_type": "AdamW", "learning_rate": 1e-3},
                        training={"max_train_steps": 4}, saving={"output_dir": str(tmp_path / name)}, **kw).run()

    reference = go("reference")
    stopped = go("stopped", stop_at=2)
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = go("stopped", resume=str(stopped.run_dir))
    assert resumed.status == "finished" and resumed.step == 4
    a, b = load_file(reference.lora_path), load_file(resumed.lora_path)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("tables, message", [
    ({"network": {**FULL, "dim": 8}}, "network.dim: a LoRA setting"),
    ({"network": {**FULL, "args": {"target_preset": "guide"}}}, "network.args: LoRA network args"),
    ({"optimizer": {"unet_lr": 1e-4}}, "optimizer.unet_lr: a LoRA rate"),
    ({"optimizer": {"scale_weight_norms": 1.0}}, "optimizer.scale_weight_norms"),
    ({"memory": {"fp8_base": True}}, "memory.fp8_base: stores the frozen weights in fp8"),
    ({"memory": {"blocks_to_swap": 2}}, "memory.blocks_to_swap: with full fine-tuning a swapped block's weights are "
                                         "updated while it is on the GPU, during backward"),
    ({"optimizer": {"learning_rate": 0.0}}, "every group's rate is 0"),
])
def test_what_full_fine_tuning_cannot_do_is_refused_by_name(tmp_path, tables, message):
    data = {"network": dict(FULL), **tables}
    data["network"].setdefault("module", "full")
    with pytest.raises(ProfileError, match=message):
        profile_from_dict(data, source="p.toml", base_dir=tmp_path)


def test_an_anima_train_py_command_line_imports_as_full_fine_tuning():
    result = import_command_line(
        "accelerate launch anima_train.py --pretrained_model_name_or_path a.safetensors --learning_rate 1e-5 "
        "--self_attn_lr 2e-5 --mlp_lr 0 --llm_adapter_lr 0 --fused_backward_pass --optimizer_type adafactor "
        "--cache_text_encoder_outputs --output_dir out")
    assert result.data["network"] == {"module": "full", "train_unet_only": True}
    o = result.data["optimizer"]
    assert (o["self_attn_lr"], o["mlp_lr"], o["llm_adapter_lr"], o["fused_backward_pass"]) == (2e-5, 0.0, 0.0, True)
    assert not any("ignores them" in w for w in result.warnings)  # the full script applies the rates
    with pytest.raises(Exception, match="--network_dim: LoRA flags, which anima_train.py does not take"):
        import_command_line("anima_train.py --pretrained_model_name_or_path a.safetensors --network_dim 8")


def test_extract_lora_keeps_a_low_rank_difference_whole_and_names_what_it_cannot_carry(tmp_path, tiny_model, capsys):
    from anima_core.cli import main

    base = {k: v.float() for k, v in load_file(tiny_model.dit).items()}
    tuned = dict(base)
    generator = torch.Generator().manual_seed(0)
    q = "net.blocks.0.self_attn.q_proj.weight"
    delta = torch.randn(q_out := base[q].shape[0], 2, generator=generator) @ torch.randn(2, base[q].shape[1], generator=generator)
    tuned[q] = base[q] + 0.01 * delta
    bias = next(k for k in base if k.endswith(".bias"))
    tuned[bias] = base[bias] + 1.0
    save_safetensors_atomic(tuned, tmp_path / "tuned.safetensors", metadata={"format": "pt"})
    out = tmp_path / "diff.safetensors"
    assert main(["extract-lora", str(tiny_model.dit), str(tmp_path / "tuned.safetensors"), "--dim", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.self_attn.q_proj: rank 2, keeps 100.0% of the difference" in printed
    assert "not in the LoRA" in printed and bias.removeprefix("net.") in printed
    lora = load_file(out)
    name = "lora_unet_blocks_0_self_attn_q_proj"
    assert set(lora) == {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
    rebuilt = lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]
    torch.testing.assert_close(rebuilt, tuned[q] - base[q], rtol=1e-4, atol=1e-6)
    assert q_out == rebuilt.shape[0]


def test_plan_counts_full_fine_tunings_gradients_and_optimizer_states(tmp_path):
    """Anima 2B at 1024² batch 1: AdamW keeps two float32 moments for all 2B weights; Adafactor's factored
    moments are small and the fused backward pass frees each gradient in backward (sd-scripts reports 23-24 GB
    on a 4090 for that setting with checkpointing). The plan never suggests what full fine-tuning refuses."""
    from anima_core.config.schema import Profile
    from anima_core.models.dit import DiTConfig
    from anima_core.training.planner import plan

    def training_peak(**optimizer):
        data = {"network": dict(FULL), "dataset": {"resolution": 1024, "train_batch_size": 1},
                "caching": {"cache_latents": True, "cache_text_encoder_outputs": True},
                "memory": {"gradient_checkpointing": True}, "training": {"mixed_precision": "bf16"},
                "optimizer": optimizer}
        result = plan(Profile.model_validate(data), DiTConfig(), vram_gib=24)
        phase = next(p for p in result.phases if p.name == "training")
        return phase, result

    adamw, _ = training_peak(optimizer_type="AdamW")
    fused, fused_plan = training_peak(optimizer_type="Adafactor", fused_backward_pass=True, max_grad_norm=0.0,
                                      optimizer_args={"relative_step": False})
    frozen_mlp, _ = training_peak(optimizer_type="AdamW", mlp_lr=0.0)
    gib = 2**30
    # float32 trained weights: AdamW's two moments in their dtype, 2 × 4 bytes a parameter
    assert 15 * gib < adamw.parts["optimizer state"] < 16.5 * gib
    assert 3.5 * gib < adamw.parts["float32 trained weights (beyond the DiT's dtype)"] < 4.2 * gib
    assert fused.parts["optimizer state"] == 0 and "gradients (fused backward: one block's)" in fused.parts
    assert fused.peak < 0.5 * adamw.peak and fused.peak < 23 * gib
    assert frozen_mlp.parts["optimizer state"] < adamw.parts["optimizer state"]
    assert fused_plan.fits and fused_plan.cheapest_fits
    assert all(not f.settings.fp8_base for f in fused_plan.cheapest_fits)
    # block swap: only with the fused backward pass (a swapped block is updated during its backward)
    def fits(vram, **optimizer):
        data = {"network": dict(FULL), "dataset": {"resolution": 1024, "train_batch_size": 1},
                "caching": {"cache_latents": True, "cache_text_encoder_outputs": True},
                "training": {"mixed_precision": "bf16"}, "optimizer": optimizer}
        return plan(Profile.model_validate(data), DiTConfig(), vram_gib=vram).cheapest_fits

    small = fits(8, optimizer_type="Adafactor", fused_backward_pass=True, max_grad_norm=0.0,
                 optimizer_args={"relative_step": False})
    assert small and all(f.settings.blocks_to_swap for f in small)
    assert not any(f.settings.blocks_to_swap for f in fits(80, optimizer_type="AdamW")) and not fits(8, optimizer_type="AdamW")


def test_two_processes_train_the_weights_one_process_trains_with_twice_the_batch(tmp_path, tiny_model):
    """Data-parallel full fine-tuning (the weights replicated, gradients summed): 2 gloo processes × batch 1
    give the 1-process × batch 2 weights. SGD, so the comparison sees the gradients (AdamW's division by √v
    turns rounding-sized differences of near-zero gradients into visible ones)."""
    import tomli_w
    from test_distributed import anima_train
    from training_helpers import tiny_profile_data, write_images

    steps, adam = {"max_train_steps": 3}, {"optimizer_type": "SGD", "learning_rate": 1e-2}
    write_images(tmp_path / "data", count=2)
    data = tiny_profile_data(tmp_path, tiny_model, network={"module": "full"}, optimizer=adam,
                             dataset={"train_batch_size": 1}, saving={"save_precision": "float"},
                             training={**steps, "num_processes": 2, "num_cpu_threads_per_process": 1})
    for key in ("dim", "alpha"):
        data["network"].pop(key)
    (tmp_path / "two.toml").write_text(tomli_w.dumps(data))
    anima_train("run", tmp_path / "two.toml")
    reference = make_run(tmp_path / "ref", tiny_model, network=FULL, optimizer=adam, training=steps,
                         saving={"save_precision": "float", "output_dir": str(tmp_path / "ref" / "out")}).run()
    # the updates, not the weights: a wrong sum would hide in the norm of the untouched weights
    base, two, one = (weights(p) for p in (tiny_model.dit, tmp_path / "out" / "lora.safetensors", reference.lora_path))
    delta = {k: (two[k].double() - base[k].double(), one[k].double() - base[k].double()) for k in base}
    difference = sum(float((a - b).pow(2).sum()) for a, b in delta.values()) ** 0.5
    size = sum(float(b.pow(2).sum()) for _, b in delta.values()) ** 0.5
    assert size > 0 and difference <= 1e-5 * size, f"relative difference {difference / size:.3g} of the updates"


# Trains the profile with a loss weighting that kills its own process (SIGKILL, nothing runs after it) at its
# KILL_AT-th call: in the middle of that step, after the earlier steps' states were written.
KILLED_RUN = r"""
import os, signal, sys
from pathlib import Path

from anima_core.config import profile_from_dict
from anima_core.config.load import read_profile_data
from anima_core.hookspecs import hookimpl
from anima_core.plugins import build_plugins
from anima_core.training.trainer import Trainer


class Dies:
    calls = 0

    @hookimpl
    def register_loss_weightings(self, register):
        def weighting(sigmas):
            Dies.calls += 1
            if Dies.calls == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return sigmas * 0 + 1

        register("dies", weighting)


plugins = build_plugins(entry_points=False, extra=(Dies(),))
Trainer(profile_from_dict(read_profile_data(Path(sys.argv[1])), plugins=plugins), plugins).run()
"""


class Uniform:
    @hookimpl
    def register_loss_weightings(self, register):
        register("dies", lambda sigmas: sigmas * 0 + 1)  # the killed run's weighting, without the kill


def test_a_full_fine_tune_killed_with_sigkill_resumes_bit_for_bit(tmp_path, tiny_model):
    import os
    import subprocess
    import sys

    from anima_core.config import profile_to_toml

    tables = dict(network=FULL, optimizer={"optimizer_type": "AdamW", "learning_rate": 1e-3},
                  training={"max_train_steps": 5, "loss_weighting": "dies"},
                  saving={"save_state": True, "save_state_every_n_steps": 1, "keep_last_n_states": 2})
    plugins = build_plugins(entry_points=False, extra=(Uniform(),))
    reference = make_run(tmp_path / "ref", tiny_model, images=3, plugins=plugins, **tables,
                         logging={"run_name": "ref"}).run()
    write_images(tmp_path / "data", count=3)
    profile = profile_from_dict(tiny_profile_data(tmp_path, tiny_model, **tables, logging={"run_name": "killed"}),
                                plugins=plugins)
    (tmp_path / "killed.toml").write_text(profile_to_toml(profile))
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "killed.toml")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "KILL_AT": "4", "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = tmp_path / "out" / "runs" / "killed"
    assert [p.name for p in list_states(run_dir / "state")] == ["step-00000002", "step-00000003"]
    resumed = make_run(tmp_path, tiny_model, plugins=plugins, resume=str(run_dir), **tables,
                       logging={"run_name": "resumed"}).run()
    assert resumed.status == "finished" and resumed.step == 5
    a, b = load_file(reference.lora_path), load_file(resumed.lora_path)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_block_swap_with_the_fused_backward_pass_trains_what_resident_blocks_train(tmp_path, tiny_model):
    """2 of the 4 blocks live on the CPU between uses: each is updated by Adafactor's fused pass during its
    backward and copied back as it leaves, so the weights are those of the run with every block resident (up to
    the order in which the blocks' contributions to the shared inputs' gradients add up), and a stopped swapped
    run resumes bit for bit."""
    adafactor = {"optimizer_type": "Adafactor", "learning_rate": 1e-3, "fused_backward_pass": True,
                 "max_grad_norm": 0.0, "optimizer_args": {"relative_step": False, "scale_parameter": False}}

    def go(name, plugins=None, **kw):
        return make_run(tmp_path / name, tiny_model, images=3, network=FULL, optimizer=adafactor, plugins=plugins,
                        training={"max_train_steps": 3}, saving={"save_precision": "float", "save_state": True,
                                                                 "output_dir": str(tmp_path / name / "out")},
                        logging={"run_name": name}, **kw)

    resident = go("resident").run()
    swapping = go("swapped", memory={"blocks_to_swap": 2})
    swapped = swapping.run()
    assert [s.name for s in swapping.strategies] == ["blocks_to_swap"]
    # no step saw the whole gradient (each weight was updated and its gradient freed in backward)
    assert [e["grad_norm"] for e in read_events(swapped.run_dir) if e["type"] == "step"] == [None] * 3
    assert {m.phase for m in swapping.strategies[0].swapper.log} >= {"forward", "backward"}
    base = weights(tiny_model.dit)
    one, two = weights(resident.lora_path), weights(swapped.lora_path)
    assert not torch.equal(two["blocks.3.mlp.layer1.weight"], base["blocks.3.mlp.layer1.weight"].float())
    delta = [(two[k].double() - base[k].double(), one[k].double() - base[k].double()) for k in base]
    difference = sum(float((a - b).pow(2).sum()) for a, b in delta) ** 0.5
    assert difference <= 1e-5 * sum(float(b.pow(2).sum()) for _, b in delta) ** 0.5

    stopped = go("stopped", plugins=build_plugins(entry_points=False, extra=(StopAtStep(2),)),
                 memory={"blocks_to_swap": 2}).run()
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = go("stopped", memory={"blocks_to_swap": 2}, resume=str(stopped.run_dir)).run()
    a, b = load_file(swapped.lora_path), load_file(resumed.lora_path)
    assert resumed.step == 3 and [k for k in a if not torch.equal(a[k], b[k])] == []
