"""The VRAM planner: predicted peak GPU memory of a profile, phase by phase, and the cheapest memory
settings that fit a card.

Weights and LoRA sizes are exact: they are counted on the DiT built on the ``meta`` device from the
detected config, and on the network the profile's network plugin builds on it (no memory is allocated).

Activations follow a per-block model in units of ``U = tokens · D · act_bytes`` (tokens = batch · image
tokens at the largest bucket, D = model width):

* every block saves ``P = a·U + 2·U·(H/D) + CONTEXT_UNITS · (batch · 512 · D · act_bytes)`` for backward
  (``H``: MLP hidden width; its two H-wide tensors are the GELU input and the second Linear's input; the
  context term is cross-attention's k/v side);
* ``R = c·U`` is what lives outside the saved blocks at the peak: the backward working set of one block plus
  the embedder/final-layer/loss tensors;
* no checkpointing: ``N·P + R``; per-block checkpointing: ``N·U + P + R`` (the block inputs stay, one block
  is recomputed); CPU-offloaded or unsloth checkpointing: ``P + R`` (block inputs live in CPU memory);
  selective checkpointing: ``N·K + (P − K) + R`` with ``K = (10 + H/D)·U + 2·(batch · 512 · D · act_bytes)``
  the kept products of one block: its input, q/k/v/output projections and the attention output of
  self-attention, q/output projections and attention output of cross-attention with its k/v over the context
  rows, the MLP's two products (H and D wide); the recomputed block brings back the rest of its P. Counted,
  not measured on a GPU yet (and not offered among the cheapest settings until its step time is).

Calibration: ``a`` and ``c`` are the two unknowns of our own step measured on an H200 without and with
checkpointing (bench/RESULTS.md: 2B model, 1024², batch 1, LoRA rank 16 on sd-scripts' 280 modules, AdamW,
bf16; 18.26 and 5.33 GiB). Subtracting the exact weight, LoRA, gradient and AdamW bytes (4.24 GiB) leaves
``28·P + R = 14.03 GiB`` and ``28·U + P + R = 1.10 GiB`` with U = 16 MiB; solving gives ``P = 31.7·U`` (so
``a ≈ 23.1``) and ``R ≈ 10.4·U``. The other six rows check the model within 1% (swap 18 3.01 predicted vs 3.00
measured, swap 26 1.98 vs 1.96, fp8 16.61 vs 16.53, batch 4 60.41 vs 60.21, batch 4 checkpointed 8.62 vs 8.61),
except unsloth, 4.89 vs 5.17 (−5%: offloaded block inputs still in flight, not modelled; the headroom covers
it). sd-scripts' own step needs more (its anchors, 18.4 and 5.6 GiB, gave ``R ≈ 27.9·U``).

The VAE's working sets (bench/RESULTS.md, "VAE working sets"): decoding a 1024² preview took about 8.2 GiB on
the H200 beside the resident weights in a real-size run (the run's peak, 10.80 GiB with 18 blocks swapped and
12.94 GiB without, less the resident parts that differ by exactly the swapped blocks), about 22 full-resolution
float maps of the widest stage's 96 channels; on the CPU a 512² decode peaked at 25 such maps and an encode at 13.
The time costs that rank settings are our own step's on the H200 (bench/RESULTS.md, 1024², batch 1): unsloth
1.37×, checkpointing 2.04×, fp8 1.22×, and block swap free up to 26 of 28 blocks (its copies overlap the blocks'
compute). sd-scripts' are higher (unsloth 1.58×, checkpointing 2.05×, swap +0.53 at the maximum). Not measured:
cpu_offload_checkpointing (estimated from its blocking copies).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch

from anima_core.config.full_rules import FULL, component_rates
from anima_core.training.memory import option

GIB = 2**30
CONTEXT_ROWS = 512
SAVED_D_UNITS = 23.1  # a: D-wide tensors each block saves for backward, besides the MLP's H-wide ones
SAVED_CONTEXT_UNITS = 5.0  # k/v projections and k-norm internals over the 512 context rows
RESIDUAL_UNITS = 10.4  # c: one block's backward working set plus tensors outside the blocks
# Wan VAE: float maps of the widest full-resolution stage (96 channels) alive at the peak (see the docstring).
VAE_ENCODE_PEAK_CHANNELS = 13 * 96
VAE_DECODE_PEAK_CHANNELS = 22 * 96
VAE_PARAMS = 126_892_531
QWEN3_PARAMS = 596_049_920
QWEN3_LORA_PARAMS_PER_RANK = 630_784
# max_memory_allocated leaves out the CUDA context and allocator slack; keep this much of the card free.
HEADROOM_GIB = 0.8

SETTINGS_PHASES = ("training", "sampling")
CHECKPOINTING_KINDS = ("none", "unsloth", "gradient", "cpu_offload", "selective")
# Selective checkpointing keeps, per block, these D-wide products (see the docstring) besides the MLP's H-wide
# first product, and the cross-attention k/v over the context rows.
SELECTIVE_D_UNITS = 10.0
SELECTIVE_CONTEXT_UNITS = 2.0
# Step time relative to no strategy, measured on the H200 (cpu_offload: blocking copies, estimated; selective:
# recomputes the elementwise work only, estimated, so the planner does not suggest it).
_RELATIVE_TIME = {"none": 1.0, "unsloth": 1.37, "gradient": 2.04, "cpu_offload": 2.2, "selective": 1.3}
_FP8_TIME = 1.22  # dequantising each weight in forward and backward

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "no": 4}


@dataclass(frozen=True)
class Settings:
    """The memory settings a prediction is for."""

    checkpointing: str = "none"  # one of CHECKPOINTING_KINDS
    blocks_to_swap: int = 0
    fp8_base: bool = False

    @classmethod
    def from_profile(cls, profile) -> Settings:
        if option(profile, "memory", "unsloth_offload_checkpointing", False):
            kind = "unsloth"
        elif option(profile, "memory", "cpu_offload_checkpointing", False):
            kind = "cpu_offload"
        elif option(profile, "memory", "selective_checkpointing", False) or "selective_checkpointing" in (
            option(profile, "memory", "extra_strategies", ()) or ()
        ):
            kind = "selective"
        elif option(profile, "memory", "gradient_checkpointing", False):
            kind = "gradient"
        else:
            kind = "none"
        fp8 = bool(option(profile, "memory", "fp8_base", False) or option(profile, "memory", "fp8_base_unet", False))
        return cls(kind, int(option(profile, "memory", "blocks_to_swap", 0) or 0), fp8)

    def overrides(self, current: Settings | None = None) -> list[str]:
        """``--set`` arguments that turn ``current`` (default: everything off) into these settings."""
        before = set((current or Settings())._assignments())
        return [a for a in self._assignments() if a not in before]

    def _assignments(self) -> list[str]:
        flags = {
            "gradient_checkpointing": self.checkpointing == "gradient",
            "cpu_offload_checkpointing": self.checkpointing == "cpu_offload",
            "unsloth_offload_checkpointing": self.checkpointing == "unsloth",
            "selective_checkpointing": self.checkpointing == "selective",
            "fp8_base": self.fp8_base,
        }
        out = [f"memory.{k}={'true' if v else 'false'}" for k, v in flags.items()]
        return out + [f"memory.blocks_to_swap={self.blocks_to_swap}"]

    def describe(self) -> str:
        parts = {
            "none": [],
            "gradient": ["gradient_checkpointing"],
            "cpu_offload": ["cpu_offload_checkpointing"],
            "unsloth": ["unsloth_offload_checkpointing"],
            "selective": ["selective_checkpointing"],
        }[self.checkpointing]
        if self.blocks_to_swap:
            parts.append(f"blocks_to_swap={self.blocks_to_swap}")
        if self.fp8_base:
            parts.append("fp8_base")
        return ", ".join(parts) or "no memory strategy"

    def relative_time(self, num_blocks: int) -> float:
        """Estimated step time relative to no strategy (for ranking, see the module docstring); swapped blocks
        cost nothing measurable, so among equal times the fewest swapped blocks rank first."""
        return _RELATIVE_TIME[self.checkpointing] * (_FP8_TIME if self.fp8_base else 1.0)


@dataclass(frozen=True)
class Phase:
    name: str
    parts: dict[str, int]  # label -> bytes
    calibrated: bool = True

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class Fit:
    settings: Settings
    peak: int
    relative_time: float


@dataclass(frozen=True)
class Plan:
    settings: Settings
    summary: str
    phases: list[Phase]
    vram: int | None = None
    cheapest_fits: list[Fit] = field(default_factory=list)  # training/sampling fit; best first; empty without vram
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    @property
    def usable(self) -> int | None:
        return None if self.vram is None else max(0, self.vram - int(HEADROOM_GIB * GIB))

    @property
    def fits(self) -> bool | None:
        return None if self.vram is None else self.peak <= self.usable


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of the DiT, from the meta-device model."""

    num_blocks: int
    width: int
    mlp_hidden: int
    block_params: int  # one block
    block_fp8_params: int  # of which fp8_base stores as float8
    block_fp8_rows: int  # output rows of those Linears (one float32 scale each)
    other_params: int  # everything outside the blocks (adapter included)
    other_fp8_params: int
    other_fp8_rows: int
    largest_linear: int  # elements of the largest quantised weight (its dequantised copy is transient)
    lora_params: int

    @property
    def total_params(self) -> int:
        return self.num_blocks * self.block_params + self.other_params


def dit_config_from_file(path, *, llm_adapter_path=None):
    """The DiT config detected from a safetensors file's header alone (no weights are read).

    A separate adapter file counts as the released adapter (its size is fixed, spec §2).
    """
    from safetensors import safe_open

    from anima_core.errors import ModelFileError
    from anima_core.models.checkpoint import strip_prefixes
    from anima_core.models.dit_loading import detect_dit_config
    from anima_core.models.llm_adapter import LLMAdapterConfig

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"{path}: cannot read the DiT file's header ({exc}); check model.dit in the profile."
        ) from exc
    config = detect_dit_config(strip_prefixes(shapes), path)
    if llm_adapter_path is not None and config.llm_adapter is None:
        config = replace(config, llm_adapter=LLMAdapterConfig())
    return config


def meta_dit(model_config) -> torch.nn.Module:
    from anima_core.models.dit import AnimaDiT

    with torch.device("meta"):
        return AnimaDiT(model_config)


def _fp8_counts(module: torch.nn.Module, prefix: str) -> tuple[int, int, int]:
    from anima_plugins.memory.fp8 import is_fp8_candidate

    params = rows = largest = 0
    for name, sub in module.named_modules(prefix=prefix):
        if is_fp8_candidate(name, sub):
            params += sub.weight.numel()
            rows += sub.weight.shape[0]
            largest = max(largest, sub.weight.numel())
    return params, rows, largest


def network_parameter_count(profile, dit: torch.nn.Module, *, create=None) -> int:
    """Trainable parameters of the profile's network on ``dit`` (built on meta by ``create``, by default the
    network plugin the profile names)."""
    network_cfg = getattr(profile, "network", None)
    if create is None:
        from anima_core.plugins import default_plugins

        name = getattr(network_cfg, "module", "lora_anima")
        create = default_plugins().registry("register_networks").get(name)
    settings = dict(vars(network_cfg)) if network_cfg is not None else {}
    settings["weights"] = None  # sizes only: never read a file
    network = create(types.SimpleNamespace(**settings), dit=dit, text_encoder=None, train_text_encoder=False)
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


@lru_cache(maxsize=8)
def _dit_counts(model_config) -> ModelCounts:
    dit = meta_dit(model_config)
    block = dit.blocks[0]
    block_params = sum(p.numel() for p in block.parameters())
    block_fp8, block_rows, block_largest = _fp8_counts(block, "blocks.0")
    total = sum(p.numel() for p in dit.parameters())
    all_fp8, all_rows, largest = _fp8_counts(dit, "")
    n = len(dit.blocks)
    return ModelCounts(
        num_blocks=n,
        width=model_config.model_channels,
        mlp_hidden=model_config.mlp_hidden,
        block_params=block_params,
        block_fp8_params=block_fp8,
        block_fp8_rows=block_rows,
        other_params=total - n * block_params,
        other_fp8_params=all_fp8 - n * block_fp8,
        other_fp8_rows=all_rows - n * block_rows,
        largest_linear=max(largest, block_largest),
        lora_params=0,
    )


def model_counts(profile, model_config, *, lora_params: int | None = None) -> ModelCounts:
    """Parameter counts of ``model_config``'s DiT and of the profile's network on it (or ``lora_params``)."""
    counts = _dit_counts(model_config)
    if lora_params is None:
        lora_params = (full_trained_count(profile, meta_dit(model_config)) if _full(profile)
                       else network_parameter_count(profile, meta_dit(model_config)))
    return replace(counts, lora_params=lora_params)


def _full(profile) -> bool:
    return option(profile, "network", "module", None) == FULL


def _full_swaps(profile) -> bool:
    """Full fine-tuning can swap blocks: the fused backward pass, unclipped, updates them on the GPU, unsharded."""
    return (bool(option(profile, "optimizer", "fused_backward_pass", False))
            and not option(profile, "optimizer", "max_grad_norm", 1.0) and not option(profile, "training", "fsdp", False))


def _fsdp_processes(profile) -> int:
    """The processes a full fine-tune's weights are sharded over (training.fsdp), or 1."""
    return int(option(profile, "training", "num_processes", 1)) if option(profile, "training", "fsdp", False) else 1


def full_trained_count(profile, dit: torch.nn.Module) -> int:
    """The DiT parameters full fine-tuning trains: those of every group whose rate is not 0."""
    from anima_core.training.full_weights import component_of

    rates = component_rates(profile.optimizer)
    return sum(p.numel() for name, p in dit.named_parameters() if rates[component_of(name)] > 0)


def _profile_resolution(profile) -> tuple[int, int]:
    reso = option(profile, "dataset", "resolution")
    if reso is None:
        return 1024, 1024
    if isinstance(reso, int):
        return reso, reso
    return int(reso[0]), int(reso[-1])


@lru_cache(maxsize=8)
def _config_shape(path: str, mtime_ns: int, resolution: tuple[int, int], batch: int) -> tuple[int, int, int] | None:
    """The largest dataset of a dataset config: (width, height) of the largest area, and the largest batch."""
    from anima_core.data.config import resolve_datasets
    from anima_core.data.options import DataOptions
    from anima_core.errors import DatasetError

    try:
        specs, _ = resolve_datasets(DataOptions(dataset_config=Path(path), resolution=resolution,
                                                train_batch_size=batch), Path.cwd())
    except DatasetError:
        return None  # `validate` reports it; plan with the profile's values
    width, height = max((s.resolution for s in specs), key=lambda r: r[0] * r[1])
    return width, height, max(s.batch_size for s in specs)


def _dataset_shape(profile) -> tuple[int, int, int]:
    """(width, height, batch) training runs at: the dataset config's when the profile names one, else the profile's."""
    width, height = _profile_resolution(profile)
    batch = int(option(profile, "dataset", "train_batch_size", 1))
    config = option(profile, "dataset", "dataset_config")
    if config is not None and Path(config).is_file():
        shape = _config_shape(str(config), Path(config).stat().st_mtime_ns, (width, height), batch)
        if shape is not None:
            return shape
    return width, height, batch


def _resolution(profile) -> tuple[int, int]:
    return _dataset_shape(profile)[:2]


def _batch(profile) -> int:
    return _dataset_shape(profile)[2]


@lru_cache(maxsize=8)
def _header_params(files: tuple[str, ...], mtimes: tuple[int, ...]) -> int:
    from anima_core.models.checkpoint import read_state_dict

    total = 0
    for file in files:
        header = read_state_dict(file, "model", header_only=True)
        total += sum(t.numel() for k, t in header.items() if not k.endswith("lm_head.weight"))  # tied to the embeddings
    return total


def _file_params(profile, key: str, released: int) -> int:
    """Parameters in the file (or folder of .safetensors) the profile names, counted from its header; the
    released model's count when it names none or the file cannot be read."""
    from anima_core.errors import AnimaError

    path = option(profile, "model", key)
    if path is None:
        return released
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return released
    try:
        return _header_params(tuple(map(str, files)), tuple(f.stat().st_mtime_ns for f in files))
    except AnimaError:
        return released


def _optimizer_state_per_param(profile, param_bytes: int) -> float:
    name = str(option(profile, "optimizer", "optimizer_type", "AdamW")).lower()
    if "8bit" in name:
        return 2.0
    if "adafactor" in name:
        return 0.0  # factored second moments: rows + columns, negligible for LoRA matrices
    if "lion" in name or "sgd" in name:
        return float(param_bytes)
    if "prodigy" in name:
        return 4.0 * param_bytes
    return 2.0 * param_bytes


def _cached(profile, what: str) -> bool:
    """The run caches ``what`` (``latents``, ``text_encoder_outputs``), in memory or on disk: either way it frees
    the VAE, and moves an untrained text encoder off the GPU, before training."""
    return bool(option(profile, "caching", f"cache_{what}", False) or option(profile, "caching", f"cache_{what}_to_disk", False))


def _training_phase(profile, counts: ModelCounts, settings: Settings, act_bytes: int, tokens: int, batch: int) -> Phase:
    n, d = counts.num_blocks, counts.width
    weight_bytes = act_bytes
    if settings.fp8_base:
        # One byte per quantised weight, one float32 scale per output row, the rest in the weight dtype.
        block_bytes = (
            (counts.block_params - counts.block_fp8_params) * weight_bytes
            + counts.block_fp8_params
            + 4 * counts.block_fp8_rows
        )
        other_bytes = (
            (counts.other_params - counts.other_fp8_params) * weight_bytes
            + counts.other_fp8_params
            + 4 * counts.other_fp8_rows
        )
    else:
        block_bytes = counts.block_params * weight_bytes
        other_bytes = counts.other_params * weight_bytes
    resident_blocks = n - settings.blocks_to_swap

    lora_bytes = 2 if option(profile, "training", "full_bf16", False) else 4
    lora_params = counts.lora_params
    te_trained = not _cached(profile, "text_encoder_outputs") and not option(profile, "network", "train_unet_only", False)
    parts = {
        f"DiT weights ({resident_blocks}/{n} blocks on the GPU)": resident_blocks * block_bytes + other_bytes,
    }
    if not _cached(profile, "text_encoder_outputs"):
        parts["Qwen3 text encoder weights"] = _file_params(profile, "qwen3", QWEN3_PARAMS) * 2
        if te_trained:
            lora_params += QWEN3_LORA_PARAMS_PER_RANK * int(option(profile, "network", "dim", None) or 4)
    if not _cached(profile, "latents"):
        parts["VAE weights"] = _file_params(profile, "vae", VAE_PARAMS) * _DTYPE_BYTES[option(profile, "model", "vae_dtype", "float32")]
    if _full(profile):  # the trained weights are the DiT's (counted above), float32 unless full_bf16
        # swapped blocks keep their trained weights in CPU memory between uses (their optimizer state stays here)
        swapped_trained = settings.blocks_to_swap * min(counts.block_params, lora_params // n)
        if lora_bytes > weight_bytes:
            parts["float32 trained weights (beyond the DiT's dtype)"] = (lora_params - swapped_trained) * (
                lora_bytes - weight_bytes)
        fused = option(profile, "optimizer", "fused_backward_pass", False) and not option(profile, "optimizer", "max_grad_norm", 1.0)
        # the fused pass updates and frees each gradient in backward: about one block's gradients live at once
        parts["gradients" + (" (fused backward: one block's)" if fused else "")] = (
            min(counts.block_params, lora_params) if fused else lora_params) * lora_bytes
        parts["optimizer state"] = int(lora_params * _optimizer_state_per_param(profile, lora_bytes))
        shards = _fsdp_processes(profile)
        if shards > 1:  # each process holds 1/N of it all, plus the blocks gathered whole around the one running
            parts = {(f"DiT weights (a 1/{shards} shard)" if name.startswith("DiT weights") else name):
                     (size + shards - 1) // shards if name.startswith(("DiT weights", "float32", "gradients", "optimizer"))
                     else size for name, size in parts.items()}
            parts["FSDP: 2 blocks gathered, 1 block's gradients"] = (
                2 * counts.block_params * act_bytes + counts.block_params * lora_bytes)
    else:
        parts["LoRA weights + gradients"] = 2 * lora_params * lora_bytes
        parts["optimizer state"] = int(lora_params * _optimizer_state_per_param(profile, lora_bytes))

    unit = tokens * d * act_bytes
    saved = (
        SAVED_D_UNITS * unit
        + 2 * tokens * counts.mlp_hidden * act_bytes
        + SAVED_CONTEXT_UNITS * batch * CONTEXT_ROWS * d * act_bytes
    )
    residual = RESIDUAL_UNITS * unit
    if settings.checkpointing == "none":
        activations = n * saved + residual
    elif settings.checkpointing == "gradient":
        activations = n * unit + saved + residual
    elif settings.checkpointing == "selective":
        kept = (
            SELECTIVE_D_UNITS * unit
            + tokens * counts.mlp_hidden * act_bytes
            + SELECTIVE_CONTEXT_UNITS * batch * CONTEXT_ROWS * d * act_bytes
        )
        activations = n * kept + (saved - kept) + residual
    else:
        activations = saved + residual
    parts["activations"] = int(activations)
    if settings.fp8_base:
        parts["dequantised weight copies"] = 2 * counts.largest_linear * act_bytes
    return Phase("training", parts)


def _vae_activation_bytes(profile, width: int, height: int, batch: int, channels: int) -> int:
    pixels = width * height * batch
    if option(profile, "model", "vae_tiled", False):
        pixels = min(pixels, 512 * 512 * batch)
    return channels * pixels * _DTYPE_BYTES[option(profile, "model", "vae_dtype", "float32")]


def _caching_phases(profile, width: int, height: int) -> list[Phase]:
    phases = []
    vae_bytes = _DTYPE_BYTES[option(profile, "model", "vae_dtype", "float32")]
    if _cached(profile, "latents"):
        batch = int(option(profile, "caching", "vae_batch_size", 1))
        phases.append(
            Phase(
                "caching latents",
                {
                    "VAE weights": _file_params(profile, "vae", VAE_PARAMS) * vae_bytes,
                    "VAE activations": _vae_activation_bytes(profile, width, height, batch, VAE_ENCODE_PEAK_CHANNELS),
                },
                calibrated=False,
            )
        )
    if _cached(profile, "text_encoder_outputs"):
        batch = int(option(profile, "caching", "text_encoder_batch_size", 8))
        tokens = batch * int(option(profile, "model", "qwen3_max_token_length", 512))
        # Qwen3-0.6B: hidden 1024, MLP 3072, 28 layers; forward only, so about one layer's tensors at a time.
        phases.append(
            Phase(
                "caching text",
                {"Qwen3 weights": _file_params(profile, "qwen3", QWEN3_PARAMS) * 2, "Qwen3 activations": tokens * (8 * 1024 + 3 * 3072) * 2},
                calibrated=False,
            )
        )
    return phases


def _sampling_phase(profile, counts: ModelCounts, training: Phase, act_bytes: int, width: int, height: int) -> Phase:
    """Previews: everything training keeps resident, one block's forward at batch 1, then the VAE decode."""
    kept = {k: v for k, v in training.parts.items() if k not in ("activations", "dequantised weight copies")}
    tokens = width * height // 256
    unit = tokens * counts.width * act_bytes
    forward = SAVED_D_UNITS * unit + 2 * tokens * counts.mlp_hidden * act_bytes
    vae_bytes = _DTYPE_BYTES[option(profile, "model", "vae_dtype", "float32")]
    kept.setdefault("VAE weights", _file_params(profile, "vae", VAE_PARAMS) * vae_bytes)
    kept["DiT forward / VAE decode working set"] = int(max(forward, _vae_activation_bytes(profile, width, height, 1, VAE_DECODE_PEAK_CHANNELS)))
    return Phase("sampling", kept, calibrated=False)


def _act_bytes(profile) -> int:
    dtype = option(profile, "model", "transformer_dtype")
    if dtype is None:
        dtype = option(profile, "training", "mixed_precision", "bf16")
    return _DTYPE_BYTES[dtype]


def predict(profile, counts: ModelCounts, settings: Settings) -> list[Phase]:
    width, height = _resolution(profile)
    batch = _batch(profile)
    tokens = batch * (width // 16) * (height // 16)
    act_bytes = _act_bytes(profile)
    training = _training_phase(profile, counts, settings, act_bytes, tokens, batch)
    phases = [*_caching_phases(profile, width, height), training]
    sampling_on = option(profile, "sampling", "sample_prompts") is not None
    if sampling_on:
        phases.append(_sampling_phase(profile, counts, training, act_bytes, width, height))
    return phases


def candidate_settings(num_blocks: int) -> list[Settings]:
    """Every combination the planner may suggest (CPU-offload checkpointing is never faster than unsloth)."""
    return [
        Settings(kind, swap, fp8)
        for kind in ("none", "unsloth", "gradient")
        for fp8 in (False, True)
        for swap in range(0, num_blocks - 1)
    ]


def device_plan(profile, model_config, device: torch.device) -> Plan | None:
    """The plan against a CUDA device's memory, which a run logs before training and measures after; None off CUDA."""
    if device.type != "cuda":
        return None
    return plan(profile, model_config, vram_gib=torch.cuda.get_device_properties(device).total_memory / GIB)


def plan(profile, model_config, *, vram_gib: float | None = None, lora_params: int | None = None) -> Plan:
    """Predicted peak GPU memory of ``profile`` on the DiT ``model_config``; with ``vram_gib``, the cheapest
    settings that fit (by the estimated step time, fewest swapped blocks first)."""
    from anima_core.models.dit_loading import describe_dit

    counts = model_counts(profile, model_config, lora_params=lora_params)
    settings = Settings.from_profile(profile)
    phases = predict(profile, counts, settings)
    width, height = _resolution(profile)
    batch = _batch(profile)
    summary = (
        f"{describe_dit(model_config)}: {counts.total_params / 1e9:.2f} B params; "
        f"{width}×{height} × batch {batch} ({batch * (width // 16) * (height // 16)} image tokens); "
        f"{_act_bytes(profile) * 8}-bit activations; {counts.lora_params / 1e6:.2f} M trainable params"
        f"{' (full fine-tuning)' if _full(profile) else ''}; "
        f"{option(profile, 'optimizer', 'optimizer_type', 'AdamW')}"
    )
    notes = []
    if vram_gib is not None:
        usable = vram_gib * GIB - HEADROOM_GIB * GIB
        for phase in phases:
            if phase.name.startswith("caching") and phase.peak > usable:
                notes.append(
                    f"{phase.name} alone may need {phase.peak / GIB:.1f} GiB: set model.vae_tiled = true, a smaller "
                    "caching.vae_batch_size / caching.text_encoder_batch_size, or cache on a larger card."
                )
    if vram_gib is not None and _fsdp_processes(profile) > 1:  # executors.choose_step: eager under FSDP
        notes.append("step path: eager (training.fsdp: blocks are not compiled under FSDP)")
    elif vram_gib is not None:  # a GPU's plan: say which step path runs there (training/executors.py chooses)
        compiled = option(profile, "model", "compile_blocks", None)
        graphs = ", replayed as CUDA graphs (model.cuda_graphs)" if option(profile, "model", "cuda_graphs", False) else ""
        default = " (the default on CUDA)" if compiled is None else ""
        notes.append("step path: " + (f"compiled blocks{default}{graphs}" if compiled is not False
                                      else "eager (model.compile_blocks = false)"))
        if compiled is False:
            notes.append("model.compile_blocks (the default on CUDA) makes steps faster after a compile of about 30 s: "
                         "−36% without checkpointing, −47% with it, and less memory (measured on an H200, bench/RESULTS.md).")
    if option(profile, "dataset", "dataset_config") is not None:
        notes.append("resolution and batch size are those of the dataset config's largest dataset.")
    if settings.checkpointing == "selective":
        notes.append("selective checkpointing's activations are counted from the products each block keeps, "
                     "not measured on a GPU yet.")
    processes = int(option(profile, "training", "num_processes", 1))
    if processes > 1:
        accum = int(option(profile, "training", "gradient_accumulation_steps", 1))
        notes.append(f"memory of each GPU: each of the {processes} processes trains batch {batch}; the global batch is "
                     f"{batch} × {processes} processes × {accum} accumulation steps = {batch * processes * accum}.")
        if _fsdp_processes(profile) > 1:
            notes.append(f"training.fsdp: the DiT's weights, gradients and optimizer state are split {processes} ways "
                         "(the rows above are one process's share).")
    vram = None if vram_gib is None else int(vram_gib * GIB)
    fits: list[Fit] = []
    if vram is not None:
        usable = vram - int(HEADROOM_GIB * GIB)
        for candidate in candidate_settings(counts.num_blocks):
            if _full(profile) and (candidate.fp8_base or (candidate.blocks_to_swap and not _full_swaps(profile))):
                continue  # what full fine-tuning refuses (config/full_rules.py)
            # Caching runs before the DiT is loaded: memory settings do not change it, so it is judged apart.
            peak = max(p.peak for p in predict(profile, counts, candidate) if p.name in SETTINGS_PHASES)
            if peak <= usable:
                fits.append(Fit(candidate, peak, candidate.relative_time(counts.num_blocks)))
        fits.sort(key=lambda f: (round(f.relative_time, 3), f.settings.blocks_to_swap, f.settings.fp8_base))
        fits = _distinct_families(fits)
    return Plan(settings, summary, phases, vram, fits, notes)


def _distinct_families(fits: list[Fit], limit: int = 3) -> list[Fit]:
    """The best fit of each (checkpointing, fp8) family, best first, at most ``limit``."""
    seen, out = set(), []
    for fit in fits:
        family = (fit.settings.checkpointing, fit.settings.fp8_base)
        if family not in seen:
            seen.add(family)
            out.append(fit)
    return out[:limit]


def _gib(n: int) -> str:
    return f"{n / GIB:6.2f} GiB"


def format_measured(p: Plan, measured_bytes: int) -> str:
    """The line a run prints at its end: measured peak beside the prediction."""
    predicted = max(ph.peak for ph in p.phases if ph.name in SETTINGS_PHASES)
    error = (measured_bytes - predicted) / predicted * 100 if predicted else 0.0
    return (
        f"peak GPU memory {measured_bytes / GIB:.2f} GiB measured, "
        f"{predicted / GIB:.2f} GiB predicted ({error:+.0f}%)"
    )


def format_plan(p: Plan) -> str:
    lines = [p.summary, f"settings: {p.settings.describe()}", ""]
    for phase in p.phases:
        mark = "" if phase.calibrated else "  (estimate, not calibrated)"
        lines.append(f"{phase.name:<18} {_gib(phase.peak)}{mark}")
        for label, size in phase.parts.items():
            lines.append(f"    {label:<44} {_gib(size)}")
    lines.append("")
    lines.append(f"predicted peak     {_gib(p.peak)}")
    if p.vram is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(
            f"{verdict} in {p.vram / GIB:.1f} GiB ({p.usable / GIB:.1f} GiB usable after {HEADROOM_GIB} GiB for the "
            "CUDA context and allocator slack)"
        )
        if p.cheapest_fits:
            lines.append("cheapest settings that fit (estimated step time relative to no strategy):")
            for fit in p.cheapest_fits:
                lines.append(f"  {fit.settings.describe():<52} {_gib(fit.peak)}   ≈{fit.relative_time:.2f}×")
                changes = " ".join(f"--set {o}" for o in fit.settings.overrides(p.settings))
                lines.append("      " + (changes or "(the profile's settings)"))
        else:
            lines.append("no combination of memory settings fits; lower the resolution or batch size.")
    lines.extend(f"note: {n}" for n in p.notes)
    return "\n".join(lines)


__all__ = [
    "Fit",
    "ModelCounts",
    "Phase",
    "Plan",
    "Settings",
    "dit_config_from_file",
    "format_measured",
    "format_plan",
    "model_counts",
    "plan",
    "predict",
]
