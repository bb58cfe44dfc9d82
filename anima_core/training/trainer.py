"""The run as its sequence: open the run, check the data, cache, load the DiT, build the training target,
plan the steps, restore, loop, save. Each phase's mechanics live in a module named for it; this file says
in which order they happen and what passes between them.

Order matters for memory: images are checked before any model loads; the VAE and the text encoder run
(and leave the GPU) before the DiT is loaded when their outputs are cached.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from anima_core import __version__
from anima_core.config.schema import Profile
from anima_core.errors import AnimaError
from anima_core.models.dit_loading import describe_dit
from anima_core.plugins import Plugins
from anima_core.sampling.during_training import TrainingPreviews
from anima_core.training.bad_steps import NanGuard
from anima_core.training.caching_phase import run_caching
from anima_core.training.control import StopDuringSetup, StopRequests
from anima_core.training.data_phase import DataPhase, planned_batches
from anima_core.training.devices import DTYPES, PRECISION_DTYPES, resolve_device
from anima_core.training.distributed import ProcessFailure, Processes, join_processes
from anima_core.training.ema import build_ema
from anima_core.training.executors import choose_step
from anima_core.training.flops import speed_report, step_tflop
from anima_core.training.memory import apply_memory_strategies, chosen_strategies
from anima_core.training.metadata import training_metadata
from anima_core.training.optim import eval_weights
from anima_core.training.optimizer_step import after_update, build_optimizer, optimizer_step, prepared, updates_in_backward
from anima_core.training.outputs import RunOutputs
from anima_core.training.planner import device_plan, format_measured, format_plan
from anima_core.training.precision import choose_precision
from anima_core.training.prior import PriorPreservation
from anima_core.training.restore import restore_state
from anima_core.training.run_files import open_run
from anima_core.training.schedules import build_scheduler, rates_used
from anima_core.training.slider import slider_micro_step
from anima_core.training.state import Progress, check_processes, check_profile, epoch_number, find_state
from anima_core.training.step import batch_inputs, drop_captions, flow_loss, sample_generators, seed_everything, step_seed
from anima_core.training.step_report import StepLog, merge_step_report, merged_requests
from anima_core.training.targets import target_class
from anima_core.training.validation import build_validation


@dataclass
class RunResult:
    status: str  # finished | stopped | failed | cached
    run_dir: Path
    lora_path: Path | None
    step: int


class Trainer:
    def __init__(self, profile: Profile, plugins: Plugins, *, resume: str | None = None,
                 allow_lr_change: bool = False, cache_only: bool = False, console=None, notes: list[str] = ()):
        """``notes``: warnings found before the run (preflight's), reported as the run's first warnings."""
        self.profile = profile
        self.plugins = plugins
        self.resume = resume
        self.allow_lr_change = allow_lr_change
        self.cache_only = cache_only
        self.console = console
        self.notes = list(notes)
        self.device = resolve_device(profile.training.device)
        self.precision, self.precision_note = choose_precision(profile.training, self.device)
        tdtype = profile.model.transformer_dtype
        self.dit_dtype = DTYPES[tdtype] if tdtype else PRECISION_DTYPES[self.precision]
        self.text_encoder_dtype = self.dit_dtype if self.device.type == "cuda" else torch.float32
        self.models = plugins.registry("register_model_loaders").get(profile.model.loader)
        self.target_kind = target_class(profile)

    # ---- setup -------------------------------------------------------------------------------------

    def _join_processes(self) -> Processes:
        processes = join_processes(self.profile, self.device)
        self.device = processes.device  # under a launcher, this process's GPU
        return processes

    def warn(self, message: str, **detail) -> None:
        self.events.emit("warning", message=message, **({"detail": detail} if detail else {}))
        self.display.warning(message)

    def log(self, message: str) -> None:
        self.events.emit("log", message=message)
        self.display.message(message)

    def _cache(self) -> None:
        """Every process needs every cache, and each encodes only its share (caching_phase.py)."""
        self.vae, self.text_encoder = run_caching(self)

    def _load_dit(self) -> None:
        """The DiT is read on the CPU; memory strategies then decide what goes to the device (all of it
        unless one of them, like block swap, places weights itself), and the step executor how it runs."""
        self.dit = self.models.load_dit(self.profile.model, dtype=self.dit_dtype, device="cpu")
        self.log(f"DiT: {describe_dit(self.dit.config)}")
        self.dit.requires_grad_(False)
        self.target_kind.prepare_dit(self.profile, self.dit)  # full fine-tuning: what trains, in its dtype
        self.dit.train()
        self.strategies = apply_memory_strategies(chosen_strategies(self.profile, self.plugins), self.dit,
                                                  device=self.device)
        for strategy in self.strategies:
            self.log(f"memory strategy: {strategy.name}")
        self.checkpointing = any(s.recomputes_forward for s in self.strategies)  # selective recomputes no matmul
        self.executor = choose_step(self.profile, self.device, self.strategies, warn=self.warn)
        self.executor.prepare(self.dit, log=self.log)
        self.memory_plan = device_plan(self.profile, self.dit.config, self.device)
        if self.memory_plan is not None:
            self.log(format_plan(self.memory_plan))

    def _build_target(self) -> None:
        """What is trained (targets.py), its optimizer and EMA."""
        self.target = self.target_kind(self.profile, self.plugins, dit=self.dit, text_encoder=self.text_encoder,
                                       data=self.data, device=self.device, log=self.log, processes=self.processes)
        self.network = self.target.module
        self.prior = PriorPreservation(self)  # samples trained toward the base model's prediction (prior.py)
        groups = self.target.param_groups(self.profile.optimizer)
        self.log(self.target.describe_groups())
        self.optimizer = build_optimizer(self.profile, self.plugins, groups, self.warn)
        self.ema = build_ema(self.profile.optimizer, self.network, self.device)

    def _plan_steps(self) -> None:
        t = self.profile.training
        self.steps_per_epoch = math.ceil(self.data.num_batches_per_epoch / t.gradient_accumulation_steps)
        self.total_steps = t.max_train_epochs * self.steps_per_epoch if t.max_train_epochs else t.max_train_steps
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def lora_path(self, *, step: int | None = None, epoch: int | None = None) -> Path:
        return self.outputs.path(step=step, epoch=epoch)

    def ema_weights(self, use: str):
        """The EMA weights in the network for ``use`` ("previews", "validation") when the profile asks for them."""
        if self.ema is not None and getattr(self.profile.optimizer, f"ema_for_{use}"):
            return self.ema.applied()
        return contextlib.nullcontext()

    # ---- the loop ----------------------------------------------------------------------------------

    def _inputs(self, batch):
        return batch_inputs(batch, device=self.device, vae=self.vae, text_encoder=self.text_encoder,
                            text_needs_grad=self.target.trains_text_encoder, model_cfg=self.profile.model)

    def _micro_step(self, batch, step: int, micro: int, first_place: int, planned: int):
        """This process's part of one global batch of ``planned`` samples: forward and backward of its
        slice, the loss scaled by the slice's share of the batch (the processes' gradients are summed).
        ``first_place``: the samples planned in the step's earlier micro-batches (a sample's draws are seeded
        by its place among the step's samples). Returns (the scaled loss, [(image, σ)])."""
        t = self.profile.training
        torch.manual_seed(step_seed(t.seed, step, micro))  # LoRA dropouts draw from the global RNG
        if batch is None:  # an empty slice: nothing to train, the gradients it adds are zero
            self.target.empty_slice(self.device, self.accelerator.autocast)
            return torch.zeros((), device=self.device), []
        if getattr(batch, "is_slider", False):  # prompt pairs against the base model (training/slider.py)
            def slider_step():  # reseeded, so a compile failure's eager rerun draws the same
                torch.manual_seed(step_seed(t.seed, step, micro))
                return slider_micro_step(self, batch, step, micro, first_place, planned)

            return self.executor.run(slider_step, self.params)

        def forward_backward():  # seeded from the top, so a compile failure's eager rerun draws the same
            torch.manual_seed(step_seed(t.seed, step, micro))
            generators = sample_generators(t.seed, step, [first_place + p for p in batch.positions])
            # The target at the batch's dataset network_multiplier for the batch's forward and backward
            # (gradient checkpointing recomputes in backward), back at 1.0 after it.
            with self.target.batch_multiplier(batch.network_multiplier):
                inputs = drop_captions(self._inputs(batch), t.caption_dropout_rate, generators)
                # prior-preservation samples: their targets from a forward with the adapters off (prior.py)
                prior = self.prior.for_batch(batch, inputs)
                with self.accelerator.autocast():
                    loss, sigmas = flow_loss(self.dit, inputs, sampler=self.sampler, weighting=self.weighting, cfg=t,
                                             generators=generators, prior=prior)
                share = inputs.latents.shape[0] / planned
                self.accelerator.backward(loss * (share / t.gradient_accumulation_steps))
            return inputs, loss.detach() * share, sigmas, prior

        inputs, loss, sigmas, prior = self.executor.run(forward_backward, self.params)
        self.prior.add(prior)
        batch_size, _, h, w = inputs.latents.shape
        self.tflop_done += step_tflop(self.dit.config, latent_hw=(h, w), text_tokens=inputs.t5_ids.shape[1],
                                      batch=batch_size, checkpointing=self.checkpointing)
        return loss, list(zip(map(str, batch.paths), sigmas.tolist()))

    def _loop(self, progress: Progress) -> str:
        accum = self.profile.training.gradient_accumulation_steps
        fp16 = self.precision == "fp16"  # its gradient scaler skips non-finite updates and lowers the scale
        self.stop_reason = None
        steps = StepLog(self.events, self.display, total_steps=self.total_steps, first_step=progress.step,
                        executor=self.executor)
        micro_losses, samples, placed = [], [], 0  # placed: samples planned in the step's micro-batches so far
        self.progress = progress  # a failure's run_end names its step
        batches = planned_batches(self.data, progress, distributed=self.processes.distributed)
        with self.display:
            while (item := next(batches, None)) is not None:
                epoch, index, batch, planned = item
                if progress.step >= self.total_steps:
                    break
                loss, drawn = self._micro_step(batch, progress.step, len(micro_losses), placed, planned)
                placed += planned
                micro_losses.append(loss)
                samples += drawn
                progress.epoch, progress.batch_in_epoch = epoch, index + 1
                epoch_done = index + 1 == self.data.num_batches_per_epoch
                if len(micro_losses) < accum and not epoch_done:
                    continue
                report = merge_step_report(self.processes, self.device, micro_losses, samples, self.data_phase, self.prior)
                micro_losses, samples, placed = [], [], 0
                finite_loss = math.isfinite(report.loss)
                norm = optimizer_step(self.optimizer, self.params, optimizer_cfg=self.profile.optimizer,
                                      sum_gradients=self.target.sum_gradients, accelerator=self.accelerator,
                                      precision=self.precision) if finite_loss or fp16 else math.nan
                if not (finite_loss and (math.isfinite(norm) or fp16)):
                    self.optimizer.zero_grad(set_to_none=True)
                    outcome = self.nan_guard.handle(progress, report.samples, report.loss, norm)
                    if outcome == "stop":
                        self.stop_reason = self.nan_guard.stop_reason
                        break
                    if outcome == "reloaded":  # repeat the data from the reloaded state's position
                        progress = self.progress
                        batches = planned_batches(self.data, progress, distributed=self.processes.distributed)
                    continue
                progress.bad_steps = 0
                lrs = rates_used(self.optimizer)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                weight_norms = after_update(self.profile.optimizer, self.network, self.ema, progress.step)
                if epoch_done:
                    progress.epoch, progress.batch_in_epoch = epoch + 1, 0
                steps.emit(progress, epoch + 1, report, lrs=lrs, weight_norms=weight_norms,
                           lr_groups=[g.get("name", f"group{i}") for i, g in enumerate(self.optimizer.param_groups)],
                           grad_norm=None if updates_in_backward(self.profile.optimizer) else norm)
                stop_now, save_now = merged_requests(self.processes, self.stop_requests)
                with eval_weights(self.optimizer):
                    self.outputs.scheduled(progress, final=progress.step >= self.total_steps, epoch_done=epoch_done,
                                           epoch=epoch, save_now=save_now)
                    if self.previews is not None:
                        self.previews.after_step(progress.step, epoch + 1 if epoch_done else None)
                    if self.validation is not None:
                        self.validation.after_step(progress.step, epoch + 1, epoch + 1 if epoch_done else None)
                if stop_now:
                    self.stop_reason = stop_now
                    break
        self.progress = progress
        self.train_seconds = max(1e-9, time.monotonic() - steps.started)
        self.throughput = (progress.step - steps.first_step) / self.train_seconds
        return "stopped" if self.stop_reason else "finished"

    def _prepare_training(self) -> Progress:
        t = self.profile.training
        registry = self.plugins.registry
        self.sampler = registry("register_timestep_samplers").get(t.timestep_sampling)
        self.weighting = registry("register_loss_weightings").get(t.loss_weighting or t.weighting_scheme)
        # accelerate keeps one process-wide state; a second run in the same process (the TUI, the tests, a
        # Python caller) may ask for another precision or device, so start from a clean state each run.
        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=self.device.type == "cpu")
        self.optimizer = prepared(self.accelerator, self.optimizer, self.profile.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.profile.optimizer, self.total_steps)
        self.base_lrs = list(self.scheduler.base_lrs)
        self.params = self.target.trainable_parameters()
        self.nan_guard = NanGuard(t, warn=self.warn, last_state=lambda: self.outputs.last_state, restore=functools.partial(restore_state, self))
        progress = Progress(step=0, epoch=0, batch_in_epoch=0, num_processes=self.processes.num_processes)
        if self.resume:
            state = self.outputs.last_state = self.resume_state
            progress = restore_state(self, state)
            self.log(f"resumed from {state} at step {progress.step}, epoch {progress.epoch + 1}")
            self.outputs.keep_earlier_final(progress, self.total_steps)
        return progress

    def _build_previews(self):
        """On the main process; on every one when the weights are sharded (each forward gathers from all)."""
        if self.profile.sampling.sample_prompts is None or not (self.processes.is_main or self.target.collective):
            return None
        return TrainingPreviews(self)

    # ---- entry point -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        self.processes = self._join_processes()
        seed_everything(self.profile.training.seed)
        self.outputs = RunOutputs(self)
        self.resume_state = None
        self.tflop_done, self.speed = 0.0, {}
        try:
            self.run_dir, self.events, self.display, warnings = open_run(self.profile, self.plugins, self.processes,
                                                                         self.console)
            self.startup_warnings = [*self.notes, *warnings]
        except BaseException as exc:
            self.processes.report_failure(describe_error(exc))
            self.processes.close()
            raise
        # Installed until the final saves are written: a second signal during them exits at once.
        self.stop_requests = StopRequests(self.run_dir / "control" if self.processes.is_main else None)
        self.stop_requests.on_disk = self.outputs.on_disk
        self.stop_requests.install()
        try:
            self.run_dir = self.processes.from_main(self.run_dir)
            return self._run()
        except BaseException as exc:
            return self._end_early(exc)
        finally:
            self.stop_requests.uninstall()
            self.events.close()
            self.processes.close()

    def _run(self) -> RunResult:
        self.data_phase = DataPhase(self)
        self.data = self.data_phase.build()
        self._plan_steps()
        self.display.total = self.total_steps
        self.events.emit(
            "run_start", run_id=self.run_dir.name, pid=os.getpid(), device=str(self.device),
            num_processes=self.processes.num_processes, process_group=self.processes.backend,
            total_steps=self.total_steps, total_epochs=self.num_epochs, profile=str(self.run_dir / "profile.toml"),
            versions={"anima_train": __version__, "torch": torch.__version__, "python": platform.python_version()})
        self.data_phase.report()
        if self.precision_note:
            self.warn(self.precision_note)
        if self.resume and self.processes.is_main:  # refuse a changed profile before minutes of caching and loading
            self.resume_state = find_state(self.resume, self.profile.saving.output_dir)
            check_profile(self.resume_state, self.profile, allow_lr_change=self.allow_lr_change)
            check_processes(self.resume_state, self.processes.num_processes)
        self._cache()
        if self.cache_only:
            self.events.emit("run_end", status="cached", reason="--cache-only", step=0, epoch=0)
            self.processes.farewell()
            return RunResult("cached", self.run_dir, None, 0)
        self._load_dit()
        self._build_target()
        t = self.profile.training
        data_metadata = {**self.data.metadata(), "ss_total_batch_size": self.profile.dataset.train_batch_size
                         * self.processes.num_processes * t.gradient_accumulation_steps}
        self.base_metadata = training_metadata(
            self.profile, data_metadata=data_metadata, total_steps=self.total_steps,
            num_epochs=self.num_epochs, started_at=time.time(), dit_config=self.dit.config)
        progress = self._prepare_training()
        self.previews = self._build_previews()
        # the main process evaluates the whole held-out split (with sharded weights, every process takes part);
        # the others wait for it at the next step
        self.validation = build_validation(self) if self.processes.is_main or self.target.collective else None
        if self.previews is not None and self.profile.sampling.sample_at_first and progress.step == 0:
            with eval_weights(self.optimizer):
                self.previews.render(step=0, epoch=0)
        self.stop_requests.training = True
        status = self._loop(progress)
        progress = self.progress
        final = status == "finished"
        path = self.outputs.path() if final else self.outputs.path(step=progress.step)
        with eval_weights(self.optimizer):
            self.outputs.save(path, progress)
            if self.profile.saving.save_state:
                self.outputs.save_state(progress)
            if self.previews is not None and final:
                self.previews.render(step=progress.step, epoch=epoch_number(progress))
        self.log(f"{status} at step {progress.step}: {self.throughput:.3f} steps/s")
        if self.tflop_done:
            self.speed, line = speed_report(self.tflop_done, self.train_seconds, self.device, self.dit_dtype)
            self.log(line)
        if self.memory_plan is not None:
            self.log(format_measured(self.memory_plan, torch.cuda.max_memory_allocated(self.device)))
        self.processes.exchange()  # a failure of the main process's final saves reaches every process
        self.events.emit("run_end", status=status, reason=self.stop_reason or "done", step=progress.step,
                         epoch=epoch_number(progress), lora=str(path), **self.speed)
        self.processes.farewell()
        return RunResult(status, self.run_dir, path, progress.step)

    def _end_early(self, exc: BaseException) -> RunResult:
        """A stop during setup, or a failure of this or another process: every process learns of it (no
        one waits on a collective), the main process records the end, then the error goes on up."""
        stopped = isinstance(exc, StopDuringSetup) or getattr(exc, "stopped", False)
        if not isinstance(exc, ProcessFailure):
            self.processes.report_failure(describe_error(exc), stopped=isinstance(exc, StopDuringSetup))
        if stopped:
            self.events.emit("run_end", status="stopped", reason=f"{exc} before training started", step=0, epoch=0)
            self.processes.farewell()
            return RunResult("stopped", self.run_dir, None, 0)
        step = getattr(getattr(self, "progress", None), "step", 0)
        self.events.emit("run_end", status="failed", reason=describe_error(exc), step=step, epoch=0)
        self.processes.farewell()
        raise exc


def describe_error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, AnimaError) else "".join(traceback.format_exception_only(exc)).strip()
