"""The previews of a run, folded from its `sample` events: by prompt (rows) and step (columns)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# The trainer names images `<output_name>_<label>_<NN>_<seed>.png` and the contact sheet of the same render
# `<output_name>_<label>_sheet.png` (anima_core.sampling.during_training).
_PROMPT_SLOT = re.compile(r"_(\d+)_(-?\d+)\.png$")


@dataclass(frozen=True)
class Preview:
    path: str
    prompt: str
    step: int | None
    epoch: int | None

    @property
    def name(self) -> str:
        return self.path.replace("\\", "/").rsplit("/", 1)[-1]

    @property
    def prompt_key(self) -> str:
        """What makes two previews the same prompt: its text and its slot (index and seed) in the prompt file,
        so two prompts with the same text and different seeds stay two rows."""
        slot = _PROMPT_SLOT.search(self.name)
        return f"{slot.group(1)}_{slot.group(2)}|{self.prompt}" if slot else self.prompt

    @property
    def sheet_name(self) -> str | None:
        """The file name of the contact sheet written with this preview, if the name follows the trainer's."""
        if not _PROMPT_SLOT.search(self.name):
            return None
        return _PROMPT_SLOT.sub("_sheet.png", self.name)

    def caption(self) -> str:
        step = "?" if self.step is None else str(self.step)
        epoch = "" if self.epoch is None else f" · epoch {self.epoch}"
        return f"step {step}{epoch}"

    def located(self, run_dir: Path) -> Path:
        """The image file: in the run's samples/ folder (which survives the run directory being moved or
        copied), else the path as the event wrote it."""
        beside = Path(run_dir) / "samples" / self.name
        return beside if beside.exists() else Path(self.path)


def _step_order(step: int | None) -> int:
    return -1 if step is None else step


@dataclass
class PreviewIndex:
    """Every preview, newest render of a (prompt, step) winning; `revision` counts changes for redraws."""

    _by_prompt: dict[str, dict[int | None, Preview]] = field(default_factory=dict)
    revision: int = 0

    def add(self, preview: Preview) -> None:
        self._by_prompt.setdefault(preview.prompt_key, {})[preview.step] = preview
        self.revision += 1

    def __len__(self) -> int:
        return sum(len(by_step) for by_step in self._by_prompt.values())

    @property
    def prompts(self) -> list[str]:
        """Prompt keys in the order they first appeared (the prompt file's order)."""
        return list(self._by_prompt)

    @property
    def steps(self) -> list[int | None]:
        """Every step that has a preview of any prompt, oldest first."""
        return sorted({step for by_step in self._by_prompt.values() for step in by_step}, key=_step_order)

    def prompt_text(self, key: str) -> str:
        return next(iter(self._by_prompt[key].values())).prompt

    def history(self, key: str) -> list[Preview]:
        """One prompt's previews, oldest step first."""
        by_step = self._by_prompt.get(key, {})
        return [by_step[step] for step in sorted(by_step, key=_step_order)]

    def at(self, key: str, step: int | None) -> Preview | None:
        return self._by_prompt.get(key, {}).get(step)

    def newest(self) -> list[Preview]:
        """The latest preview of each prompt, in prompt order."""
        return [self.history(key)[-1] for key in self._by_prompt]

    def column(self, step: int | None) -> list[Preview]:
        """Every prompt's preview at one step, in prompt order."""
        return [by_step[step] for by_step in self._by_prompt.values() if step in by_step]
