"""The text path: Qwen3-0.6B hidden states (source) plus T5 token ids (the adapter's queries)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from anima_core.errors import ModelFileError
from anima_core.models.checkpoint import is_meta, load_strict, read_state_dict
from anima_core.models.tokenizer_files import load_qwen_tokenizer, load_t5_tokenizer

log = logging.getLogger(__name__)

# Qwen3-0.6B(-Base), used when neither the model folder nor the tokenizer folder has a config.json.
QWEN3_06B_CONFIG = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "max_position_embeddings": 32768,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelFileError(f"{path}: the text encoder path does not exist. Check model.qwen3 in the profile.")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError(
            f"{path}: no .safetensors weights in this Qwen3 folder. Pass a Hugging Face Qwen3-0.6B folder or the "
            "single qwen_3_06b_base.safetensors file."
        )
    return files


def _qwen3_config(model_path: Path, tokenizer_path: Path | None):
    from transformers import Qwen3Config

    for folder in (model_path if model_path.is_dir() else None, tokenizer_path):
        if folder is not None and (folder / "config.json").is_file():
            values = json.loads((folder / "config.json").read_text())
            if values.get("model_type") == "qwen3":
                return Qwen3Config(**{k: v for k, v in values.items() if k != "architectures"})
    return Qwen3Config(**QWEN3_06B_CONFIG)


def _qwen3_state_dict(files: list[Path], header_only: bool) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(read_state_dict(file, "Qwen3 text encoder", header_only=header_only))
    state_dict.pop("lm_head.weight", None)  # tied to the embeddings; the encoder has no LM head
    if state_dict and all(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model.") :]: v for k, v in state_dict.items()}
    return state_dict


def load_qwen3_model(path: Path, tokenizer_path: Path | None, dtype: torch.dtype, device):
    from transformers import Qwen3Model

    files = _weight_files(path)
    state_dict = _qwen3_state_dict(files, header_only=is_meta(device))
    if "embed_tokens.weight" not in state_dict:
        raise ModelFileError(
            f"{files[0]}: this is not a Qwen3 text encoder (no embed_tokens.weight). Pass the Qwen3-0.6B file "
            "(qwen_3_06b_base.safetensors) or its Hugging Face folder as the text encoder."
        )
    config = _qwen3_config(path, tokenizer_path)
    with torch.device("meta"):
        model = Qwen3Model(config)
    # Like sd-scripts, extra tensors some exports carry are ignored (with a warning); missing ones are an error.
    expected = model.state_dict().keys()
    extra = sorted(set(state_dict) - set(expected))
    if extra:
        log.warning("%s: ignoring %d tensor(s) that Qwen3Model does not use: %s", files[0], len(extra), extra[:8])
    state_dict = {k: v.to(dtype) for k, v in state_dict.items() if k in expected}
    load_strict(model, state_dict, files[0], "Qwen3 text encoder")
    # The RoPE table is a buffer the file does not carry: build it for real (float32, as transformers does).
    model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.to(device=device).eval().requires_grad_(False)


class AnimaTextEncoder:
    """Qwen3 + tokenizers. ``.model`` is the transformers Qwen3Model (LoRA targets ``layers.N.self_attn.q_proj``...)."""

    def __init__(self, model, qwen_tokenizer, t5_tokenizer, identity: str):
        self.model = model
        self.qwen_tokenizer = qwen_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self._identity = identity

    def identity(self) -> str:
        """A stable string naming the weights, tokenizers and dtype (for cache keys)."""
        return f"{self._identity};dtype={self.model.dtype}"

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def tokenize(self, captions: list[str], qwen_max_length: int = 512, t5_max_length: int = 512):
        """(qwen_ids, qwen_mask, t5_ids, t5_mask), right padded to the max lengths; int64."""
        qwen = self.qwen_tokenizer(
            list(captions), padding="max_length", max_length=qwen_max_length, truncation=True, return_tensors="pt"
        )
        t5 = self.t5_tokenizer(
            list(captions), padding="max_length", max_length=t5_max_length, truncation=True, return_tensors="pt"
        )
        return qwen["input_ids"], qwen["attention_mask"], t5["input_ids"], t5["attention_mask"]

    def encode_tokens(self, qwen_ids: torch.Tensor, qwen_mask: torch.Tensor) -> torch.Tensor:
        """Qwen3 last hidden states with the masked (padding) rows exactly zero."""
        qwen_ids = qwen_ids.to(self.device)
        qwen_mask = qwen_mask.to(self.device)
        states = self.model(input_ids=qwen_ids, attention_mask=qwen_mask).last_hidden_state
        # An all-padding caption can yield NaN rows from softmax over nothing; where() drops them.
        return torch.where(qwen_mask.bool()[..., None], states, torch.zeros((), dtype=states.dtype, device=states.device))

    def encode(self, captions: list[str], qwen_max_length: int = 512, t5_max_length: int = 512):
        """(qwen_states B×L×D, qwen_mask B×L, t5_ids B×Lt, t5_mask B×Lt); an empty caption gives zero states."""
        qwen_ids, qwen_mask, t5_ids, t5_mask = self.tokenize(captions, qwen_max_length, t5_max_length)
        states = self.encode_tokens(qwen_ids, qwen_mask)
        device = states.device
        return states, qwen_mask.to(device), t5_ids.to(device), t5_mask.to(device)


def load_text_encoder(
    path: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    t5_tokenizer_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> AnimaTextEncoder:
    """Qwen3 from a Hugging Face folder or one ``.safetensors`` file, plus the Qwen3 and T5 tokenizers.

    For a single file the model config comes from the tokenizer folder's config.json, else Qwen3-0.6B's.
    """
    path = Path(path)
    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else None
    qwen_tokenizer = load_qwen_tokenizer(tok_dir, path)
    t5_tokenizer = load_t5_tokenizer(t5_tokenizer_path)
    model = load_qwen3_model(path, tok_dir, dtype, device)
    weights = ",".join(_file_identity(f) for f in _weight_files(path))
    identity = (
        f"qwen3={weights};qwen_tokenizer={qwen_tokenizer.name_or_path}:{len(qwen_tokenizer)};"
        f"t5_tokenizer={t5_tokenizer.name_or_path}:{len(t5_tokenizer)}"
    )
    return AnimaTextEncoder(model, qwen_tokenizer, t5_tokenizer, identity)
