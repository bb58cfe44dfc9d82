"""The run: check data, cache, load models, apply memory strategies and the network, loop, save.

Order matters for memory: images are checked before any model loads; the VAE and the text encoder run
(and leave the GPU) before the DiT is loaded when their outputs are cached.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import platform
import random
import time
import traceback
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from rich.console import Console

from anima_core import __version__
from anima_core.atomic import atomic_write_text, clean_leftovers
from anima_core.config.checks import process_problems
from anima_core.config.load import profile_to_toml
from anima_core.config.schema import Profile
from anima_core.data import DataOptions, PhaseProgress, build_training_data
from anima_core.data.caching import ModelSource
from anima_core.data.memory import place_profile_caches
from anima_core.errors import AnimaError
from anima_core.models.dit_loading import describe_dit
from anima_core.plugins import Plugins
from anima_core.sampling.during_training import TrainingPreviews
from anima_core.training.control import StopDuringSetup, StopRequests
from anima_core.training.devices import DTYPES, PRECISION_DTYPES, SAVE_DTYPES, memory_stats, resolve_device
from anima_core.training.distributed import (
    LaunchError,
    ProcessFailure,
    Processes,
    under_launcher,
    worker_threads,
)
from anima_core.training.events import EventLog, make_run_dir
from anima_core.training.flops import matmul_tflops, step_tflop
from anima_core.training.memory import apply_memory_strategies
from anima_core.training.metadata import save_metadata, training_metadata
from anima_core.training.network import applied_at, refuse_unsupported_multipliers
from anima_core.training.ema import build_ema
from anima_core.training.optim import apply_max_norm, create_fused_backward_optimizer, create_optimizer, eval_weights, train_mode
from anima_core.training.planner import format_measured, format_plan, plan
from anima_core.training.precision import choose_precision
from anima_core.training.progress import ProgressDisplay
from anima_core.training.schedules import build_scheduler, rates_used, rebase_rates
from anima_core.training.state import (
    Progress,
    check_processes,
    check_profile,
    find_state,
    load_state,
    restore_rng_state,
    save_state,
    state_path,
)
from anima_core.training.step import StepInputs, drop_captions, flow_loss, sample_generators
from anima_core.training.validation import build_validation


@dataclass
class RunResult:
    status: str  # finished | stopped | failed | cached
    run_dir: Path
    lora_path: Path | None
    step: int


@dataclass
class StepReport:
    """One optimizer step as all processes saw it (merged from every process's report)."""

    loss: float  # mean loss of the step's global batches
    samples: list[tuple[str, float]]  # (image, σ) of every sample, named when the step goes bad
    memory: list[dict]  # memory_stats of every process, in rank order


class QuietEvents:
    """The event log of a process other than the main one: events are built (the display reads them),
    never written."""

    def emit(self, type_: str, **fields) -> dict:
        return {"type": type_, "time": time.time(), **fields}

    def close(self) -> None:
        pass


def data_options(profile: Profile, processes: Processes | None = None) -> DataOptions:
    """The profile's dataset table uses DataOptions' names; the rest comes from other tables. Without
    ``processes`` (reports before a run), the profile's training.num_processes."""
    values = {f.name: getattr(profile.dataset, f.name) for f in fields(DataOptions) if hasattr(profile.dataset, f.name)}
    if isinstance(values.get("resolution"), list):
        values["resolution"] = tuple(values["resolution"])
    return DataOptions(
        **values,
        seed=profile.training.seed,
        max_train_steps=profile.training.max_train_steps,
        qwen3_max_token_length=profile.model.qwen3_max_token_length,
        t5_max_token_length=profile.model.t5_max_token_length,
        num_processes=processes.num_processes if processes else profile.training.num_processes,
        process_index=processes.index if processes else 0,
    )


def epoch_number(progress: Progress) -> int:
    """The 1-based epoch people see: the one in progress, or the one just completed at an epoch boundary."""
    return progress.epoch + (1 if progress.batch_in_epoch else 0)


def step_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the global RNG for a micro-step (LoRA dropouts draw from it), the same on every process."""
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, profile: Profile, plugins: Plugins, *, resume: str | None = None,
                 allow_lr_change: bool = False, cache_only: bool = False, console=None):
        self.profile = profile
        self.plugins = plugins
        self.resume = resume
        self.allow_lr_change = allow_lr_change
        self.cache_only = cache_only
        self.console = console
        self.device = resolve_device(profile.training.device)
        self.precision, self.precision_note = choose_precision(profile.training, self.device)
        tdtype = profile.model.transformer_dtype
        self.dit_dtype = DTYPES[tdtype] if tdtype else PRECISION_DTYPES[self.precision]
        self.text_encoder_dtype = self.dit_dtype if self.device.type == "cuda" else torch.float32
        self.models = plugins.registry("register_model_loaders").get(profile.model.loader)

    # ---- setup -------------------------------------------------------------------------------------

    def _join_processes(self) -> Processes:
        """One process, or this one's place among a launcher's processes (training/distributed.py)."""
        t = self.profile.training
        worker_threads(t.num_cpu_threads_per_process)
        if not under_launcher():
            if t.num_processes > 1:  # a Python caller: nobody started the other processes
                raise LaunchError(
                    f"training.num_processes is {t.num_processes}, but this process was not started by a launcher; run "
                    "`anima-train run PROFILE` (it starts the processes) or start it under accelerate launch / torchrun."
                )
            return Processes.single(self.device)
        processes = Processes.from_launcher(t.device, t.ddp_timeout, t.num_processes)
        problems = process_problems(self.profile, processes.num_processes)
        if problems:
            raise LaunchError("; ".join(problems))
        self.device = processes.device
        return processes

    def _open_run(self) -> None:
        saving = self.profile.saving
        name = self.profile.logging.run_name or time.strftime("%Y%m%d-%H%M%S-") + saving.output_name
        self.startup_warnings = []
        if not self.processes.is_main:  # only the main process writes the run; the others name its folder
            self.run_dir = saving.output_dir / "runs" / name
            self.events = QuietEvents()
            self.display = ProgressDisplay("plain", 1, self.profile.logging.log_every_n_steps, Console(quiet=True))
            return
        self.run_dir = make_run_dir(saving.output_dir, name)
        atomic_write_text(self.run_dir / "profile.toml", profile_to_toml(self.profile))
        made = (e.obj(self.run_dir, self.profile) for e in self.plugins.registry("register_event_sinks").entries.values())
        sinks = [sink for sink in made if sink is not None]  # None: a sink this profile does not select
        self.events = EventLog(self.run_dir, sinks)
        self.display = ProgressDisplay(self.profile.logging.progress, 1, self.profile.logging.log_every_n_steps, self.console)
        # Reported once run_start is written, so every event of the run follows it.
        self.startup_warnings += [f"removed {p}, left by an interrupted write" for p in clean_leftovers(saving.output_dir)]
        # A request left from an earlier run in this folder must not stop or save this one.
        for stale in sorted((self.run_dir / "control").glob("*")):
            stale.unlink(missing_ok=True)
            self.startup_warnings.append(f"ignored the leftover control request {stale.name!r} from an earlier run")

    def warn(self, message: str, **detail) -> None:
        self.events.emit("warning", message=message, **({"detail": detail} if detail else {}))
        self.display.warning(message)

    def log(self, message: str) -> None:
        self.events.emit("log", message=message)
        self.display.message(message)

    def _build_data(self) -> None:
        """Check every image and caption before any model loads."""
        def show(progress: PhaseProgress) -> None:  # on the console now; as events once run_start is written
            self.display.message(progress.describe())
            if progress.finished:
                self.scan_progress.append(progress)

        self.scan_progress: list[PhaseProgress] = []
        self.data_warnings: list[str] = []  # a non-main process's, passed on with its next step report
        self.reported_data_warnings: set[str] = set()
        self.data = build_training_data(data_options(self.profile, self.processes), base_dir=Path.cwd(),
                                        on_warning=self.startup_warnings.append, progress=show)

    def _report_startup(self) -> None:
        for progress in self.scan_progress:
            self.events.emit("cache", **progress.fields())
        for message in self.startup_warnings:
            self.warn(message)
        for line in self.data.bucket_report():
            self.log(line)
        for part in (self.data, self.data.validation):
            if part is not None:
                part.on_warning = self._data_warning

    def _data_warning(self, message: str) -> None:
        """A file that broke after the scan, found while caching or training. Only the main process writes
        the run, so another process passes its warnings on with its next step report (``_step_report``);
        the main process reports each once (several processes may find the same file)."""
        if not self.processes.is_main:
            self.data_warnings.append(message)
        elif message not in self.reported_data_warnings:
            self.reported_data_warnings.add(message)
            self.warn(message)

    def _cache(self) -> None:
        """Every process needs every cache, and each encodes only its share (``_divided``)."""
        caching, model = self.profile.caching, self.profile.model
        vae_dtype = DTYPES[model.vae_dtype]
        te_dtype = self.text_encoder_dtype
        # the main process's estimate decides for all, so all take the same path (and meet the same times)
        placement = self.processes.from_main(
            place_profile_caches(self.data, self.profile, text_dtype=te_dtype, progress=self._cache_progress)
            if self.processes.is_main else None)
        for line in placement.lines:
            self.log(line)
        if placement.switched:
            self.warn(placement.switched)
        if caching.cache_latents or caching.cache_latents_to_disk:
            def load_vae():
                return self.models.load_vae(model, dtype=vae_dtype, device=self.device)

            identity = getattr(self.models, "vae_identity", None)  # without it, load first to learn the identity
            vae = ModelSource(identity(model, dtype=vae_dtype), str(vae_dtype), load_vae) if identity else load_vae()
            self.log("caching latents")
            self._divided(placement.latents_to_disk, lambda share, exchange: self.data.cache_latents(
                vae, to_disk=placement.latents_to_disk, batch_size=caching.vae_batch_size, device=self.device,
                share=share, exchange=exchange, trust_existing=caching.skip_cache_check, progress=self._cache_progress))
            del vae
            self._free()
            self.vae = None
        else:
            self.vae = self.models.load_vae(model, dtype=vae_dtype, device=self.device)
        train_te = not self.profile.network.train_unet_only
        self.text_encoder = self.models.load_text_encoder(model, dtype=te_dtype, device=self.device)
        if caching.cache_text_encoder_outputs or caching.cache_text_encoder_outputs_to_disk:
            self.log("caching text-encoder outputs")
            self._divided(placement.text_to_disk, lambda share, exchange: self.data.cache_text(
                self.text_encoder, to_disk=placement.text_to_disk, batch_size=caching.text_encoder_batch_size,
                share=share, exchange=exchange, trust_existing=caching.skip_cache_check, progress=self._cache_progress))
            if not train_te:
                self.text_encoder.model.to("cpu")
                self._free()

    def _divided(self, to_disk: bool, cache) -> None:
        """``cache(share, exchange)`` with this process's share. On disk, each process writes its share of the
        files, and once all are written each reads the others' (the reuse check finds them fresh). In memory,
        each encodes its share and the processes hand each other every encode batch as it is done."""
        processes = self.processes
        share = (processes.index, processes.num_processes)
        if not processes.distributed:
            cache(share, None)
        elif to_disk:
            cache(share, None)
            processes.exchange()
            cache((0, 1), None)
        else:
            cache(share, processes.exchange)

    def _cache_progress(self, progress: PhaseProgress) -> None:
        """Data phases (scan, cache checks, encoding) as `cache` events and console lines."""
        self.events.emit("cache", **progress.fields())
        self.display.message(progress.describe())

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load_dit(self) -> None:
        """The DiT is read on the CPU; memory strategies then decide what goes to the device (all of it
        unless one of them, like block swap, places weights itself)."""
        self.dit = self.models.load_dit(self.profile.model, dtype=self.dit_dtype, device="cpu")
        self.log(f"DiT: {describe_dit(self.dit.config)}")
        self.dit.requires_grad_(False)
        self.dit.train()
        registry = self.plugins.registry("register_memory_strategies")
        chosen = [entry.obj(self.profile) for entry in registry.entries.values()
                  if entry.obj.enabled(self.profile) or entry.name in self.profile.memory.extra_strategies]
        self.strategies = apply_memory_strategies(chosen, self.dit, device=self.device)
        for strategy in self.strategies:
            self.log(f"memory strategy: {strategy.name}")
        self.checkpointing = any("checkpointing" in s.name for s in self.strategies)
        if self.profile.model.compile_blocks:
            self.dit.compile_blocks()
            self.log("DiT blocks compiled with torch.compile")
        self._log_memory_plan()

    def _log_memory_plan(self) -> None:
        self.memory_plan = None
        if self.device.type != "cuda":
            return
        self.memory_plan = plan(self.profile, self.dit.config,
                                lora_params=None, vram_gib=torch.cuda.get_device_properties(self.device).total_memory / 2**30)
        self.log(format_plan(self.memory_plan))

    def _build_network(self) -> None:
        create = self.plugins.registry("register_networks").get(self.profile.network.module)
        train_te = not self.profile.network.train_unet_only
        self.network = create(self.profile.network, dit=self.dit, text_encoder=self.text_encoder if train_te else None,
                              train_text_encoder=train_te)
        refuse_unsupported_multipliers(self.network, self.profile.network.module, self.data)
        self.network.apply_to()
        if self.profile.network.weights:
            self.log(f"continuing from {self.profile.network.weights}")
        # LoRA modules start on their target's device, which is the CPU for swapped-out blocks.
        self.network.to(device=self.device, dtype=torch.bfloat16 if self.profile.training.full_bf16 else torch.float32)
        groups = self.network.param_groups(self.profile.optimizer)
        self.log(self.network.describe_groups())
        if self.profile.optimizer.fused_backward_pass:
            self.optimizer = create_fused_backward_optimizer(self.plugins, self.profile.optimizer, groups)
            if self.profile.optimizer.max_grad_norm:
                self.warn("fused_backward_pass with max_grad_norm: the updates wait for the whole gradient to clip it "
                          "as sd-scripts does, which saves no memory; set max_grad_norm = 0 to update during backward")
        else:
            self.optimizer = create_optimizer(self.plugins, self.profile.optimizer, groups)
        self.ema = build_ema(self.profile.optimizer, self.network, self.device)

    def _plan_steps(self) -> None:
        t = self.profile.training
        per_epoch = math.ceil(self.data.num_batches_per_epoch / t.gradient_accumulation_steps)
        if t.max_train_epochs:
            self.total_steps = t.max_train_epochs * per_epoch
        else:
            self.total_steps = t.max_train_steps
        self.num_epochs = math.ceil(self.total_steps / per_epoch)
        self.steps_per_epoch = per_epoch

    # ---- saving ------------------------------------------------------------------------------------

    def lora_path(self, *, step: int | None = None, epoch: int | None = None) -> Path:
        s = self.profile.saving
        if epoch is not None:
            name = f"{s.output_name}-{epoch:06d}"
        elif step is not None:
            name = f"{s.output_name}-step{step:08d}"
        else:
            name = s.output_name
        return s.output_dir / f"{name}.safetensors"

    def save_lora(self, path: Path, progress: Progress) -> None:
        """The LoRA (with ema_save = "lora" the EMA weights; with "beside" also <name>-ema next to it)."""
        self.last_lora = path
        if not self.processes.is_main:
            return
        ema = self.ema is not None and self.profile.optimizer.ema_save
        with self.ema.applied() if ema == "lora" else contextlib.nullcontext():
            self._write_lora(path, progress)
        if ema == "beside":
            with self.ema.applied():
                self._write_lora(path.with_name(f"{path.stem}-ema{path.suffix}"), progress)

    def _write_lora(self, path: Path, progress: Progress) -> None:
        metadata = save_metadata(self.profile, self.base_metadata, self.network.metadata(), step=progress.step, epoch=epoch_number(progress))
        self.network.save(path, metadata=metadata, dtype=SAVE_DTYPES[self.profile.saving.save_precision])
        self.events.emit("save", kind="lora", path=str(path), step=progress.step, epoch=epoch_number(progress))
        self._self_check(path)

    def ema_weights(self, use: str):
        """The EMA weights in the network for ``use`` ("previews", "validation") when the profile asks for them."""
        if self.ema is not None and getattr(self.profile.optimizer, f"ema_for_{use}"):
            return self.ema.applied()
        return contextlib.nullcontext()

    def _self_check(self, path: Path) -> None:
        check = getattr(self.network, "self_check", None)
        if check is None:
            return
        result = check(path)
        if result.ok:
            self.events.emit("log", message=f"self-check of {path.name}: {result.summary}")
        else:
            self.warn(f"self-check of {path.name} failed: {result.summary}")

    def _keep_earlier_final_lora(self, progress: Progress) -> None:
        """Extending a finished run would overwrite its final LoRA at the end: keep that file under the name of
        its epoch (when it ended on an epoch boundary of an epoch-counted run) or of its step."""
        final = self.lora_path()
        if progress.step >= self.total_steps or not final.is_file() or not self.processes.is_main:
            return
        from safetensors import safe_open

        with safe_open(str(final), framework="pt") as f:
            meta = f.metadata() or {}
        step = int(meta.get("ss_steps", progress.step))
        epoch_end = progress.batch_in_epoch == 0 and self.profile.training.max_train_epochs
        kept = self.lora_path(epoch=int(meta.get("ss_epoch", progress.epoch))) if epoch_end else self.lora_path(step=step)
        if kept.exists():
            return
        os.replace(final, kept)
        self.log(f"kept the earlier final LoRA as {kept.name} (this run writes a new {final.name} when it ends)")

    def _on_disk(self) -> str:
        """What an interrupted run leaves, for the message of a second Ctrl+C."""
        lora = f"the last LoRA saved is {self.last_lora}" if self.last_lora else "no LoRA was saved by this run"
        state = (f"the last state is {self.last_state} (continue with --resume {self.run_dir})" if self.last_state
                 else "no resumable state was saved")
        return f"On disk: {lora}; {state}."

    def save_training_state(self, progress: Progress) -> None:
        if progress == self.saved_progress:  # a stop right after a scheduled save: that state is this one
            return
        if not self.processes.is_main:  # every process knows the newest state (the NaN guard reloads it)
            self.last_state, self.saved_progress = state_path(self.run_dir / "state", progress.step), replace(progress)
            return
        scaler = getattr(self.accelerator, "scaler", None)
        path = save_state(self.run_dir / "state", progress=progress, network=self.network, optimizer=self.optimizer,
                          scheduler=self.scheduler, scaler=scaler, profile=self.profile,
                          keep_last=self.profile.saving.keep_last_n_states,
                          extra={"ema": self.ema.state_dict()} if self.ema is not None else None)
        self.last_state, self.saved_progress = path, replace(progress)
        self.events.emit("save", kind="state", path=str(path), step=progress.step, epoch=epoch_number(progress))

    def _prune_epoch_saves(self, epoch: int) -> None:
        keep = self.profile.saving.save_last_n_epochs
        if keep and self.processes.is_main:
            old = epoch - keep
            if old >= 1:
                self.lora_path(epoch=old).unlink(missing_ok=True)

    def _prune_step_saves(self, step: int) -> None:
        keep = self.profile.saving.save_last_n_steps
        every = self.profile.saving.save_every_n_steps
        if keep and every and self.processes.is_main:
            for old in range(every, step - keep, every):
                self.lora_path(step=old).unlink(missing_ok=True)

    # ---- the loop ----------------------------------------------------------------------------------

    def _inputs(self, batch) -> StepInputs:
        device = self.device
        if batch.latents is not None:
            latents = batch.latents.to(device, torch.float32)
        else:
            with torch.no_grad():
                latents = self.vae.encode(batch.pixels.to(device)).float()
        if batch.text is not None:
            qwen_states, qwen_mask, t5_ids, t5_mask = (t.to(device) for t in batch.text)
        else:
            # Validation calls this without grad; the text-encoder LoRA then needs none either.
            needs_grad = self.network.trains_text_encoder and torch.is_grad_enabled()
            grad = torch.enable_grad() if needs_grad else torch.no_grad()
            with grad:
                qwen_states, qwen_mask, t5_ids, t5_mask = self.text_encoder.encode(
                    batch.captions, self.profile.model.qwen3_max_token_length, self.profile.model.t5_max_token_length)
        masks = batch.alpha_masks.to(device) if batch.alpha_masks is not None else None
        if masks is not None and masks.dim() == 3:
            masks = masks.unsqueeze(1)
        return StepInputs(latents, qwen_states, qwen_mask, t5_ids, t5_mask, batch.loss_weights.float(), masks)

    def _micro_step(self, batch, step: int, micro: int, first_place: int, planned: int):
        """This process's part of one global batch of ``planned`` samples: forward and backward of its
        slice, the loss scaled by the slice's share of the batch (the processes' gradients are summed).
        ``first_place``: the samples planned in the step's earlier micro-batches (a sample's draws are seeded
        by its place among the step's samples). Returns (the scaled loss, [(image, σ)])."""
        t = self.profile.training
        torch.manual_seed(step_seed(t.seed, step, micro))  # LoRA dropouts draw from the global RNG
        if batch is None:  # an empty slice: nothing to train, the gradients it adds are zero
            return torch.zeros((), device=self.device), []
        generators = sample_generators(t.seed, step, [first_place + p for p in batch.positions])
        # The LoRA (its text-encoder adapters too) at the batch's dataset network_multiplier for the batch's
        # forward and backward (gradient checkpointing recomputes in backward), back at 1.0 after it.
        with applied_at(self.network, batch.network_multiplier):
            inputs = drop_captions(self._inputs(batch), t.caption_dropout_rate, generators)
            batch_size, _, h, w = inputs.latents.shape
            self.tflop_done += step_tflop(self.dit.config, latent_hw=(h, w), text_tokens=inputs.t5_ids.shape[1],
                                          batch=batch_size, checkpointing=self.checkpointing)
            with self.accelerator.autocast():
                loss, sigmas = flow_loss(self.dit, inputs, sampler=self.sampler, weighting=self.weighting, cfg=t,
                                         generators=generators)
            share = batch_size / planned
            self.accelerator.backward(loss * (share / t.gradient_accumulation_steps))
        return loss.detach() * share, list(zip(map(str, batch.paths), sigmas.tolist()))

    def _batches(self, progress: Progress):
        """(epoch, index in epoch, this process's slice, samples planned in the global batch) from the resume
        point on; past the planned epochs when skipped non-finite steps used batches (the loop ends at
        total_steps), ending if a whole epoch yields none. One process skips a batch none of whose samples
        could be loaded; several keep in step and train an empty slice as nothing."""
        first_epoch, first_batch = progress.epoch, progress.batch_in_epoch
        for epoch in itertools.count(first_epoch):
            start = first_batch if epoch == first_epoch else 0
            empty = True
            for index, batch in self.data.epoch_slices(epoch, start_batch=start):
                if batch is None and not self.processes.distributed:
                    continue
                empty = False
                yield epoch, index, batch, self.data.planned_batch_size(epoch, index)
            if empty and start == 0:
                return

    def _optimizer_step(self, params) -> float:
        max_norm = self.profile.optimizer.max_grad_norm
        if self.profile.optimizer.fused_backward_pass and not max_norm:
            self.optimizer.step()  # the updates happened in backward; this keeps the scheduler's count right
            return 0.0
        self.processes.sum_gradients(params)
        if max_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) if grads else torch.zeros(())
        norm = float(norm)
        if math.isfinite(norm) or self.precision == "fp16":
            self.optimizer.step()
        return norm

    def _step_report(self, micro_losses: list[torch.Tensor], samples: list[tuple[str, float]]) -> StepReport:
        """Every process's view of the step just computed, merged (before the optimizer step, which needs
        the loss of the whole global batch)."""
        mine = {"loss": float(torch.stack(micro_losses).sum()), "samples": samples,
                "memory": {"device": str(self.device), **memory_stats(self.device)}, "warnings": self.data_warnings}
        self.data_warnings = []
        reports = self.processes.exchange(mine)
        if self.processes.is_main:
            for report in reports[1:]:
                for message in report["warnings"]:
                    self._data_warning(message)
        return StepReport(
            loss=sum(r["loss"] for r in reports) / len(micro_losses),
            samples=[sample for r in reports for sample in r["samples"]],
            memory=[r["memory"] for r in reports],
        )

    def _requests(self) -> tuple[str | None, bool]:
        """(why to stop, save now) after a step, merged over the processes so all act at this step: the
        main process reads the control files, every process may have caught a signal."""
        stop_now, save_now = self.stop_requests.poll()
        requests = self.processes.exchange((self.stop_requests.stop_reason if stop_now else None, save_now))
        return next((stop for stop, _ in requests if stop), None), any(save for _, save in requests)

    def _emit_step(self, progress: Progress, epoch: int, report: StepReport, started: float, first_step: int,
                   losses: list[float], lrs: list[float], weight_norms: dict | None, grad_norm: float) -> None:
        """``epoch``: the 1-based epoch of the batch just trained; ``lrs``: the rates that step used. The memory
        fields are the main process's; ``processes`` lists every process's."""
        done = progress.step - first_step
        elapsed = time.monotonic() - started
        s_per_it = elapsed / done if done else 0.0
        window = losses[-50:]
        event = self.events.emit(
            "step", step=progress.step, epoch=epoch, total_steps=self.total_steps, loss=report.loss,
            loss_avg=sum(window) / len(window), lr=lrs, **({"weight_norms": weight_norms} if weight_norms else {}),
            lr_groups=[g.get("name", f"group{i}") for i, g in enumerate(self.optimizer.param_groups)],
            # A fused pass without clipping never sees the whole gradient.
            grad_norm=None if self.profile.optimizer.fused_backward_pass and not self.profile.optimizer.max_grad_norm else grad_norm,
            s_per_it=s_per_it, it_per_s=1 / s_per_it if s_per_it else 0.0,
            eta_s=s_per_it * (self.total_steps - progress.step),
            **{k: v for k, v in report.memory[0].items() if k != "device"}, processes=report.memory)
        self.display.step(event)

    def _handle_bad_step(self, progress: Progress, samples: list[tuple[str, float]], loss: float, norm: float) -> str:
        """Skip a non-finite step and name its samples; after too many in a row, reload the last state once
        (with a lower learning rate) or stop. Returns "skipped", "reloaded" or "stop"."""
        t = self.profile.training
        progress.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        images, sigmas = [str(p) for p, _ in samples], [round(s, 5) for _, s in samples]
        named = ", ".join(f"{Path(p).name} (σ {s})" for p, s in zip(images, sigmas))
        self.warn(f"non-finite loss or gradient at step {progress.step + 1}, step skipped; samples: {named}",
                  loss=loss, grad_norm=norm, images=images, sigmas=sigmas)
        if progress.bad_steps < t.nan_guard_max_bad_steps:
            return "skipped"
        seen = f"{progress.bad_steps} non-finite steps in a row (last loss {loss}, gradient norm {norm})"
        state = self.last_state
        # One reload per saved state: going bad again before the next save means the reload did not help.
        if state is not None and t.nan_guard_lr_factor and state != self.reloaded_from:
            self.warn(f"{seen}: reloading {state.name} with the learning rate × {t.nan_guard_lr_factor}")
            self.reloaded_from = state
            self._restore(state, lr_scale=progress.lr_scale * t.nan_guard_lr_factor)
            return "reloaded"
        again = f", again after reloading {state.name} with a lower learning rate" if state and state == self.reloaded_from else ""
        self.stop_reason = (
            f"{seen}{again}. Likely causes: a learning rate too high for this alpha/rank, fp16 overflow (use bf16), "
            "or broken images/latents (see the samples named in the warnings). Lower optimizer.learning_rate, "
            "set training.nan_guard_lr_factor to reload the last state automatically, or rebuild the caches."
        )
        return "stop"

    def _restore(self, state_dir: Path | None, *, lr_scale: float | None = None) -> Progress:
        """Load a state into every process: the main process reads it (the others may be on machines
        without its files) and hands it to them. ``state_dir``: the main process's; others pass None."""
        loaded = load_state(state_dir, profile=self.profile, allow_lr_change=self.allow_lr_change) \
            if self.processes.is_main else None
        progress, network_state, trainer_state = self.processes.from_main(loaded)
        self.network.load_state_dict(network_state)
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        train_mode(self.optimizer)  # a schedule-free state is saved with its eval weights
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(trainer_state["ema"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and trainer_state["scaler"] is not None:
            scaler.load_state_dict(trainer_state["scaler"])
        restore_rng_state(trainer_state["rng"])
        if lr_scale is not None:
            progress.lr_scale = lr_scale
        # The profile's rates (possibly changed with --allow-lr-change) times any NaN-guard reduction.
        rebase_rates(self.scheduler, self.optimizer, [lr * progress.lr_scale for lr in self.base_lrs])
        progress.bad_steps = 0
        self.progress = progress
        return progress

    def _loop(self, progress: Progress) -> str:
        accum = self.profile.training.gradient_accumulation_steps
        params = self.network.trainable_parameters()
        self.stop_reason = None
        started, first_step, losses = time.monotonic(), progress.step, []
        micro_losses, samples, placed = [], [], 0  # placed: samples planned in the step's micro-batches so far
        self.progress = progress  # a failure's run_end names its step
        batches = self._batches(progress)
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
                report = self._step_report(micro_losses, samples)
                micro_losses, samples, placed = [], [], 0
                # fp16 steps anyway: its gradient scaler skips non-finite updates and lowers the scale.
                finite_loss = math.isfinite(report.loss)
                norm = self._optimizer_step(params) if finite_loss or self.precision == "fp16" else math.nan
                if not (finite_loss and (math.isfinite(norm) or self.precision == "fp16")):
                    outcome = self._handle_bad_step(progress, report.samples, report.loss, norm)
                    if outcome == "stop":
                        break
                    if outcome == "reloaded":  # repeat the data from the reloaded state's position
                        progress = self.progress
                        batches = self._batches(progress)
                    continue
                progress.bad_steps = 0
                lrs = rates_used(self.optimizer)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                weight_norms = self._after_update(progress.step)
                if epoch_done:
                    progress.epoch, progress.batch_in_epoch = epoch + 1, 0
                losses.append(report.loss)
                self._emit_step(progress, epoch + 1, report, started, first_step, losses, lrs, weight_norms, norm)
                stop_now, save_now = self._requests()
                with eval_weights(self.optimizer):
                    self._scheduled_saves(progress, epoch_done, epoch, save_now)
                    if self.previews is not None:
                        self.previews.after_step(progress.step, epoch + 1 if epoch_done else None)
                    if self.validation is not None:
                        self.validation.after_step(progress.step, epoch + 1, epoch + 1 if epoch_done else None)
                if stop_now:
                    self.stop_reason = stop_now
                    break
        self.progress = progress
        self.train_seconds = max(1e-9, time.monotonic() - started)
        self.throughput = (progress.step - first_step) / self.train_seconds
        return "stopped" if self.stop_reason else "finished"

    def _after_update(self, step: int) -> dict | None:
        """After each optimizer step, as sd-scripts: max-norm regularisation, then the EMA of the result."""
        norms = None
        if self.profile.optimizer.scale_weight_norms:
            norms = apply_max_norm(self.network, self.profile.optimizer.scale_weight_norms)
        if self.ema is not None:
            self.ema.update(step)
        return norms

    def _scheduled_saves(self, progress: Progress, epoch_done: bool, epoch: int, save_now: bool) -> None:
        s = self.profile.saving
        final = progress.step >= self.total_steps
        saved = False
        if not final and s.save_every_n_steps and progress.step % s.save_every_n_steps == 0:
            self.save_lora(self.lora_path(step=progress.step), progress)
            self._prune_step_saves(progress.step)
            saved = True
        if not final and epoch_done and s.save_every_n_epochs and (epoch + 1) % s.save_every_n_epochs == 0:
            self.save_lora(self.lora_path(epoch=epoch + 1), progress)
            self._prune_epoch_saves(epoch + 1)
            saved = True
        if save_now and not saved:
            self.save_lora(self.lora_path(step=progress.step), progress)
            saved = True
        state_every = s.save_state_every_n_steps
        if s.save_state and not final and (saved or (state_every and progress.step % state_every == 0)):
            self.save_training_state(progress)

    def _prepare_training(self) -> Progress:
        t = self.profile.training
        registry = self.plugins.registry
        self.sampler = registry("register_timestep_samplers").get(t.timestep_sampling)
        self.weighting = registry("register_loss_weightings").get(t.loss_weighting or t.weighting_scheme)
        # accelerate keeps one process-wide state; a second run in the same process (the TUI, the tests, a
        # Python caller) may ask for another precision or device, so start from a clean state each run.
        AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=self.device.type == "cpu")
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer, device_placement=False) \
            if not self.profile.optimizer.fused_backward_pass else self.optimizer
        self.scheduler = build_scheduler(self.optimizer, self.profile.optimizer, self.total_steps)
        self.base_lrs = list(self.scheduler.base_lrs)
        progress = Progress(step=0, epoch=0, batch_in_epoch=0, num_processes=self.processes.num_processes)
        if self.resume:
            state = self.last_state = self.resume_state
            progress = self._restore(state)
            self.log(f"resumed from {state} at step {progress.step}, epoch {progress.epoch + 1}")
            self._keep_earlier_final_lora(progress)
        return progress

    def _report_speed(self) -> None:
        """Achieved model math per second, and its share of this device's measured matmul rate (the floor)."""
        if not self.tflop_done:
            return
        achieved = self.tflop_done / self.train_seconds
        peak = matmul_tflops(self.device, self.dit_dtype)
        self.speed = {"tflops": round(achieved, 4), "floor_fraction": round(achieved / peak, 4)}
        self.log(f"model math: {achieved:.3g} TFLOP/s, {100 * achieved / peak:.0f}% of this device's measured "
                 f"{str(self.dit_dtype).removeprefix('torch.')} matmul rate ({peak:.3g} TFLOP/s)")

    def _build_previews(self):
        if self.profile.sampling.sample_prompts is None or not self.processes.is_main:
            return None
        return TrainingPreviews(self)

    # ---- entry point -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        self.processes = self._join_processes()
        seed_everything(self.profile.training.seed)
        self.last_lora = None
        self.last_state = self.saved_progress = self.reloaded_from = self.resume_state = None
        self.tflop_done, self.speed = 0.0, {}
        try:
            self._open_run()
        except BaseException as exc:
            self.processes.report_failure(describe_error(exc))
            self.processes.close()
            raise
        # Installed until the final saves are written: a second signal during them exits at once.
        self.stop_requests = StopRequests(self.run_dir / "control" if self.processes.is_main else None)
        self.stop_requests.on_disk = self._on_disk
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
        self._build_data()
        self._plan_steps()
        self.display.total = self.total_steps
        self.events.emit(
            "run_start", run_id=self.run_dir.name, pid=os.getpid(), device=str(self.device),
            num_processes=self.processes.num_processes, process_group=self.processes.backend,
            total_steps=self.total_steps, total_epochs=self.num_epochs, profile=str(self.run_dir / "profile.toml"),
            versions={"anima_train": __version__, "torch": torch.__version__, "python": platform.python_version()})
        self._report_startup()
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
        self._build_network()
        t = self.profile.training
        data_metadata = {**self.data.metadata(), "ss_total_batch_size": self.profile.dataset.train_batch_size
                         * self.processes.num_processes * t.gradient_accumulation_steps}
        self.base_metadata = training_metadata(
            self.profile, data_metadata=data_metadata, total_steps=self.total_steps,
            num_epochs=self.num_epochs, started_at=time.time(), dit_config=self.dit.config)
        progress = self._prepare_training()
        self.previews = self._build_previews()
        # the main process evaluates the whole held-out split; the others wait for it at the next step
        self.validation = build_validation(self) if self.processes.is_main else None
        if self.previews is not None and self.profile.sampling.sample_at_first and progress.step == 0:
            with eval_weights(self.optimizer):
                self.previews.render(step=0, epoch=0)
        self.stop_requests.training = True
        status = self._loop(progress)
        progress = self.progress
        final = status == "finished"
        path = self.lora_path() if final else self.lora_path(step=progress.step)
        with eval_weights(self.optimizer):
            self.save_lora(path, progress)
            if self.profile.saving.save_state:
                self.save_training_state(progress)
            if self.previews is not None and final:
                self.previews.render(step=progress.step, epoch=epoch_number(progress))
        self.log(f"{status} at step {progress.step}: {self.throughput:.3f} steps/s")
        self._report_speed()
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
