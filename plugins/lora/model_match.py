"""Does a LoRA file belong to the DiT at hand? The most common silent mistake is a LoRA trained on Anima 2B used
on Anima 2.9B (or the reverse): both are 2048 wide, so every 2B key also names a layer of 2.9B and loads
without a complaint, onto blocks that are not the ones it was trained on.

A file says which model it was made for in two ways: the ``anima_dit`` / ``anima_dit_blocks`` metadata
anima-train writes, and the DiT blocks its keys reach (``lora_unet_blocks_N_...``, ComfyUI's
``diffusion_model.blocks.N...``). ``match_lora`` compares both with the DiT's detected config and returns a
``ModelMatch``: the same model, a different one (both named, with the blocks the file reaches and those this DiT
lacks), or unknown (no metadata, and keys that fit: judged by the keys alone). Only the file's header is read.

Used by `validate` / `run` (``network.weights``, with ``network.allow_other_model``), `sample --lora` and
`lora-info --dit`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from anima_core.models.dit_loading import RELEASES, describe_dit
from anima_core.training.metadata import DIT_BLOCKS_KEY, DIT_KEY

from .files import read_lora_header

SAME, DIFFERENT, UNKNOWN = "same", "different", "unknown"
# A DiT block's module in the key forms our readers accept (adapter blocks, llm_adapter.blocks.N, are not DiT blocks).
BLOCK_KEY = re.compile(r"(?:lora_unet_blocks_|diffusion_model\.blocks\.)(\d+)[._]")
RECORDED_BLOCKS = re.compile(r"\((\d+) blocks")
RECORDED_WIDTH = re.compile(r"width (\d+)\)")


def block_ranges(indices) -> str:
    """``0-27``, ``0-5, 10, 20-39``: sorted indices as inclusive ranges (train_block_indices' notation)."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = previous = None
    for index in ordered + [None]:
        if previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ", ".join(parts)


def reached_blocks(keys) -> tuple[int, ...]:
    """The DiT block indices a file's tensor names reach."""
    return tuple(sorted({int(m.group(1)) for key in keys if (m := BLOCK_KEY.match(key))}))


@dataclass(frozen=True)
class LoRAModel:
    """What a LoRA file says about the model it was made for."""

    path: Path
    recorded: str | None  # anima_dit, e.g. "Anima 2B (28 blocks, width 2048)"; None: not recorded
    recorded_blocks: int | None
    recorded_width: int | None
    reached: tuple[int, ...]  # DiT block indices its keys reach

    @property
    def made_for(self) -> str:
        """The model by its metadata, else what its keys allow (a LoRA that reaches block 39 cannot be for 28 blocks)."""
        if self.recorded is not None:
            return self.recorded
        if not self.reached:
            return "unknown (no DiT block modules)"
        highest = self.reached[-1]
        fits = [r.name for r in RELEASES if r.width == 2048 and r.num_blocks > highest]
        return f"blocks up to {highest}: " + (" or ".join(fits) if fits else f"a DiT of at least {highest + 1} blocks")

    @property
    def likely_release(self) -> str | None:
        """A known release with exactly as many blocks as the file reaches, when it reaches every block 0..N-1
        (what a LoRA on all blocks of that model looks like)."""
        if not self.reached or self.reached != tuple(range(self.reached[-1] + 1)):
            return None
        names = [r.name for r in RELEASES if r.width == 2048 and r.num_blocks == len(self.reached)]
        return names[0] if names else None


def read_lora_model(path: str | os.PathLike) -> LoRAModel:
    """The file's ``anima_dit`` metadata and the blocks its keys reach, from its header (no tensor is read)."""
    path = Path(path)
    metadata, keys = read_lora_header(path)
    recorded = metadata.get(DIT_KEY)
    blocks = metadata.get(DIT_BLOCKS_KEY)
    if blocks is not None and not blocks.isdigit():
        blocks = None
    if blocks is None and recorded and (m := RECORDED_BLOCKS.search(recorded)):
        blocks = m.group(1)
    width = RECORDED_WIDTH.search(recorded) if recorded else None
    return LoRAModel(path, recorded, None if blocks is None else int(blocks),
                     int(width.group(1)) if width else None, reached_blocks(keys))


@dataclass(frozen=True)
class ModelMatch:
    """A LoRA file against one DiT. ``verdict``: SAME, DIFFERENT or UNKNOWN."""

    verdict: str
    lora: LoRAModel
    dit_model: str  # describe_dit of the DiT at hand
    dit_blocks: int

    @property
    def missing(self) -> tuple[int, ...]:
        """Blocks the file reaches that this DiT does not have."""
        return tuple(b for b in self.lora.reached if b >= self.dit_blocks)

    @property
    def name(self) -> str:
        return self.lora.path.name

    def _reach(self) -> str:
        if not self.lora.reached:
            return "its keys reach no DiT block"
        return f"its keys reach block(s) {block_ranges(self.lora.reached)}"

    @property
    def message(self) -> str:
        """One paragraph naming both models, the blocks reached and those this DiT lacks."""
        lora, missing = self.lora, self.missing
        if self.verdict == SAME:
            return f"{self.name} was made for {lora.recorded}, the model of this DiT; {self._reach()}."
        if lora.recorded is not None:
            text = f"{self.name} was made for {lora.recorded}, but this DiT is {self.dit_model}; {self._reach()}"
            if missing:
                text += f"; block(s) {block_ranges(missing)} do not exist on this DiT"
            elif lora.reached:
                text += (", which this DiT has too, but a block of the same number in another model is not the "
                         "layer the LoRA was trained on")
            if lora.recorded_blocks is not None and lora.recorded_blocks < self.dit_blocks:
                text += f"; this DiT's block(s) {block_ranges(range(lora.recorded_blocks, self.dit_blocks))} are not in its model"
            return text + "."
        if missing:
            likely = f" ({lora.likely_release})" if lora.likely_release else ""
            return (f"{self.name} does not record its model (no {DIT_KEY} metadata) and {self._reach()}: block(s) "
                    f"{block_ranges(missing)} do not exist on this DiT ({self.dit_model}), so it was made for a model "
                    f"of at least {lora.reached[-1] + 1} blocks{likely}.")
        text = (f"{self.name} does not record its model (no {DIT_KEY} metadata: made by another trainer or an older "
                f"anima-train); {self._reach()}")
        if lora.reached:
            text += f", all of which this DiT ({self.dit_model}) has"
        likely = lora.likely_release
        if likely and len(lora.reached) != self.dit_blocks:
            text += f"; a module on every block of a {len(lora.reached)}-block model, as {likely} has: probably made for {likely}"
        return text + "."


def _dit_config(dit):
    """A DiTConfig from itself or a loaded (meta or real) AnimaDiT."""
    return getattr(dit, "config", dit)


def match_lora(lora: str | os.PathLike | LoRAModel, dit) -> ModelMatch:
    """Compare a LoRA file (or its ``read_lora_model``) with a DiT (its config, or the loaded model; the meta-device
    load `validate` uses is enough)."""
    model = lora if isinstance(lora, LoRAModel) else read_lora_model(lora)
    config = _dit_config(dit)
    blocks, width = config.num_blocks, config.model_channels
    beyond = any(b >= blocks for b in model.reached)
    if model.recorded is None:
        verdict = DIFFERENT if beyond else UNKNOWN
    else:
        same = model.recorded_blocks == blocks and model.recorded_width in (None, width) and not beyond
        verdict = SAME if same else DIFFERENT
    return ModelMatch(verdict, model, describe_dit(config), blocks)


def selected_blocks(network_cfg, dit) -> set[int] | None:
    """The DiT blocks the profile's network puts modules on for this DiT (lora_anima's selection, which the
    lycoris network shares); None for another network plugin or args that do not parse (reported elsewhere)."""
    from anima_core.errors import AnimaError

    from .args import parse_network_args
    from .names import dit_block_index
    from .selection import select_targets

    module = network_cfg.module
    try:
        if module in ("lora_anima", "networks.lora_anima"):
            args = parse_network_args(network_cfg.args)
        elif module in ("lycoris", "lycoris.kohya"):
            from anima_plugins.lycoris.args import parse_lycoris_args

            args = parse_lycoris_args(network_cfg.args).selection
        else:
            return None
        targets, _ = select_targets(args, dit=dit, text_encoder_model=None, network_dim=network_cfg.dim or 4)
    except AnimaError:
        return None
    return {i for t in targets if t.part == "dit" and (i := dit_block_index(t.path)) is not None}


VERDICT_WORDS = {
    SAME: "the model this LoRA was made for",
    DIFFERENT: "NOT the model this LoRA was made for",
    UNKNOWN: "the LoRA does not record its model; its keys fit this DiT",
}


def model_lines(path: str | os.PathLike, dit=None) -> list[str]:
    """`lora-info`'s lines on the model: what the file was made for, the blocks it reaches, and with a DiT (its
    config or a loaded model) whether it is that model."""
    model = read_lora_model(path)
    lines = [f"made for: {model.made_for}",
             f"DiT blocks reached: {block_ranges(model.reached) if model.reached else 'none'}"]
    if dit is not None:
        match = match_lora(model, dit)
        lines += [f"this DiT: {match.dit_model}: {VERDICT_WORDS[match.verdict]}", f"  {match.message}"]
    return lines
