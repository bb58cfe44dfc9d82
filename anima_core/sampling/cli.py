"""`anima-train sample`: render prompts with the preview sampler, with LoRA files applied at given strengths."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.text import Text

from anima_core.atomic import atomic_path
from anima_core.errors import AnimaError
from anima_core.sampling.prompts import SamplePrompt, parse_prompt_line
from anima_core.sampling.sampler import TextConditioning, render_prompt
from anima_core.training.devices import free_memory, resolve_device

DEFAULT_SEED = 0


class SampleArgumentError(AnimaError):
    """A `sample` argument cannot be used as given."""


def parse_lora_argument(value: str) -> tuple[Path, float]:
    """`FILE` or `FILE:STRENGTH`; a colon that is not followed by a number belongs to the path."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(value), 1.0


def _prompts(texts: list[str], console) -> list[SamplePrompt]:
    prompts = []
    for index, text in enumerate(texts):
        prompt, warnings = parse_prompt_line(text, index=index, where=f"--prompt #{index + 1}")
        for warning in warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}")
        prompts.append(prompt)
    return prompts


IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def output_path(output: Path, count: int, index: int, seed: int) -> Path:
    """``-o x.png`` with one prompt is that file; a folder (or several prompts) gets sample_NN_SEED.png inside."""
    if count == 1 and output.suffix.lower() in IMAGE_SUFFIXES and not output.is_dir():
        return output
    return output / f"sample_{index:02d}_{seed}.png"


def check_lora_models(dit_path, loras: list[tuple[Path, float]], *, allow_other_model: bool, console) -> None:
    """Each ``--lora`` against the DiT's header, before any weight loads: a LoRA made for another model (Anima 2B on
    2.9B, another block count) is refused unless ``--allow-other-model``, since its images would look like the
    LoRA's effect while it sits on blocks it was not trained on; one whose keys reach blocks the DiT lacks cannot
    be applied at all; one that does not record its model gets a warning."""
    if not loras:
        return
    from anima_core.models import load_dit
    from anima_plugins.lora.model_match import DIFFERENT, UNKNOWN, match_lora

    dit = load_dit(dit_path, device="meta")
    for path, _ in loras:
        match = match_lora(path, dit)
        if match.missing:
            raise SampleArgumentError(f"--lora {path}: {match.message} It cannot be applied to this DiT; use the "
                                      "DiT it was made for.")
        if match.verdict == DIFFERENT and not allow_other_model:
            raise SampleArgumentError(f"--lora {path}: {match.message} Use the DiT it was made for, or pass "
                                      "--allow-other-model to render with it on this one anyway.")
        if match.verdict in (DIFFERENT, UNKNOWN):
            console.print(Text("warning: ", style="yellow") + Text(f"--lora {path}: {match.message}"), soft_wrap=True)


def run_sample_command(args, console) -> list[Path]:
    """Load the model set, apply the LoRAs, render each ``--prompt`` into ``args.output``; returns the paths."""
    from anima_core.models import load_dit, load_text_encoder, load_vae
    from anima_plugins.lora import apply_lora_files

    if args.show:  # a renderer setting that cannot be honoured fails before minutes of loading and rendering
        from anima_tui.widgets.preview_image import renderer_name

        renderer_name()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts = _prompts(args.prompt, console)
    loras = [parse_lora_argument(value) for value in args.lora]
    for path, _ in loras:
        if not path.is_file():
            raise SampleArgumentError(
                f"--lora {path}: no such file. Give FILE or FILE:STRENGTH (e.g. my.safetensors:0.8)."
            )

    check_lora_models(args.dit, loras, allow_other_model=getattr(args, "allow_other_model", False), console=console)

    dit = load_dit(args.dit, dtype=dtype, device=device).eval()
    text_encoder = load_text_encoder(args.qwen3, tokenizer_path=args.qwen3_tokenizer,
                                     t5_tokenizer_path=args.t5_tokenizer, dtype=dtype, device=device)
    vae = load_vae(args.vae, dtype=torch.float32, device=device)
    if loras:
        applied = apply_lora_files(dit, text_encoder, loras)
        console.print(f"applied {', '.join(f'{p.name} × {s:g}' for p, s in loras)} ({len(applied.adapters)} modules)")

    cache: dict[str, TextConditioning] = {}

    def encode(text: str) -> TextConditioning:
        if text not in cache:
            with torch.no_grad():
                cache[text] = TextConditioning(*text_encoder.encode([text]))
        return cache[text]

    written = []
    for prompt in prompts:
        seed = prompt.seed_or(DEFAULT_SEED)
        image = render_prompt(dit, vae, encode, prompt, seed=seed, device=device)
        path = output_path(Path(args.output), len(prompts), prompt.index, seed)
        with atomic_path(path) as tmp:
            image.save(tmp, format=IMAGE_SUFFIXES.get(path.suffix.lower(), "PNG"))
        print(path)
        written.append(path)
    free_memory(device)
    if args.show:
        from anima_tui.widgets.preview_image import print_images

        print_images(written, console)
    return written
