"""`anima-train`: the command line. Each subcommand is a small function; errors a person can fix print
as one paragraph with no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from anima_core import __version__
from anima_core.errors import AnimaError

console = Console(stderr=True, highlight=False)
DEMO_DIR = "anima-demo"


def _profile(args):
    from anima_core.config import load_profile

    return load_profile(args.profile, args.set)


def cmd_run(args) -> int:
    from anima_core.config import load_profile
    from anima_core.preflight import preflight
    from anima_core.plugins import default_plugins
    from anima_core.training.distributed import under_launcher
    from anima_core.training.trainer import Trainer

    # Every problem knowable without training, before anything is cached (the run scans the images itself).
    found = []

    def check(profile, earlier):
        found.append(preflight(profile, default_plugins(), scan_images=False, earlier=earlier))
        return found[-1].problems

    profile = load_profile(args.profile, args.set, preflight=check)
    if profile.training.num_processes > 1 and not under_launcher():
        return _launch_processes(profile, args)
    # The trainer states its own notes (the precision); what it cannot know is handed to it, so the run's
    # events (and the TUI) carry it too.
    notes = [n for result in found for n in result.notes if n.startswith("network.weights:")]
    trainer = Trainer(profile, default_plugins(), resume=args.resume, allow_lr_change=args.allow_lr_change,
                      cache_only=args.cache_only, console=console, notes=notes)
    result = trainer.run()
    if not trainer.processes.is_main:
        return 0
    if result.lora_path:
        console.print(f"{result.status}: {trainer.target_kind.file_label} {result.lora_path}")
    console.print(f"run directory: {result.run_dir}")
    return 0


def _launch_processes(profile, args) -> int:
    """training.num_processes > 1 without a launcher: start the workers through torch's elastic launcher,
    each running this same command; the run directory is named here so all of them (and a failure record
    written here) use the same one."""
    from anima_core.runctl import new_run_name
    from anima_core.training.distributed import check_devices, launch_workers

    check_devices(profile.training.device, profile.training.num_processes)
    runs_dir = profile.saving.output_dir / "runs"
    name = profile.logging.run_name or new_run_name(profile.saving.output_name, runs_dir)
    argv = [*args.argv, "--set", f"logging.run_name={json.dumps(name)}"]
    console.print(f"starting {profile.training.num_processes} processes; run directory: {runs_dir / name}")
    return launch_workers(profile.training.num_processes, argv, run_dir=runs_dir / name,
                          threads=profile.training.num_cpu_threads_per_process)


def cmd_validate(args) -> int:
    from anima_core.config import load_profile
    from anima_core.preflight import preflight
    from anima_core.plugins import default_plugins

    found = []

    def check(profile, earlier):
        found.append(preflight(profile, default_plugins(), scan_images=not args.no_scan, earlier=earlier))
        return found[-1].problems

    try:
        load_profile(args.profile, args.set, preflight=check)
    finally:
        for result in found:
            for note in result.notes:
                console.print(Text("warning: ", style="yellow") + Text(note), soft_wrap=True)
    for line in found[0].summary if found else []:
        console.print(line, markup=False, soft_wrap=True)
    skipped = "" if not args.no_scan else " (images not scanned: --no-scan)"
    console.print(f"{args.profile}: valid{skipped}", markup=False, soft_wrap=True)
    return 0


def cmd_show_config(args) -> int:
    from anima_core.config.show import profile_to_commented_toml

    print(profile_to_commented_toml(_profile(args)), end="")
    return 0


def cmd_plugins(args) -> int:
    from anima_core.plugins import default_plugins

    for row in default_plugins().describe():
        print(f"{row['name']} {row['version']}")
        print(f"  hooks: {', '.join(row['hooks'])}")
        for provided in row["provides"]:
            print(f"  - {provided}")
    return 0


def cmd_make_tiny_model(args) -> int:
    from anima_core.models import make_tiny_model

    paths = make_tiny_model(Path(args.dir))
    print(f"DiT:             {paths.dit}\nQwen3:           {paths.qwen3}\nVAE:             {paths.vae}\n"
          f"Qwen3 tokenizer: {paths.qwen_tokenizer}\nT5 tokenizer:    {paths.t5_tokenizer}")
    return 0


def cmd_demo(args) -> int:
    folder = Path(args.dir).resolve()
    # Said before the heavy imports, so the command talks from its first second.
    where = "" if args.dir != DEMO_DIR else " (the default: give a folder to put it elsewhere)"
    console.print(f"anima-train demo: a tiny random model and dataset, trained on the CPU, in {folder}{where}",
                  markup=False, highlight=False, soft_wrap=True)
    from anima_core.demo import run_demo

    run_demo(folder, steps=args.steps, console=console)
    return 0


def cmd_extract_lora(args) -> int:
    from anima_core.training.devices import SAVE_DTYPES
    from anima_plugins.lora.extract import extract_lora

    tuned = Path(args.tuned)
    output = args.output or tuned.with_name(f"{tuned.stem}-lora{args.dim}.safetensors")
    result = extract_lora(args.base, tuned, output, dim=args.dim, device=args.device,
                          save_dtype=SAVE_DTYPES[args.save_precision])
    for line in result.lines():
        print(line)
    print(f"wrote {output}")
    return 0


def cmd_lora_info(args) -> int:
    from anima_plugins.lora import lora_info
    from anima_plugins.lycoris.info import is_lycoris_file, lycoris_info

    dit = None
    if args.dit:
        from anima_core.models import load_dit

        dit = load_dit(args.dit, device="meta")  # the header alone: names and shapes, no weights
    info = lycoris_info if is_lycoris_file(args.file) else lora_info
    print(info(Path(args.file), dit))
    return 0


def cmd_import_kohya(args) -> int:
    from anima_core.atomic import atomic_write_text
    from anima_core.kohya import import_command_line
    from anima_core.kohya.paths import rebase_paths

    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    result = import_command_line(text)
    rebase_paths(result, Path.cwd(), args.output.parent if args.output else None)
    for warning in result.warnings:
        console.print(Text("warning: ", style="yellow") + Text(warning), soft_wrap=True)
    if args.output:
        atomic_write_text(args.output, result.toml())
        console.print(f"wrote {args.output}; check it with `anima-train validate {args.output}`")
    else:
        print(result.toml(), end="")
    return 0


def cmd_tui(args) -> int:
    from anima_tui.app import run_tui
    from anima_tui.widgets.preview_image import renderer_name

    renderer_name()  # refuse an unknown ANIMA_TRAIN_IMAGES before the screen is taken over

    run_tui(Path(args.target) if args.target else None)
    return 0


def cmd_watch(args) -> int:
    if args.plain or not sys.stdout.isatty():  # a pipe or a file gets lines, never escape codes
        from anima_tui.plain_watch import watch_plain

        return watch_plain(Path(args.run_dir))
    from anima_tui.app import run_watch
    from anima_tui.widgets.preview_image import renderer_name

    renderer_name()  # refuse an unknown ANIMA_TRAIN_IMAGES before the screen is taken over

    run_watch(Path(args.run_dir))
    return 0


def cmd_ctl(args) -> int:
    from anima_core.runctl import is_run_dir, request, run_info

    if not is_run_dir(Path(args.run_dir)):
        console.print(f"{args.run_dir} is not a run directory (it has no events.jsonl); give a folder under "
                      "OUTPUT_DIR/runs/", markup=False, soft_wrap=True)
        return 1
    status = run_info(Path(args.run_dir)).status
    if status not in ("starting", "running"):
        console.print(Text("warning: ", style="yellow") + Text(f"the run is {status}; nothing will act on the request"))
        return 1
    request(Path(args.run_dir), args.action)
    console.print(f"{args.action} requested; the run acts on it after its current step")
    return 0


def cmd_plan(args) -> int:
    from anima_core.training.cache_report import cache_memory_report
    from anima_core.training.planner import dit_config_from_file, format_plan, plan

    profile = _profile(args)
    config = dit_config_from_file(profile.model.dit, llm_adapter_path=profile.model.llm_adapter)
    print(format_plan(plan(profile, config, vram_gib=args.vram)))
    for line in cache_memory_report(profile):
        print(line)
    return 0


def cmd_sample(args) -> int:
    from anima_core.sampling.cli import run_sample_command

    run_sample_command(args, console=console)
    return 0


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="TOML profile")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                        help="override one profile value (TOML syntax; repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anima-train", description="LoRA trainer for the Anima image model.")
    parser.add_argument("--version", action="version", version=f"anima-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train from a profile (headless)")
    _add_profile_args(p)
    p.add_argument("--resume", metavar="DIR|latest", help="continue from a saved state, a run folder, or the newest state")
    p.add_argument("--allow-lr-change", action="store_true", help="accept changed learning-rate keys on resume")
    p.add_argument("--cache-only", action="store_true", help="build the latent and text caches, then exit")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a profile, its files, this device and the dataset; every problem at once")
    _add_profile_args(p)
    p.add_argument("--no-scan", action="store_true", help="do not read the dataset's images and captions (faster)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show-config", help="print the resolved profile with every default filled in")
    _add_profile_args(p)
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("plugins", help="list loaded plugins, their versions and hooks")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("demo", help="make a tiny model and dataset and train a LoRA on the CPU")
    p.add_argument("dir", nargs="?", default=DEMO_DIR, help=f"folder for the demo (default: ./{DEMO_DIR})")
    p.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-tiny-model", help="write a tiny random Anima model set in the released formats")
    p.add_argument("dir")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("lora-info", help="show a LoRA file's modules, ranks, metadata and ComfyUI compatibility")
    p.add_argument("file")
    p.add_argument("--dit", help="a DiT file (only its header is read): say whether the LoRA was made for it")
    p.set_defaults(func=cmd_lora_info)

    p = sub.add_parser("extract-lora", help="a LoRA of the difference between a fine-tuned DiT and its base (per-module SVD)")
    p.add_argument("base", help="the DiT the fine-tune started from")
    p.add_argument("tuned", help="the fine-tuned DiT (a full fine-tuning save)")
    p.add_argument("--dim", type=int, required=True, help="the LoRA's rank")
    p.add_argument("-o", "--output", type=Path, help="LoRA file to write (default: <tuned>-lora<dim>.safetensors)")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cuda is much faster for 2B)")
    p.add_argument("--save-precision", choices=["float", "fp16", "bf16"], default="float", help="dtype of the saved tensors")
    p.set_defaults(func=cmd_extract_lora)

    p = sub.add_parser("import-kohya", help="turn an anima_train_network.py command line into a profile")
    p.add_argument("file", help="file holding the command line, or - for standard input")
    p.add_argument("-o", "--output", type=Path, help="profile to write (default: print it)")
    p.set_defaults(func=cmd_import_kohya)

    p = sub.add_parser("tui", help="the terminal UI: edit profiles, launch and watch runs")
    p.add_argument("target", nargs="?", help="a profile or a run directory")
    p.set_defaults(func=cmd_tui)

    p = sub.add_parser("watch", help="monitor a run directory, live or finished")
    p.add_argument("run_dir")
    p.add_argument("--plain", action="store_true",
                   help="print a line per step and event until the run ends (the default when not a terminal)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("ctl", help="ask a running training to save now or stop gracefully")
    p.add_argument("run_dir")
    p.add_argument("action", choices=["save", "stop"])
    p.set_defaults(func=cmd_ctl)

    p = sub.add_parser("plan", help="predict peak GPU memory and the cheapest settings that fit")
    _add_profile_args(p)
    p.add_argument("--vram", type=float, metavar="GiB", help="memory of the target GPU")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sample", help="render images with the preview sampler, optionally with LoRAs")
    p.add_argument("--dit", required=True, help="the DiT file (anima-*.safetensors)")
    p.add_argument("--qwen3", required=True, help="the Qwen3 text encoder: a .safetensors file or a Hugging Face folder")
    p.add_argument("--vae", required=True, help="the Qwen-Image VAE file (.safetensors or .pth)")
    p.add_argument("--qwen3-tokenizer", help="Qwen3 tokenizer folder (default: next to --qwen3, else the shipped one)")
    p.add_argument("--t5-tokenizer", help="T5 tokenizer folder (default: the shipped one)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA to apply, at STRENGTH (default 1.0); repeatable")
    p.add_argument("--allow-other-model", action="store_true",
                   help="apply a --lora made for another model (e.g. Anima 2B on 2.9B) instead of refusing it")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (sd-scripts options like --n --w --h --d --s --l --fs allowed)")
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="image file (.png/.jpg/.webp) for one prompt; otherwise a folder for sample_NN_SEED.png files")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--show", action="store_true", help="also draw the images in the terminal (as the TUI does)")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except AnimaError as exc:
        # Plain text: messages name keys in brackets ([network], [general]) that markup would swallow.
        console.print(Text("error: ", style="red") + Text(str(exc)), soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
