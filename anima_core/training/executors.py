"""The step executor: how a micro-step's forward and backward run. Eager (every op launched from Python),
compiled (each DiT block through torch.compile/Inductor, one graph shared by the blocks), or compiled and
captured as CUDA graphs (Inductor's ``reduce-overhead`` mode: one recorded graph per block input shape, so a
bucket's steps replay instead of launching each kernel).

The choice is made once, before training, from the profile and the device, and said in the log, in `plan`
and in every step event (``step_path``). A compile that fails falls back to eager with one warning naming
the cause; the run goes on (a failed compile must never cost a run).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

INDUCTOR_CACHE = Path.home() / ".cache" / "anima-train" / "inductor"


def is_compile_failure(exc: BaseException) -> bool:
    """True for errors of torch.compile's machinery (Dynamo, AOTAutograd, Inductor, Triton), anywhere in the
    chain of causes; an error of the model itself, raised again by the eager rerun, is not one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module = type(exc).__module__ or ""
        if module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot run on this device here, or None."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on a GPU needs triton (`pip install triton`)"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (none found)"
    return None


def capture_refusals(strategies) -> list[str]:
    """The memory strategies that cannot run inside a captured CUDA graph, each with its reason."""
    return [f"{s.name}: {s.graph_capture}" for s in strategies if getattr(s, "graph_capture", None)]


class EagerStep:
    """Every op launched from Python: the reference path, and the CPU's default."""

    name = "eager"

    def __init__(self, why: str):
        self.why = why  # what chose this path, for the log and `plan`

    def describe(self) -> str:
        return f"executor: {self.name} ({self.why})"

    def prepare(self, dit, *, log: Callable[[str], None]) -> None:
        log(self.describe())

    def run(self, micro_step: Callable[[], object], params) -> object:
        return micro_step()


class CompiledStep(EagerStep):
    """Each DiT block compiled in place (regional compilation: state-dict keys and block runners unchanged).
    Inductor's on-disk caches live in ~/.cache/anima-train/inductor unless TORCHINDUCTOR_CACHE_DIR says
    otherwise, so a second run of the same shapes reuses the first one's kernels."""

    name = "compiled"
    options: dict = {}

    def __init__(self, why: str, *, warn: Callable[[str], None]):
        super().__init__(why)
        self.warn = warn
        self.dit = None
        self.compile_seconds: float | None = None

    def prepare(self, dit, *, log: Callable[[str], None]) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))
        self.dit, self.log = dit, log
        dit.compile_blocks(**self.options)
        log(self.describe() + "; blocks compile on the first step of each shape")

    def run(self, micro_step, params):
        if self.dit is None:  # fell back
            return micro_step()
        first = self.compile_seconds is None
        before = [None if p.grad is None else p.grad.clone() for p in params] if any(p.grad is not None for p in params) else None
        started = time.monotonic()
        try:
            result = micro_step()
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            self._fall_back(exc, params, before)
            return micro_step()
        if first:
            self.compile_seconds = time.monotonic() - started
            self.log(f"first {self.name} step took {self.compile_seconds:.1f} s, compiling included "
                     "(Inductor's caches make the next run's first step shorter)")
        return result

    def _fall_back(self, exc: Exception, params, before) -> None:
        root = exc
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
            root = inner
        text = (str(root).strip().splitlines() or [""])[0]
        cause = type(exc).__name__ + ("" if root is exc else f": {type(root).__name__}") + (f": {text[:300]}" if text else "")
        self.warn(f"torch.compile failed ({cause}); the run goes on eager, "
                  "slower but the same training. Set model.compile_blocks = false to skip the attempt")
        self.dit.eager_blocks()
        self.dit = None
        self.name = "eager"
        self.why = "compile failed"
        for param, grad in zip(params, before or [None] * len(params)):  # what the failed micro-step added
            param.grad = grad


class GraphCapturedStep(CompiledStep):
    """Compiled blocks replayed as CUDA graphs (Inductor's ``reduce-overhead``): one graph per block input
    shape, so one per bucket resolution, kept in Inductor's graph pool."""

    name = "compiled + CUDA graphs"
    options = {"mode": "reduce-overhead"}


def choose_step(profile, device: torch.device, strategies, *, warn: Callable[[str], None]) -> EagerStep:
    """The executor for this run. ``model.compile_blocks`` unset: compiled on CUDA (where it pays), eager
    elsewhere; ``model.cuda_graphs``: capture too, unless a strategy cannot be captured (said, then compiled)."""
    model = profile.model
    if profile.training.fsdp and model.compile_blocks is None:  # an explicit true is refused (full_rules.py)
        return EagerStep("training.fsdp: blocks run eagerly (compiling them in place would trace FSDP's hooks)")
    wanted = model.compile_blocks if model.compile_blocks is not None else device.type == "cuda"
    how = "model.compile_blocks" if model.compile_blocks is not None else f"compiling by default on {device.type}"
    if not wanted:
        if model.cuda_graphs:  # compile_blocks = false with it is a profile error; this is the CPU default
            warn(f"model.cuda_graphs: not captured: CUDA graphs need compiled blocks on a CUDA device, this run is on {device.type}")
        return EagerStep("model.compile_blocks = false" if model.compile_blocks is False
                         else f"compiled blocks are the default on CUDA only, this run is on {device.type}")
    missing = compiler_missing(device)
    if missing:
        if model.compile_blocks:  # asked for explicitly: validate refuses this before the run
            raise RuntimeError(f"model.compile_blocks: {missing}")
        return EagerStep(f"{missing}; compiling is the default on CUDA")
    if not model.cuda_graphs:
        return CompiledStep("model.compile_blocks = true" if model.compile_blocks else how, warn=warn)
    refusals = ([f"CUDA graphs need a CUDA device, this run is on {device.type}"] if device.type != "cuda" else []) \
        + capture_refusals(strategies)
    if refusals:
        warn("model.cuda_graphs: not captured, compiled only: " + "; ".join(refusals))
        return CompiledStep("CUDA graphs refused, see the warning", warn=warn)
    return GraphCapturedStep("model.cuda_graphs = true", warn=warn)
