"""Data-parallel training over several processes, on accelerate and torch.distributed.

accelerate's ``PartialState`` sets up the process group from the launcher's environment (WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR/PORT): NCCL between GPUs, gloo between CPU processes. Nothing here moves bytes
itself; every collective is torch.distributed's.

How a run stays one run:
- Every process plans the same global batches and trains its fixed slice of each (anima_core.data), with
  per-sample random draws (training/step.py), so the result does not depend on the number of processes.
- After its micro-steps, each process scales its loss by its share of the global batch; the LoRA gradients
  are then summed over processes (``sum_gradients``), which gives exactly the gradient of the global batch's
  mean loss even when a bucket's last batch leaves some processes fewer samples or none. An explicit
  all-reduce after backward, rather than DistributedDataParallel's reducer inside backward, because the
  LoRA modules are not called through one module's forward (DDP's reducer hooks need that), processes
  with an empty slice must still take part, and it keeps memory strategies, block swap and compiled
  blocks out of the picture: they change how backward runs, not the gradients it leaves. The fused
  backward pass updates weights inside backward, before any sum, so it is refused with several processes.
  Full fine-tuning can shard its weights instead of replicating them (``training.fsdp``, training/sharding.py).
- Caching is divided: each process encodes its share of the images and captions; disk caches are then read
  by all, in-memory ones handed around with ``exchange``, one encode batch a round (data/caching.py).
- Once per step every process reports through ``exchange`` (stop/save requests, its loss, VRAM); all act on
  the merged report, so a stop or a save happens at the same step everywhere and is written once, by the
  main process (rank 0), which is the only one writing run files.
- Failure: a process that raises reports its error through its next ``exchange`` instead of its payload;
  every process then raises ``ProcessFailure`` naming the failed process and its error, the main process
  writes run_end ``failed``, and all meet once more (``farewell``) so nobody exits before that is written.
  A process that dies outright breaks the process group: the others' collectives fail (gloo at once,
  NCCL within ``training.ddp_timeout``), and the launcher started by ``anima-train run`` records the
  run's end if the main process could not.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from anima_core.config.checks import process_problems
from anima_core.errors import AnimaError

LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
_BUCKET_ELEMENTS = 1 << 24  # gradients are summed in chunks of at most 64 MiB of float32


def under_launcher() -> bool:
    """True when a launcher (accelerate launch, torchrun, or anima-train run's own) started this process."""
    return all(name in os.environ for name in LAUNCHER_ENV)


class ProcessFailure(AnimaError):
    """A process of the run failed (or, ``stopped``, every failed one was stopped by a signal in setup)."""

    def __init__(self, message: str, *, stopped: bool = False):
        super().__init__(message)
        self.stopped = stopped


class LaunchError(AnimaError):
    """The launcher's processes do not match the profile."""


@dataclass
class Processes:
    """This process's place among the run's processes, and the collectives the trainer needs."""

    num_processes: int
    index: int
    local_index: int
    device: torch.device
    _failed: bool = False

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def backend(self) -> str | None:
        """The process group's backend (nccl, gloo) under a launcher; None for a plain one-process run."""
        return dist.get_backend() if dist.is_available() and dist.is_initialized() else None

    @classmethod
    def single(cls, device: torch.device) -> Processes:
        return cls(1, 0, 0, device)

    @classmethod
    def from_launcher(cls, device_name: str, timeout_minutes: float, num_processes: int) -> Processes:
        """Join the launcher's process group through accelerate; the device is this process's GPU
        (LOCAL_RANK) on a GPU run, the CPU with gloo otherwise."""
        from accelerate import PartialState

        cpu = device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu, timeout=timedelta(minutes=timeout_minutes))
        if num_processes > 1 and num_processes != state.num_processes:
            raise LaunchError(
                f"training.num_processes is {num_processes} but the launcher started {state.num_processes} processes; "
                "set training.num_processes to the launcher's count (or to 1 to let the launcher decide)."
            )
        return cls(state.num_processes, state.process_index, state.local_process_index, torch.device(state.device))

    # ---- collectives -----------------------------------------------------------------------------

    def exchange(self, payload=None) -> list:
        """Every process's payload, in rank order. Raises ProcessFailure on every process if any of them
        reported a failure (``report_failure``) instead of its payload."""
        if not self.distributed:
            return [payload]
        gathered = self._gather((None, payload))
        self._raise_failures(gathered)
        return [p for _, p in gathered]

    def from_main(self, payload=None):
        """The main process's payload, on every process (others pass None)."""
        return self.exchange(payload if self.is_main else None)[0]

    def report_failure(self, message: str, *, stopped: bool = False) -> None:
        """After a local error: meet the others at their next exchange with the error, so every process
        raises ProcessFailure at the same point instead of waiting on this one."""
        if not self.distributed or self._failed:
            return
        self._failed = True
        try:
            self._gather(({"message": message, "stopped": stopped}, None))
        except Exception:  # noqa: BLE001 - the group is already broken; the others see that themselves
            pass

    def farewell(self) -> None:
        """The last meeting of a run: the main process has written run_end when everyone passes it."""
        if self.distributed:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - a process that is gone cannot be waited for
                pass

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every trainable parameter's gradient over the processes (a missing gradient counts as zero)."""
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_kind: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in params:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for group in by_kind.values():
            start = 0
            while start < len(group):
                chunk, size = [], 0
                while start < len(group) and (not chunk or size + group[start].numel() <= _BUCKET_ELEMENTS):
                    chunk.append(group[start])
                    size += group[start].numel()
                    start += 1
                flat = torch.cat([p.grad.reshape(-1) for p in chunk])
                dist.all_reduce(flat)
                offset = 0
                for p in chunk:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                    offset += p.numel()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def _gather(self, item) -> list:
        gathered = [None] * self.num_processes
        dist.all_gather_object(gathered, item)
        return gathered

    def _raise_failures(self, gathered: list) -> None:
        failures = [(rank, error) for rank, (error, _) in enumerate(gathered) if error is not None]
        if failures:
            self._failed = True
            stopped = all(error["stopped"] for _, error in failures)
            raise ProcessFailure("; ".join(f"process {rank} of {self.num_processes} "
                                           f"{'was stopped' if error['stopped'] else 'failed'}: {error['message']}"
                                           for rank, error in failures), stopped=stopped)


def join_processes(profile, device: torch.device) -> Processes:
    """One process on ``device``, or this one's place among a launcher's processes."""
    t = profile.training
    worker_threads(t.num_cpu_threads_per_process)
    if not under_launcher():
        if t.num_processes > 1:  # a Python caller: nobody started the other processes
            raise LaunchError(
                f"training.num_processes is {t.num_processes}, but this process was not started by a launcher; run "
                "`anima-train run PROFILE` (it starts the processes) or start it under accelerate launch / torchrun."
            )
        problems = process_problems(profile, 1)
        if problems:
            raise LaunchError("; ".join(problems))
        return Processes.single(device)
    processes = Processes.from_launcher(t.device, t.ddp_timeout, t.num_processes)
    problems = process_problems(profile, processes.num_processes)  # the launcher's count, handed down
    if problems:
        raise LaunchError("; ".join(problems))
    return processes


# ---- starting the workers --------------------------------------------------------------------------


def check_devices(device_name: str, num_processes: int) -> None:
    """One GPU per process: more processes than visible GPUs would share one (NCCL refuses that)."""
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda and num_processes > torch.cuda.device_count():
        raise LaunchError(
            f"training.num_processes is {num_processes} but {torch.cuda.device_count()} GPU(s) are visible; use at "
            "most one process per GPU (CUDA_VISIBLE_DEVICES chooses them), or training.device = \"cpu\"."
        )


def launch_workers(num_processes: int, argv: list[str], *, run_dir: Path, threads: int | None,
                   command: list[str] | None = None) -> int:
    """Start ``num_processes`` copies of ``anima-train <argv>`` (``command`` replaces ``anima-train``) on this
    machine through torch's elastic launcher (what ``torchrun --standalone`` runs) and wait for them.
    Returns the exit status.

    The workers find the launcher's environment and join one process group; the first of them writes the
    run. If a worker dies without the main process recording the end (a crash, a kill), the run_end
    ``failed`` naming it is written here.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from anima_core.runctl import trainer_command

    command = command or trainer_command()
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=num_processes, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
        # a graceful stop finishes the step and saves before exiting: give it time before SIGKILL
        shutdown_timeout=600,
    )
    try:
        elastic_launch(config, command[0])(*command[1:], *argv)
        return 0
    except SignalException as exc:  # Ctrl+C / SIGTERM: passed on to the workers, which stop and save
        stopped = _run_end(run_dir).get("status") == "stopped"
        print(f"{exc.sigval.name}: {'the run stopped' if stopped else 'the workers were ended'}", file=sys.stderr)
        return 0 if stopped else 128 + exc.sigval.value
    except ChildFailedError as exc:
        causes = "; ".join(f"process {rank} {_exit_text(failure.exitcode)}" for rank, failure in sorted(exc.failures.items()))
        _record_failure(run_dir, causes)
        print(f"error: {causes}", file=sys.stderr)
        return 1


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with {code}"


def _run_end(run_dir: Path) -> dict:
    from anima_core.runctl import read_events

    return next((e for e in reversed(read_events(run_dir / "events.jsonl").events) if e["type"] == "run_end"), {})


def _record_failure(run_dir: Path, causes: str) -> None:
    """Write run_end ``failed`` unless the main process wrote the run's end (or never started the run)."""
    from anima_core.runctl import read_events
    from anima_core.training.events import EventLog

    events = read_events(run_dir / "events.jsonl").events
    if not events or _run_end(run_dir):
        return
    step = max((e["step"] for e in events if isinstance(e.get("step"), int)), default=0)
    log = EventLog(run_dir)
    try:
        log.emit("run_end", status="failed", reason=causes, step=step, epoch=0)
    finally:
        log.close()


def worker_threads(threads: int | None) -> None:
    """``training.num_cpu_threads_per_process``: CPU threads of each process's torch."""
    if threads:
        torch.set_num_threads(threads)

