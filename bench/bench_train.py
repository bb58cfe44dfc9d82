"""Training-step benchmark: the full-size Anima DiT with random weights, timed through the trainer's step code.

    python bench/bench_train.py                       # every setting on the GPU, a table last
    python bench/bench_train.py --tiny --steps 2      # tiny config on the CPU in seconds (smoke test)
    python bench/bench_train.py --settings plain,gc --steps 20 --json out.json
    python bench/bench_train.py --profile gc          # torch.profiler table of one setting
    python bench/bench_train.py --model 2.9b          # Anima 2.9B (40 blocks) instead of the 2B model

Per setting a fresh DiT (real module classes and key names, no file) is built on the device in bf16 with small
random weights, the memory strategies are applied as the trainer applies them, LoRA rank 16 / alpha 16 goes on
sd-scripts' default targets, and N optimizer steps run through ``flow_loss`` + backward + gradient clipping +
AdamW on synthetic cached latents and text outputs. Reported: median s/step after warm-up, peak allocated and
reserved memory, the fraction of the floor's rate (ANCHORS.md FLOPs over the card's measured bf16 matmul rate),
the planner's prediction, the first step's loss (the same seed gives the same loss in every setting of one
batch size: a cross-check of the strategies) and the sd-scripts anchor of the setting.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass, field, replace

import torch

from anima_core.config.schema import MemoryTable, NetworkTable, OptimizerTable, TrainingTable
from anima_core.models.dit import AnimaDiT, DiTConfig
from anima_core.models.llm_adapter import LLMAdapterConfig
from anima_core.plugins import build_plugins
from anima_core.training import planner
from anima_core.training.memory import apply_memory_strategies
from anima_core.training.flops import matmul_tflops, step_tflop
from anima_core.training.step import StepInputs, flow_loss, sample_generators
from anima_plugins.lora import create_network
from anima_plugins.memory import STRATEGIES
from anima_plugins.optimizers import create_adamw

GIB = 2**30
LATENT_SIDE = 128  # 1024² pixels
TEXT_TOKENS = 512
# ANCHORS.md: floor FLOPs per step at batch 1 (4096 image + 512 text tokens), without / with checkpointing.
FLOOR_TFLOP = {False: 40.7, True: 59.0}
# ANCHORS.md: sd-scripts on one H200, batch 1 (s/step, peak allocated GiB).
SD_SCRIPTS = {
    "plain": (0.338, 18.4),
    "gc": (0.694, 5.6),
    "unsloth": (0.534, 5.3),
    "swap18": (0.690, 3.2),
    "swap26": (0.871, 2.2),
}
TARGET_S = {"plain": 0.11, "gc": 0.16, "swap26": 0.20}

TINY_CONFIG = DiTConfig(
    model_channels=64,
    num_blocks=8,  # block swap counts shrink in proportion (see memory_options)
    num_heads=2,
    mlp_hidden=256,
    adaln_lora_dim=16,
    context_dim=64,
    llm_adapter=LLMAdapterConfig(source_dim=64, target_dim=64, model_dim=64, num_layers=2, num_heads=4),
)
# The released layouts (anima_core.models.dit_loading.RELEASES); 2.9B is the 2B model expanded to 40 blocks.
MODELS = {"2b": DiTConfig(), "2.9b": replace(DiTConfig(), num_blocks=40)}
TINY_LATENT_SIDE = 16
TINY_TEXT_TOKENS = 32


@dataclass(frozen=True)
class Setting:
    batch: int = 1
    memory: dict = field(default_factory=dict)
    compile: bool = False
    graphs: bool = False  # compiled blocks replayed as CUDA graphs (model.cuda_graphs)
    fused: bool = False  # the fused LoRA GEMM (network arg fused = true)

    @property
    def checkpointing(self) -> bool:
        return any(self.memory.get(k) for k in ("gradient_checkpointing", "unsloth_offload_checkpointing"))


BASE_SETTINGS = {
    "plain": Setting(),
    "gc": Setting(memory={"gradient_checkpointing": True}),
    "unsloth": Setting(memory={"unsloth_offload_checkpointing": True}),
    "swap18": Setting(memory={"gradient_checkpointing": True, "blocks_to_swap": 18}),
    "swap26": Setting(memory={"gradient_checkpointing": True, "blocks_to_swap": 26}),
    "selective": Setting(memory={"selective_checkpointing": True}),
    "fp8": Setting(memory={"fp8_base": True}),
    "b4": Setting(batch=4),
    "b4_gc": Setting(batch=4, memory={"gradient_checkpointing": True}),
}
DEFAULT_SETTINGS = [*BASE_SETTINGS, "plain+compile", "gc+compile", "plain+compile+fused", "plain+graphs"]


SUFFIXES = ("compile", "graphs", "fused")


def parse_setting(name: str) -> Setting:
    """``name`` with optional ``+compile`` (torch.compile per DiT block), ``+graphs`` (compiled and replayed as
    CUDA graphs) and ``+fused`` (the fused LoRA GEMM), e.g. ``gc+compile+fused``."""
    base, *suffixes = name.split("+")
    if base not in BASE_SETTINGS or any(s not in SUFFIXES for s in suffixes):
        raise SystemExit(f"unknown setting {name!r}; choose from {', '.join(BASE_SETTINGS)}, "
                         f"optionally with +{', +'.join(SUFFIXES)}")
    setting = BASE_SETTINGS[base]
    return Setting(setting.batch, setting.memory, compile="compile" in suffixes or "graphs" in suffixes,
                   graphs="graphs" in suffixes, fused="fused" in suffixes)


@dataclass
class Row:
    setting: str
    batch: int
    s_per_step: float
    step_times: list[float]
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    floor_fraction: float
    planner_peak_gib: float
    planner_s_per_step: float | None
    first_loss: float
    host_syncs: int | None  # CUDA synchronisations torch reports in one step (sync debug mode)
    sd_scripts_s: float | None
    sd_scripts_gib: float | None


def random_dit(config: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int) -> AnimaDiT:
    """The DiT allocated straight on ``device`` in ``dtype``: weights N(0, 0.02), norm weights 1."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place in its final dtype: no float32 copy, no meta round trip
    try:
        with torch.device(device):
            dit = AnimaDiT(config)
    finally:
        torch.set_default_dtype(default_dtype)
    generator = torch.Generator(device).manual_seed(seed) if device.type != "meta" else None
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return dit.requires_grad_(False).train()


def synthetic_inputs(batch: int, side: int, tokens: int, config: DiTConfig, device: torch.device) -> StepInputs:
    """Cached-latent and cached-text tensors as the trainer hands them to ``flow_loss``."""
    g = torch.Generator().manual_seed(1234)
    adapter = config.llm_adapter
    t5_mask = torch.ones(batch, tokens, dtype=torch.long)
    t5_mask[:, tokens * 3 // 4 :] = 0  # a padded tail, as real captions have
    inputs = StepInputs(
        latents=torch.randn(batch, config.in_channels, side, side, generator=g),
        qwen_states=torch.randn(batch, tokens, adapter.source_dim, generator=g),
        qwen_mask=torch.ones(batch, tokens, dtype=torch.long),
        t5_ids=torch.randint(2, adapter.vocab_size, (batch, tokens), generator=g) * t5_mask,
        t5_mask=t5_mask,
        loss_weights=torch.ones(batch),
        alpha_masks=None,
    )
    return StepInputs(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(inputs).items()})


def count_host_syncs(run_step) -> int:
    """Synchronising CUDA calls in one step, as ``torch.cuda.set_sync_debug_mode`` reports them."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted_tflop(run_step) -> tuple[float, float]:
    """(TFLOP of one step as torch's FlopCounterMode counts them: matmuls and attention, the step's loss)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = float(run_step())
    return counter.get_total_flops() / 1e12, loss


class Bench:
    def __init__(self, *, tiny: bool, device: torch.device, steps: int, warmup: int, model: str = "2b"):
        self.tiny = tiny
        self.model = model
        self.device = device
        self.steps = steps
        self.warmup = warmup
        full = MODELS[model]
        # The tiny config keeps the model's share of blocks, so swap counts scale as on the real model.
        tiny_blocks = round(TINY_CONFIG.num_blocks * full.num_blocks / DiTConfig().num_blocks)
        self.config = replace(TINY_CONFIG, num_blocks=tiny_blocks) if tiny else full
        self.side = TINY_LATENT_SIDE if tiny else LATENT_SIDE
        self.tokens = TINY_TEXT_TOKENS if tiny else TEXT_TOKENS
        # bf16 weights + bf16 autocast (mixed_precision "bf16"); the tiny CPU run takes the float32 path
        # (mixed_precision "no"), as CPU bf16 matmuls are emulated and slow.
        self.dtype = torch.float32 if tiny else torch.bfloat16
        self.train_cfg = TrainingTable()
        registry = build_plugins(entry_points=False).registry  # where the trainer looks them up
        self.sampler = registry("register_timestep_samplers").get(self.train_cfg.timestep_sampling)
        self.weighting = registry("register_loss_weightings").get(self.train_cfg.weighting_scheme)
        self.tflops = matmul_tflops(device, self.dtype)
        self.plain_s: dict[int, float] = {}
        self.tiny_floor: dict[tuple[bool, int], float] = {}

    def memory_table(self, setting: Setting) -> MemoryTable:
        """The setting's memory options; a swap count is scaled to the share of the real model's 28 blocks."""
        options = dict(setting.memory)
        blocks = self.config.num_blocks
        if options.get("blocks_to_swap") and blocks != DiTConfig().num_blocks:
            share = options["blocks_to_swap"] / DiTConfig().num_blocks
            options["blocks_to_swap"] = min(blocks - 2, max(1, round(share * blocks)))
        return MemoryTable(**options)

    def build(self, setting: Setting):
        """DiT + strategies + LoRA + AdamW in the trainer's order (``Trainer._load_dit``, ``_build_network``)."""
        dit = random_dit(self.config, self.device, self.dtype, seed=0)
        profile = types.SimpleNamespace(memory=self.memory_table(setting), training=self.train_cfg)
        strategies = [cls(profile) for cls in STRATEGIES if cls.enabled(profile)]
        apply_memory_strategies(strategies, dit, device=self.device)
        if setting.compile:
            # Inductor takes minutes on the CPU: the smoke run only checks that the blocks trace (dynamo alone);
            # tests/test_speed_equivalence.py checks the traced backward against eager.
            options = {"mode": "reduce-overhead"} if setting.graphs else {}
            dit.compile_blocks(**({"backend": "eager"} if self.tiny else options))
        args = {"target_preset": "sd-scripts", **({"fused": True} if setting.fused else {})}
        network_cfg = NetworkTable(dim=16, alpha=16, args=args, train_unet_only=True)
        torch.manual_seed(0)
        network = create_network(network_cfg, dit=dit, text_encoder=None, train_text_encoder=False)
        network.apply_to()
        for param in network.trainable_parameters():
            param.data = param.data.to(device=self.device, dtype=torch.float32)
        groups = network.param_groups(OptimizerTable())
        optimizer = create_adamw(groups, OptimizerTable().learning_rate, {})
        return dit, network, optimizer

    def step_fn(self, dit, network, optimizer, inputs: StepInputs):
        params = network.trainable_parameters()
        max_norm = OptimizerTable().max_grad_norm
        counter = iter(range(10**9))

        def run_step() -> torch.Tensor:
            generators = sample_generators(next(counter), 0, range(inputs.latents.shape[0]))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype != torch.float32):
                loss, _ = flow_loss(dit, inputs, sampler=self.sampler, weighting=self.weighting,
                                    cfg=self.train_cfg, generators=generators)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return run_step

    def floor_tflop(self, setting: Setting) -> float:
        """ANCHORS.md's floor for the 2B model, scaled by the counted FLOPs of this model to the 2B model's."""
        def count(config):
            return step_tflop(config, latent_hw=(self.side, self.side), text_tokens=self.tokens, batch=setting.batch,
                              checkpointing=setting.checkpointing)

        return FLOOR_TFLOP[setting.checkpointing] * setting.batch * count(self.config) / count(DiTConfig())

    def run(self, name: str) -> Row:
        setting = parse_setting(name)
        free_device_memory(self.device)
        dit, network, optimizer = self.build(setting)
        inputs = synthetic_inputs(setting.batch, self.side, self.tokens, self.config, self.device)
        run_step = self.step_fn(dit, network, optimizer, inputs)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        key = (setting.checkpointing, setting.batch)
        if self.tiny and key not in self.tiny_floor:  # the tiny model's floor: what torch counts in one step
            self.tiny_floor[key], first_loss = counted_tflop(run_step)
            floor = self.tiny_floor[key]
        elif self.tiny:
            floor, first_loss = self.tiny_floor[key], float(run_step())
        else:
            floor, first_loss = self.floor_tflop(setting), float(run_step())
        times = []
        for _ in range(self.warmup + self.steps):
            start = time.perf_counter()
            run_step()
            sync(self.device)  # the trainer reads the loss every step, which waits for the GPU the same way
            times.append(time.perf_counter() - start)
        times = times[self.warmup :]
        host_syncs = count_host_syncs(run_step) if self.device.type == "cuda" else None
        s_per_step = statistics.median(times)
        if setting == Setting(batch=setting.batch):
            self.plain_s[setting.batch] = s_per_step
        peak_alloc = peak_reserved = None
        if self.device.type == "cuda":
            peak_alloc = torch.cuda.max_memory_allocated(self.device) / GIB
            peak_reserved = torch.cuda.max_memory_reserved(self.device) / GIB
        predicted_peak, relative_time = self.planner_prediction(setting, network)
        plain = self.plain_s.get(setting.batch)
        anchor = SD_SCRIPTS.get(name) if not self.tiny and self.model == "2b" else None
        del dit, network, optimizer, run_step
        return Row(
            setting=name,
            batch=setting.batch,
            s_per_step=s_per_step,
            step_times=times,
            peak_allocated_gib=peak_alloc,
            peak_reserved_gib=peak_reserved,
            floor_fraction=floor / self.tflops / s_per_step,
            planner_peak_gib=predicted_peak / GIB,
            planner_s_per_step=plain * relative_time if plain is not None else None,
            first_loss=first_loss,
            host_syncs=host_syncs,
            sd_scripts_s=anchor[0] if anchor else None,
            sd_scripts_gib=anchor[1] if anchor else None,
        )

    def planner_prediction(self, setting: Setting, network) -> tuple[int, float]:
        settings = planner.Settings.from_profile(types.SimpleNamespace(memory=self.memory_table(setting)))
        profile = types.SimpleNamespace(
            dataset=types.SimpleNamespace(resolution=self.side * 8, train_batch_size=setting.batch),
            caching=types.SimpleNamespace(cache_latents=True, cache_text_encoder_outputs=True),
            network=types.SimpleNamespace(train_unet_only=True, dim=16),
            optimizer=types.SimpleNamespace(optimizer_type="AdamW"),
            training=types.SimpleNamespace(mixed_precision="no" if self.tiny else "bf16", full_bf16=False),
            model=types.SimpleNamespace(),
        )
        lora_params = sum(p.numel() for p in network.trainable_parameters())
        counts = planner.model_counts(profile, self.config, lora_params=lora_params)
        phases = planner.predict(profile, counts, settings)
        training = next(p for p in phases if p.name == "training")
        return training.peak, settings.relative_time(self.config.num_blocks)

    def profile(self, name: str, steps: int = 3) -> str:
        from torch.profiler import ProfilerActivity, profile

        setting = parse_setting(name)
        dit, network, optimizer = self.build(setting)
        inputs = synthetic_inputs(setting.batch, self.side, self.tokens, self.config, self.device)
        run_step = self.step_fn(dit, network, optimizer, inputs)
        for _ in range(self.warmup):
            run_step()
        sync(self.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                run_step()
            sync(self.device)
        key = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        return f"profile of {name}, {steps} steps, sorted by {key}\n" + prof.key_averages().table(
            sort_by=key, row_limit=30
        )


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| setting | batch | s/step | peak alloc GiB | peak reserved GiB | floor rate | planner GiB | planner s/step "
        "| loss@1 | host syncs | sd-scripts s/step | sd-scripts GiB | target s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        target = TARGET_S.get(r.setting) if r.sd_scripts_s is not None else None
        lines.append(
            f"| {r.setting} | {r.batch} | {r.s_per_step:.4f} | {_fmt(r.peak_allocated_gib, '.2f')} "
            f"| {_fmt(r.peak_reserved_gib, '.2f')} | {r.floor_fraction:.1%} | {r.planner_peak_gib:.2f} "
            f"| {_fmt(r.planner_s_per_step, '.4f')} | {r.first_loss:.5f} | {_fmt(r.host_syncs, 'd')} "
            f"| {_fmt(r.sd_scripts_s, '.3f')} | {_fmt(r.sd_scripts_gib, '.1f')} | {_fmt(target, '.2f')} |"
        )
    return "\n".join(lines)


def environment(device: torch.device, dtype: torch.dtype, tflops: float) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    precision = str(dtype).removeprefix("torch.")
    return f"{card}; torch {torch.__version__}{cuda}; {precision} matmul measured at {tflops:.3g} TFLOP/s"


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    parser.add_argument("--model", choices=sorted(MODELS), default="2b",
                        help="2b (28 blocks, the sd-scripts anchors' model) or 2.9b (40 blocks)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per setting, after warm-up")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 5, tiny 0)")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated; default {','.join(DEFAULT_SETTINGS)}")
    parser.add_argument("--device", default=None, help="default: cuda when present, cpu with --tiny")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--profile", default=None, metavar="SETTING", help="print where one setting's step time goes")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 5)
    bench = Bench(tiny=args.tiny, device=device, steps=args.steps, warmup=warmup, model=args.model)
    name = f"Anima {args.model.upper()} ({bench.config.num_blocks} blocks)"
    model = f"tiny config of {name} (CPU smoke, not comparable)" if args.tiny else f"{name}, 1024², LoRA r16"
    header = f"{model}; {environment(device, bench.dtype, bench.tflops)}"
    if args.profile:
        print(bench.profile(args.profile))
        return []
    rows = []
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        started = time.perf_counter()
        try:
            rows.append(bench.run(name))
        except Exception:  # one failing setting (a CUDA-only bug, out of memory) must not cost the others' numbers
            print(f"{name}: FAILED", file=sys.stderr)
            traceback.print_exc()
            free_device_memory(device)
            continue
        print(f"{name}: {rows[-1].s_per_step:.4f} s/step ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": header, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    print(table(rows, header))
    return rows


if __name__ == "__main__":
    main()
