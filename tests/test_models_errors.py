"""Bad files give one-paragraph errors that name the file and the fix; the adapter can come from its own file."""

from __future__ import annotations

import pytest
import torch

from anima_core.errors import AnimaError, ModelFileError, TokenizerNotFoundError
from anima_core.models import load_dit, load_text_encoder, load_vae
from anima_core.models.checkpoint import read_state_dict, save_safetensors_atomic


def assert_one_paragraph(err: AnimaError, *fragments: str) -> None:
    message = str(err)
    assert isinstance(err, AnimaError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_truncated_dit(tiny_model, tmp_path):
    broken = tmp_path / "anima-truncated.safetensors"
    data = tiny_model.dit.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as err:
        load_dit(broken)
    assert_one_paragraph(err.value, str(broken), "truncated", "download it again")


def test_vae_passed_as_dit(tiny_model):
    with pytest.raises(ModelFileError) as err:
        load_dit(tiny_model.vae)
    assert_one_paragraph(err.value, str(tiny_model.vae), "not an Anima DiT", "looks like a VAE")


def test_text_encoder_passed_as_dit_and_dit_passed_as_vae(tiny_model):
    with pytest.raises(ModelFileError) as err:
        load_dit(tiny_model.qwen3 / "model.safetensors")
    assert_one_paragraph(err.value, "Qwen3 text encoder")
    with pytest.raises(ModelFileError) as err:
        load_vae(tiny_model.dit)
    assert_one_paragraph(err.value, str(tiny_model.dit), "not a Qwen-Image / Wan 2.1 VAE")
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(tiny_model.dit, tokenizer_path=tiny_model.qwen_tokenizer,
                          t5_tokenizer_path=tiny_model.t5_tokenizer)  # fmt: skip
    assert_one_paragraph(err.value, str(tiny_model.dit), "not a Qwen3 text encoder")


def test_missing_and_unexpected_keys_are_listed(tiny_model, tmp_path):
    state_dict = read_state_dict(tiny_model.dit, "DiT")
    del state_dict["net.blocks.2.mlp.layer2.weight"]
    state_dict["net.blocks.1.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "anima-edited.safetensors"
    save_safetensors_atomic(state_dict, broken)
    with pytest.raises(ModelFileError) as err:
        load_dit(broken)
    assert_one_paragraph(
        err.value, str(broken), "1 missing key(s): blocks.2.mlp.layer2.weight",
        "1 unexpected key(s): blocks.1.extra.weight", "use the released file",
    )  # fmt: skip


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError) as err:
        load_vae(tmp_path / "nope.safetensors")
    assert_one_paragraph(err.value, "nope.safetensors", "does not exist")


def test_tokenizer_folder_without_tokenizer_files(tiny_model, tmp_path):
    empty = tmp_path / "qwen_tokenizer"
    empty.mkdir()
    with pytest.raises(TokenizerNotFoundError) as err:
        load_text_encoder(tiny_model.qwen3, tokenizer_path=empty, t5_tokenizer_path=tiny_model.t5_tokenizer)
    assert_one_paragraph(err.value, str(empty), "vocab.json + merges.txt", "model.qwen3_tokenizer")
    with pytest.raises(TokenizerNotFoundError) as err:
        load_text_encoder(tiny_model.qwen3, t5_tokenizer_path=empty)
    assert_one_paragraph(err.value, str(empty), "spiece.model", "model.t5_tokenizer")


def test_adapter_from_a_separate_file(tiny_model, tmp_path):
    state_dict = read_state_dict(tiny_model.dit, "DiT")
    dit_only = {k: v for k, v in state_dict.items() if not k.startswith("net.llm_adapter.")}
    adapter = {k[len("net.llm_adapter.") :]: v for k, v in state_dict.items() if k.startswith("net.llm_adapter.")}
    save_safetensors_atomic(dit_only, tmp_path / "dit.safetensors")
    save_safetensors_atomic(adapter, tmp_path / "adapter.safetensors")

    bare = load_dit(tmp_path / "dit.safetensors", dtype=torch.float32)
    assert bare.llm_adapter is None
    with pytest.raises(ValueError, match="no LLM adapter"):
        bare(torch.zeros(1, 16, 1, 4, 4), torch.zeros(1), torch.zeros(1, 4, 64), target_input_ids=torch.ones(1, 4).long())

    combined = load_dit(tmp_path / "dit.safetensors", llm_adapter_path=tmp_path / "adapter.safetensors",
                        dtype=torch.float32)  # fmt: skip
    full = load_dit(tiny_model.dit, dtype=torch.float32)
    for (name, a), (_, b) in zip(sorted(combined.state_dict().items()), sorted(full.state_dict().items())):
        assert torch.equal(a, b), name
    with pytest.raises(ModelFileError) as err:
        load_dit(tmp_path / "dit.safetensors", llm_adapter_path=tiny_model.vae)
    assert_one_paragraph(err.value, str(tiny_model.vae), "not an Anima LLM adapter")


def test_qwen3_file_missing_a_tensor_names_it_and_extra_tensors_are_ignored(tiny_model, tmp_path):
    state_dict = read_state_dict(tiny_model.qwen3 / "model.safetensors", "Qwen3")
    state_dict["model.spiece_model"] = torch.zeros(3)
    save_safetensors_atomic(state_dict, tmp_path / "extra.safetensors")
    load_text_encoder(tmp_path / "extra.safetensors", tokenizer_path=tiny_model.qwen_tokenizer,
                      t5_tokenizer_path=tiny_model.t5_tokenizer)  # fmt: skip
    del state_dict["model.layers.1.mlp.up_proj.weight"]
    save_safetensors_atomic(state_dict, tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(tmp_path / "missing.safetensors", tokenizer_path=tiny_model.qwen_tokenizer,
                          t5_tokenizer_path=tiny_model.t5_tokenizer)  # fmt: skip
    assert_one_paragraph(err.value, "missing.safetensors", "1 missing key(s): layers.1.mlp.up_proj.weight")
