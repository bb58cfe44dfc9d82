"""Finding the Qwen3 and T5 tokenizers: a folder the profile names, else the text encoder's own folder, else the
copies shipped inside the package (``anima_core/models/tokenizers/``, Apache-2.0, see NOTICE.md there)."""

from __future__ import annotations

import os
from pathlib import Path

from anima_core.errors import TokenizerNotFoundError

PACKAGED_TOKENIZERS = Path(__file__).resolve().parent / "tokenizers"
PACKAGED_QWEN3_TOKENIZER = PACKAGED_TOKENIZERS / "qwen3_06b"
PACKAGED_T5_TOKENIZER = PACKAGED_TOKENIZERS / "t5_old"
QWEN_REPO = "Qwen/Qwen3-0.6B"
T5_REPO = "google/t5-v1_1-xxl"
# Either set is enough for transformers to build the tokenizer.
QWEN_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
T5_FILE_SETS = (("tokenizer.json",), ("spiece.model",))


def has_tokenizer_files(folder: Path, file_sets: tuple[tuple[str, ...], ...]) -> bool:
    return folder.is_dir() and any(all((folder / name).is_file() for name in names) for names in file_sets)


def _describe(file_sets) -> str:
    return " or ".join(" + ".join(names) for names in file_sets)


def missing_tokenizer_message(folder: Path, label: str, flag: str) -> str:
    file_sets, repo = (QWEN_FILE_SETS, QWEN_REPO) if label == "Qwen3" else (T5_FILE_SETS, T5_REPO)
    return (
        f"{folder}: no {label} tokenizer files here (need {_describe(file_sets)}). Point {flag} at a folder that "
        f"has them (a download of the tokenizer files of {repo}), or leave it unset to use the tokenizer shipped "
        f"with anima-train."
    )


def qwen_tokenizer_folder(tokenizer_path: str | os.PathLike | None, model_path: str | os.PathLike) -> Path:
    """Where the Qwen3 tokenizer comes from: ``tokenizer_path``, else the model folder when it holds one, else the
    shipped copy."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    if has_tokenizer_files(Path(model_path), QWEN_FILE_SETS):
        return Path(model_path)
    return PACKAGED_QWEN3_TOKENIZER


def t5_tokenizer_folder(tokenizer_path: str | os.PathLike | None) -> Path:
    return Path(tokenizer_path) if tokenizer_path is not None else PACKAGED_T5_TOKENIZER


def tokenizer_problems(qwen_tokenizer: Path | None, t5_tokenizer: Path | None, model_path: Path | None) -> list[str]:
    """What `validate` says about the tokenizers a run would load (without loading them)."""
    problems = []
    qwen = qwen_tokenizer_folder(qwen_tokenizer, model_path or PACKAGED_QWEN3_TOKENIZER)
    if not has_tokenizer_files(qwen, QWEN_FILE_SETS):
        problems.append(f"model.qwen3_tokenizer: {missing_tokenizer_message(qwen, 'Qwen3', 'model.qwen3_tokenizer')}")
    t5 = t5_tokenizer_folder(t5_tokenizer)
    if not has_tokenizer_files(t5, T5_FILE_SETS):
        problems.append(f"model.t5_tokenizer: {missing_tokenizer_message(t5, 'T5', 'model.t5_tokenizer')}")
    return problems


def _load_from_folder(folder: Path, label: str, file_sets, flag: str):
    from transformers import AutoTokenizer

    if not has_tokenizer_files(folder, file_sets):
        raise TokenizerNotFoundError(missing_tokenizer_message(folder, label, flag))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_qwen_tokenizer(tokenizer_path: str | os.PathLike | None, model_path: str | os.PathLike):
    """The Qwen3 tokenizer: ``tokenizer_path``, else the model folder, else the shipped Qwen3-0.6B tokenizer."""
    folder = qwen_tokenizer_folder(tokenizer_path, model_path)
    tokenizer = _load_from_folder(folder, "Qwen3", QWEN_FILE_SETS, "model.qwen3_tokenizer")
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_t5_tokenizer(tokenizer_path: str | os.PathLike | None):
    """The T5 tokenizer for the adapter's ids: ``tokenizer_path``, else the shipped google/t5-v1_1-xxl tokenizer."""
    tokenizer = _load_from_folder(t5_tokenizer_folder(tokenizer_path), "T5", T5_FILE_SETS, "model.t5_tokenizer")
    tokenizer.padding_side = "right"
    return tokenizer
