"""What one optimizer step reports: every process's loss, samples and memory merged into one view, the
stop/save requests all processes act on together, and the `step` event the display and the TUI read."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from anima_core.training.devices import memory_stats
from anima_core.training.state import Progress


@dataclass
class StepReport:
    """One optimizer step as all processes saw it (merged from every process's report)."""

    loss: float  # mean loss of the step's global batches
    samples: list[tuple[str, float]]  # (image, σ) of every sample, named when the step goes bad
    memory: list[dict]  # memory_stats of every process, in rank order
    prior_loss: float | None = None  # mean loss of the step's prior-preservation samples (training/prior.py)


def merge_step_report(processes, device, micro_losses: list[torch.Tensor], samples: list[tuple[str, float]],
                      data, prior=None) -> StepReport:
    """Every process's view of the step just computed, merged (before the optimizer step, which needs the loss
    of the whole global batch). ``data``: the DataPhase whose warnings travel with the report; ``prior``: the
    run's ``prior.PriorPreservation`` (its sums and counts are added over the processes, so the prior loss is
    the mean over the step's prior samples whatever the number of processes)."""
    mine = {"loss": float(torch.stack(micro_losses).sum()), "samples": samples,
            "memory": {"device": str(device), **memory_stats(device)}, "warnings": data.take_pending(),
            "prior": prior.take() if prior is not None else (0.0, 0)}
    reports = processes.exchange(mine)
    if processes.is_main:
        for report in reports[1:]:
            for message in report["warnings"]:
                data.warning(message)
    prior_count = sum(r["prior"][1] for r in reports)
    return StepReport(
        loss=sum(r["loss"] for r in reports) / len(micro_losses),
        samples=[sample for r in reports for sample in r["samples"]],
        memory=[r["memory"] for r in reports],
        prior_loss=sum(r["prior"][0] for r in reports) / prior_count if prior_count else None,
    )


def merged_requests(processes, stop_requests) -> tuple[str | None, bool]:
    """(why to stop, save now) after a step, merged over the processes so all act at this step: the main
    process reads the control files, every process may have caught a signal."""
    stop_now, save_now = stop_requests.poll()
    requests = processes.exchange((stop_requests.stop_reason if stop_now else None, save_now))
    return next((stop for stop, _ in requests if stop), None), any(save for _, save in requests)


class StepLog:
    """The `step` events of one stretch of training (from its first step on: rates and ETA)."""

    def __init__(self, events, display, *, total_steps: int, first_step: int, executor):
        self.events, self.display = events, display
        self.total_steps, self.first_step, self.executor = total_steps, first_step, executor
        self.started = time.monotonic()
        self.losses: list[float] = []

    def emit(self, progress: Progress, epoch: int, report: StepReport, *, lrs: list[float], lr_groups: list[str],
             weight_norms: dict | None, grad_norm: float | None) -> None:
        """``epoch``: the 1-based epoch of the batch just trained; ``lrs``: the rates that step used;
        ``grad_norm`` None when no step sees the whole gradient. The memory fields are the main process's;
        ``processes`` lists every process's."""
        self.losses.append(report.loss)
        done = progress.step - self.first_step
        s_per_it = (time.monotonic() - self.started) / done if done else 0.0
        window = self.losses[-50:]
        event = self.events.emit(
            "step", step=progress.step, epoch=epoch, total_steps=self.total_steps, loss=report.loss,
            loss_avg=sum(window) / len(window), lr=lrs, **({"weight_norms": weight_norms} if weight_norms else {}),
            **({"prior_loss": report.prior_loss} if report.prior_loss is not None else {}),
            lr_groups=lr_groups, grad_norm=grad_norm, step_path=self.executor.name,
            s_per_it=s_per_it, it_per_s=1 / s_per_it if s_per_it else 0.0,
            eta_s=s_per_it * (self.total_steps - progress.step),
            **{k: v for k, v in report.memory[0].items() if k != "device"}, processes=report.memory)
        self.display.step(event)
