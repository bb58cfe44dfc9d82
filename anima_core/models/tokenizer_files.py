"""Finding the Qwen3 and T5 tokenizers. The project ships none: a user path, else the Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

from anima_core.errors import TokenizerNotFoundError

QWEN_REPO = "Qwen/Qwen3-0.6B"
T5_REPO = "google/t5-v1_1-xxl"
# Either set is enough for transformers to build the tokenizer.
QWEN_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
T5_FILE_SETS = (("tokenizer.json",), ("spiece.model",))


def has_tokenizer_files(folder: Path, file_sets: tuple[tuple[str, ...], ...]) -> bool:
    return folder.is_dir() and any(all((folder / name).is_file() for name in names) for names in file_sets)


def _describe(file_sets) -> str:
    return " or ".join(" + ".join(names) for names in file_sets)


def _load_from_folder(folder: Path, label: str, file_sets, flag: str):
    from transformers import AutoTokenizer

    if not has_tokenizer_files(folder, file_sets):
        raise TokenizerNotFoundError(
            f"{folder}: no {label} tokenizer files here (need {_describe(file_sets)}). Point {flag} at a folder "
            f"that has them, e.g. a download of the tokenizer files of {QWEN_REPO if label == 'Qwen3' else T5_REPO}."
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _load_from_cache(repo: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(repo, local_files_only=True)
    except (OSError, ValueError):
        return None


def load_qwen_tokenizer(tokenizer_path: str | os.PathLike | None, model_path: str | os.PathLike):
    """The Qwen3 tokenizer: ``tokenizer_path``, else the model folder, else the HF cache of Qwen/Qwen3-0.6B."""
    if tokenizer_path is not None:
        tokenizer = _load_from_folder(Path(tokenizer_path), "Qwen3", QWEN_FILE_SETS, "model.qwen3_tokenizer")
    elif has_tokenizer_files(Path(model_path), QWEN_FILE_SETS):
        tokenizer = _load_from_folder(Path(model_path), "Qwen3", QWEN_FILE_SETS, "model.qwen3_tokenizer")
    else:
        tokenizer = _load_from_cache(QWEN_REPO)
        if tokenizer is None:
            raise TokenizerNotFoundError(
                f"{model_path}: no Qwen3 tokenizer found (not next to the text encoder, not given as "
                f"model.qwen3_tokenizer, not in the Hugging Face cache). Download it once with "
                f"`huggingface-cli download {QWEN_REPO} tokenizer.json tokenizer_config.json vocab.json merges.txt "
                f"config.json` (it lands in the HF cache), or put those files in a folder and set "
                f"model.qwen3_tokenizer to it."
            )
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_t5_tokenizer(tokenizer_path: str | os.PathLike | None):
    """The T5 tokenizer for the adapter's ids: ``tokenizer_path``, else the HF cache of google/t5-v1_1-xxl."""
    if tokenizer_path is not None:
        tokenizer = _load_from_folder(Path(tokenizer_path), "T5", T5_FILE_SETS, "model.t5_tokenizer")
    else:
        tokenizer = _load_from_cache(T5_REPO)
        if tokenizer is None:
            raise TokenizerNotFoundError(
                f"no T5 tokenizer found (model.t5_tokenizer is not set and {T5_REPO} is not in the Hugging Face "
                f"cache). Download it once with `huggingface-cli download {T5_REPO} spiece.model "
                f"tokenizer_config.json special_tokens_map.json` (it lands in the HF cache), or put spiece.model "
                f"(or tokenizer.json) in a folder and set model.t5_tokenizer to it."
            )
    tokenizer.padding_side = "right"
    return tokenizer
