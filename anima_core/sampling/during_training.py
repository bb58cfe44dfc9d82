"""Preview images during training: when to render, and rendering without disturbing the run.

Sampling must not change training (see training/forward_only.py), and a model loaded only for previews (the
VAE when latents are cached) is freed. A failing preview is a warning event, never the end of the run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from anima_core.atomic import atomic_path
from anima_core.errors import AnimaError
from anima_core.sampling.prompts import SamplePrompt, load_prompt_file
from anima_core.sampling.sampler import TextConditioning, render_prompt
from anima_core.sampling.sheet import contact_sheet, strength_sheet
from anima_core.training.devices import DTYPES, free_memory
from anima_core.training.forward_only import forward_only_mode, preserved_rng
from anima_core.training.network import applied_at


def image_name(output_name: str, label: str, prompt: SamplePrompt, seed: int) -> str:
    """sd-scripts' pattern `<output_name>_<e000003|000120>_<NN>_<seed>.png`, without its time stamp so a
    rerun of the same step replaces its images instead of piling up."""
    return f"{output_name}_{label}_{prompt.index:02d}_{seed}.png"


def sheet_name(output_name: str, label: str) -> str:
    return f"{output_name}_{label}_sheet.png"


def strength_name(output_name: str, label: str, prompt: SamplePrompt, seed: int, strength: float) -> str:
    """One strength of a slider preview, beside the prompt's image (which shows every strength side by side):
    `<output_name>_<label>_<NN>_<seed>_strength<+1|-1|+0.5>.png`."""
    return f"{output_name}_{label}_{prompt.index:02d}_{seed}_strength{strength:+g}.png"


def strength_label(strength: float) -> str:
    return f"{strength:+g}" if strength else "0"


SHEET_ROW_HEIGHT = 256  # a slider render's sheet: each prompt's row of strengths at this height


class TrainingPreviews:
    """Built by the trainer when ``sampling.sample_prompts`` is set; see ARCHITECTURE.md for the attributes used."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.sampling = trainer.profile.sampling
        self._encoded: dict[str, TextConditioning] = {}  # prompt text -> outputs on the CPU
        self._last_rendered_step: int | None = None
        # A slider (profile [slider] pairs): every prompt at each of these LoRA strengths, the same seed.
        slider = trainer.profile.slider
        self.strengths: list[float] | None = list(slider.preview_strengths) if slider.pairs else None
        self._rows: list[list[Path]] = []  # the render's images per prompt and strength (slider)
        # Sharded weights (training.fsdp): every process renders, since each forward gathers from all of them,
        # and the main process writes.
        self.writes = trainer.processes.is_main

    # ---- when ------------------------------------------------------------------------------------

    def after_step(self, step: int, epoch_completed: int | None) -> None:
        """Called after every optimizer step; ``epoch_completed`` is the 1-based epoch that just ended, if any."""
        every_epochs = self.sampling.sample_every_n_epochs
        if epoch_completed is not None and every_epochs and epoch_completed % every_epochs == 0:
            self.render(step=step, epoch=epoch_completed, by_epoch=True)
            return
        every_steps = self.sampling.sample_every_n_steps
        if every_steps and step % every_steps == 0:
            self.render(step=step, epoch=epoch_completed)  # None mid-epoch: the loop does not say which

    # ---- rendering -------------------------------------------------------------------------------

    def render(self, step: int, epoch: int | None, *, by_epoch: bool = False) -> list[Path]:
        """Render every prompt of the (re-read) prompt file, then a contact sheet of them; returns the images.

        A second call for the same step (the final render right after a scheduled one) does nothing.
        """
        if step == self._last_rendered_step:
            return []
        self._last_rendered_step = step
        trainer = self.trainer
        try:
            prompt_file = load_prompt_file(self.sampling.sample_prompts)
        except AnimaError as exc:
            trainer.warn(f"previews skipped: {exc}")
            return []
        for warning in prompt_file.warnings:
            trainer.warn(f"preview prompt: {warning}")
        if not prompt_file.prompts:
            return []
        label = f"e{epoch:06d}" if by_epoch else f"{step:06d}"
        with preserved_rng(), forward_only_mode(trainer), trainer.ema_weights("previews"):
            try:
                encode = self._encoder(prompt_file.prompts)
                vae, loaded_here = self._vae()
            except Exception as exc:  # OOM or a broken model file must not end the run
                trainer.warn(f"previews at step {step} skipped: {exc}")
                return []
            paths = []
            self._rows = []
            try:
                for prompt in prompt_file.prompts:
                    render = self._render_one if self.strengths is None else self._render_strengths
                    path = render(prompt, encode, vae, label, step, epoch)
                    if path is not None:
                        paths.append(path)
            finally:
                if loaded_here:
                    del vae
                free_memory(trainer.device)
        self._write_sheet(paths, label)
        return paths

    def _write_sheet(self, paths: list[Path], label: str) -> None:
        if len(paths) < (1 if self.strengths is not None else 2):
            return
        path = paths[0].parent / sheet_name(self.trainer.profile.saving.output_name, label)
        try:
            if self.strengths is not None:  # prompts down, strengths across
                sheet = strength_sheet([[Image.open(p) for p in row] for row in self._rows],
                                       [strength_label(m) for m in self.strengths], height=SHEET_ROW_HEIGHT)
            else:
                sheet = contact_sheet([Image.open(p) for p in paths])
            with atomic_path(path) as tmp:
                sheet.save(tmp, format="PNG")
        except Exception as exc:  # a quick-look extra: never worth ending a run over
            self.trainer.warn(f"contact sheet {path.name} not written: {exc}")

    def _render_one(self, prompt: SamplePrompt, encode, vae, label: str, step: int, epoch: int | None) -> Path | None:
        trainer = self.trainer
        seed = prompt.seed_or(trainer.profile.training.seed)
        path = Path(trainer.run_dir) / "samples" / image_name(trainer.profile.saving.output_name, label, prompt, seed)
        try:
            image = render_prompt(trainer.dit, vae, encode, prompt, seed=seed, device=trainer.device)
            if not self.writes:
                return None
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        except Exception as exc:
            free_memory(trainer.device)
            trainer.warn(f"preview {prompt.index:02d} ({prompt.prompt[:60]!r}) at step {step} failed: {exc}")
            return None
        trainer.events.emit("sample", path=str(path), prompt=prompt.prompt, step=step, epoch=epoch)
        return path

    def _render_strengths(self, prompt: SamplePrompt, encode, vae, label: str, step: int,
                          epoch: int | None) -> Path | None:
        """A slider's preview: the prompt at every strength with the same seed, each image saved, and the prompt's
        image (its `sample` event, what the gallery shows) the strengths side by side."""
        trainer = self.trainer
        seed = prompt.seed_or(trainer.profile.training.seed)
        samples = Path(trainer.run_dir) / "samples"
        output_name = trainer.profile.saving.output_name
        row = []
        try:
            for strength in self.strengths:
                with applied_at(trainer.network, strength):
                    image = render_prompt(trainer.dit, vae, encode, prompt, seed=seed, device=trainer.device)
                if not self.writes:
                    continue
                at = samples / strength_name(output_name, label, prompt, seed, strength)
                with atomic_path(at) as tmp:
                    image.save(tmp, format="PNG")
                row.append(at)
            if not self.writes:
                return None
            path = samples / image_name(output_name, label, prompt, seed)
            with atomic_path(path) as tmp:
                strength_sheet([[Image.open(p) for p in row]], [strength_label(m) for m in self.strengths]).save(
                    tmp, format="PNG")
        except Exception as exc:
            free_memory(trainer.device)
            trainer.warn(f"preview {prompt.index:02d} ({prompt.prompt[:60]!r}) at step {step} failed: {exc}")
            return None
        self._rows.append(row)
        trainer.events.emit("sample", path=str(path), prompt=prompt.prompt, step=step, epoch=epoch)
        return path

    def _encoder(self, prompts: list[SamplePrompt]):
        """Encode what the prompts need once, on the training device, then serve it from the CPU cache.

        Texts are the cache key, so an edited prompt file only encodes what changed. A text-encoder LoRA in
        training changes the outputs, so then nothing is kept between renders.
        """
        trainer = self.trainer
        if getattr(trainer.network, "trains_text_encoder", False):
            self._encoded.clear()
        texts = {p.prompt for p in prompts} | {p.negative_prompt for p in prompts if p.scale > 1.0}
        self._encoded = {t: c for t, c in self._encoded.items() if t in texts}
        missing = sorted(texts - self._encoded.keys())
        if missing:
            self._encode(missing)
        return self._encoded.__getitem__

    def _encode(self, texts: list[str]) -> None:
        trainer = self.trainer
        text_encoder = trainer.text_encoder
        model_cfg = trainer.profile.model
        home = text_encoder.device
        text_encoder.model.to(trainer.device)
        try:
            with torch.no_grad():
                for text in texts:
                    outputs = text_encoder.encode(
                        [text], model_cfg.qwen3_max_token_length, model_cfg.t5_max_token_length
                    )
                    self._encoded[text] = TextConditioning(*(t.detach().cpu() for t in outputs))
        finally:
            if home != trainer.device:
                text_encoder.model.to(home)
                free_memory(trainer.device)

    def _vae(self):
        """The run's VAE, or one loaded for this render when latents were cached (freed by the caller)."""
        trainer = self.trainer
        if trainer.vae is not None:
            return trainer.vae, False
        model_cfg = trainer.profile.model
        vae = trainer.models.load_vae(model_cfg, dtype=DTYPES[model_cfg.vae_dtype], device=trainer.device)
        return vae, True
