"""The step executor: which path runs by default on each device, graph capture refused with its reasons, and
a compile failure that falls back to eager with one warning and trains the same LoRA."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from anima_core.config.schema import Profile
from anima_core.models.dit import AnimaDiT
from anima_core.training import executors
from anima_core.training.executors import CompiledStep, EagerStep, GraphCapturedStep, choose_step, is_compile_failure
from training_helpers import make_run, read_events

CUDA = torch.device("cuda")  # a device object only: nothing runs on it here
CPU = torch.device("cpu")


def profile(**model) -> Profile:
    return Profile(model=model)


class Strategy:
    def __init__(self, name, graph_capture=None):
        self.name, self.graph_capture = name, graph_capture


@pytest.fixture
def compiler_present(monkeypatch):
    monkeypatch.setattr(executors, "compiler_missing", lambda device: None)


def test_blocks_are_compiled_by_default_on_cuda_and_eager_on_the_cpu(compiler_present):
    assert type(choose_step(profile(), CUDA, [], warn=print)) is CompiledStep
    cpu = choose_step(profile(), CPU, [], warn=print)
    assert type(cpu) is EagerStep and "CUDA only" in cpu.describe()
    assert type(choose_step(profile(compile_blocks=False), CUDA, [], warn=print)) is EagerStep
    assert type(choose_step(profile(compile_blocks=True), CPU, [], warn=print)) is CompiledStep


def test_the_default_stays_eager_without_a_compiler_and_an_explicit_ask_is_refused(monkeypatch):
    monkeypatch.setattr(executors.importlib.util, "find_spec", lambda name: None)
    chosen = choose_step(profile(), CUDA, [], warn=print)
    assert type(chosen) is EagerStep and "triton" in chosen.describe()
    with pytest.raises(RuntimeError, match="model.compile_blocks: torch.compile on a GPU needs triton"):
        choose_step(profile(compile_blocks=True), CUDA, [], warn=print)


def test_graph_capture_is_refused_with_each_reason_and_the_run_stays_compiled(compiler_present):
    warnings = []
    swap = Strategy("blocks_to_swap", "copies blocks between the CPU and the GPU")
    chosen = choose_step(profile(cuda_graphs=True), CUDA, [swap, Strategy("gradient_checkpointing")], warn=warnings.append)
    assert type(chosen) is CompiledStep
    assert warnings == ["model.cuda_graphs: not captured, compiled only: blocks_to_swap: copies blocks between the CPU and the GPU"]
    warnings.clear()
    assert type(choose_step(profile(cuda_graphs=True, compile_blocks=True), CPU, [], warn=warnings.append)) is CompiledStep
    assert "CUDA graphs need a CUDA device, this run is on cpu" in warnings[0]
    warnings.clear()
    assert type(choose_step(profile(cuda_graphs=True), CPU, [], warn=warnings.append)) is EagerStep  # never silent
    assert warnings == ["model.cuda_graphs: not captured: CUDA graphs need compiled blocks on a CUDA device, this run is on cpu"]
    captured = choose_step(profile(cuda_graphs=True), CUDA, [Strategy("gradient_checkpointing")], warn=warnings.append)
    assert type(captured) is GraphCapturedStep and captured.options == {"mode": "reduce-overhead"}


def test_graphs_without_compiled_blocks_is_a_profile_error(tmp_path):
    from anima_core.config import profile_from_dict
    from anima_core.errors import ProfileError

    with pytest.raises(ProfileError, match="model.cuda_graphs: replays compiled blocks"):
        profile_from_dict({"model": {"cuda_graphs": True, "compile_blocks": False}}, source="p.toml", base_dir=tmp_path)


def test_the_built_in_strategies_that_move_memory_inside_the_step_refuse_capture():
    from anima_plugins.memory.block_swap import BlockSwap
    from anima_plugins.memory.checkpointing import (
        CpuOffloadCheckpointing,
        GradientCheckpointing,
        UnslothOffloadCheckpointing,
    )

    assert all(s.graph_capture for s in (BlockSwap, CpuOffloadCheckpointing, UnslothOffloadCheckpointing))
    assert GradientCheckpointing.graph_capture is None


class DynamoError(Exception):
    pass


DynamoError.__module__ = "torch._dynamo.exc"


def test_compile_failures_are_told_from_the_models_own_errors():
    assert is_compile_failure(DynamoError("backend failed"))
    try:
        try:
            raise DynamoError("inner")
        except DynamoError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as wrapped:
        assert is_compile_failure(wrapped)
    assert not is_compile_failure(RuntimeError("shape mismatch"))


def test_a_failed_micro_step_is_undone_before_the_eager_rerun():
    """The fallback drops what the failed attempt added to the gradients, so accumulation stays exact."""
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.full((3,), 2.0)  # an earlier micro-step's gradient
    warnings, logs = [], []
    step = CompiledStep("test", warn=warnings.append)
    dit = torch.nn.Module()
    dit.eager_blocks = lambda: logs.append("eager")
    step.dit, step.log = dit, logs.append
    attempts = []

    def micro_step():
        param.grad += 1.0
        attempts.append(1)
        if len(attempts) == 1:
            raise DynamoError("inductor exploded")
        return "done"

    assert step.run(micro_step, [param]) == "done"
    assert torch.equal(param.grad, torch.full((3,), 3.0))
    assert step.name == "eager" and logs == ["eager"] and len(warnings) == 1
    assert "DynamoError: inductor exploded" in warnings[0]
    step.run(micro_step, [param])  # after the fallback: eager, no more snapshots or warnings
    assert len(warnings) == 1


def failing_backend(gm, example_inputs):
    raise RuntimeError("the test's backend refuses to compile")


def test_a_compile_failure_falls_back_to_eager_once_and_trains_the_same_lora(tmp_path, tiny_model, monkeypatch):
    original = AnimaDiT.compile_blocks
    monkeypatch.setattr(AnimaDiT, "compile_blocks", lambda self, **options: original(self, backend=failing_backend))
    steps = {"max_train_steps": 2, "gradient_accumulation_steps": 2}
    compiled = make_run(tmp_path / "compiled", tiny_model, training=steps, model={"compile_blocks": True}).run()
    eager = make_run(tmp_path / "eager", tiny_model, training=steps, model={"compile_blocks": False}).run()
    assert compiled.status == eager.status == "finished"
    events = read_events(compiled.run_dir)
    warnings = [e["message"] for e in events if e["type"] == "warning" and "torch.compile failed" in e["message"]]
    assert len(warnings) == 1 and "the test's backend refuses to compile" in warnings[0]
    assert [e["step_path"] for e in events if e["type"] == "step"] == ["eager", "eager"]
    assert any(e["type"] == "log" and e["message"].startswith("executor: compiled") for e in events)
    a, b = load_file(compiled.lora_path), load_file(eager.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_working_compile_reports_its_time_and_its_path(tmp_path, tiny_model, monkeypatch):
    original = AnimaDiT.compile_blocks
    monkeypatch.setattr(AnimaDiT, "compile_blocks", lambda self, **options: original(self, backend="eager"))
    result = make_run(tmp_path, tiny_model, training={"max_train_steps": 1}, model={"compile_blocks": True}).run()
    events = read_events(result.run_dir)
    assert any(e["type"] == "log" and e["message"].startswith("first compiled step took") for e in events)
    assert [e["step_path"] for e in events if e["type"] == "step"] == ["compiled"]
    assert not [e for e in events if e["type"] == "warning" and "torch.compile" in e["message"]]
