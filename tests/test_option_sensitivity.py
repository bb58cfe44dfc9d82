"""No option that silently does nothing: each option below, set away from its default, trains a different LoRA
than the same run without it. (What each option must do exactly is tested beside its code; this file catches an
option that stops reaching the training at all.)

Runs are uncached so that image and caption options apply every step; two steps of batch 2 on the tiny model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import make_run, write_images

# Token limits long enough that captions are padded, never cut (byte-level test tokenizers: a token a character).
UNCACHED = {"caching": {"cache_latents": False, "cache_text_encoder_outputs": False},
            "model": {"qwen3_max_token_length": 96, "t5_max_token_length": 96}}
HUBER = {"training": {"loss_type": "huber"}}
SIGMA_TABLE = {"training": {"timestep_sampling": "sigma", "weighting_scheme": "logit_normal"}}
MODE = {"training": {"timestep_sampling": "sigma", "weighting_scheme": "mode"}}
SHUFFLED = {"dataset": {"shuffle_caption": True}}
IP_NOISE = {"training": {"ip_noise_gamma": 0.5}}

# (base, change): the change on top of the base must alter the trained LoRA.
CASES = {
    "timestep_sampling=uniform": ({}, {"training": {"timestep_sampling": "uniform"}}),
    "timestep_sampling=sigmoid": ({}, {"training": {"timestep_sampling": "sigmoid"}}),
    # "shift" is the guide's logit_normal without its clamp: told apart from the plain sigmoid it shifts.
    "timestep_sampling=shift": ({"training": {"timestep_sampling": "sigmoid"}}, {"training": {"timestep_sampling": "shift"}}),
    "timestep_sampling=flux_shift": ({}, {"training": {"timestep_sampling": "flux_shift"}}),
    "discrete_flow_shift": ({}, {"training": {"discrete_flow_shift": 1.0}}),
    "sigmoid_scale": ({}, {"training": {"sigmoid_scale": 2.0}}),
    "weighting_scheme=cosmap": ({}, {"training": {"weighting_scheme": "cosmap"}}),
    "weighting_scheme=sigma_sqrt": ({}, {"training": {"weighting_scheme": "sigma_sqrt"}}),
    "logit_mean": (SIGMA_TABLE, {"training": {"logit_mean": 1.0}}),
    "logit_std": (SIGMA_TABLE, {"training": {"logit_std": 2.0}}),
    "mode_scale": (MODE, {"training": {"mode_scale": 0.5}}),
    "loss_type=l1": ({}, {"training": {"loss_type": "l1"}}),
    "loss_type=huber": ({}, HUBER),
    "huber_c": (HUBER, {"training": {"huber_c": 0.5}}),
    "huber_scale": (HUBER, {"training": {"huber_scale": 2.0}}),
    "huber_schedule": (HUBER, {"training": {"huber_schedule": "exponential"}}),
    "ip_noise_gamma": ({}, IP_NOISE),
    "ip_noise_gamma_random_strength": (IP_NOISE, {"training": {"ip_noise_gamma_random_strength": True}}),
    "training.caption_dropout_rate": ({}, {"training": {"caption_dropout_rate": 0.5}}),
    "gradient_accumulation_steps": ({}, {"training": {"gradient_accumulation_steps": 2}}),
    "seed": ({}, {"training": {"seed": 8}}),
    "apply_t5_attn_mask": ({}, {"model": {"apply_t5_attn_mask": False}}),
    "qwen3_max_token_length": ({}, {"model": {"qwen3_max_token_length": 3}}),
    "t5_max_token_length": ({}, {"model": {"t5_max_token_length": 3}}),
    "network.dim": ({}, {"network": {"dim": 2}}),
    "network.alpha": ({}, {"network": {"alpha": 1.0}}),
    "network.dropout": ({}, {"network": {"dropout": 0.3}}),
    "rank_dropout": ({}, {"network": {"args": {"rank_dropout": 0.5}}}),
    "module_dropout": ({}, {"network": {"args": {"module_dropout": 0.5}}}),
    "train_block_indices": ({}, {"network": {"args": {"train_block_indices": "0-1"}}}),
    "learning_rate": ({}, {"optimizer": {"learning_rate": 3e-3}}),
    "unet_lr": ({}, {"optimizer": {"unet_lr": 3e-3}}),
    "mlp_lr": ({}, {"optimizer": {"mlp_lr": 3e-3}}),
    "self_attn_lr": ({}, {"optimizer": {"self_attn_lr": 3e-3}}),
    "cross_attn_lr": ({}, {"optimizer": {"cross_attn_lr": 3e-3}}),
    "max_grad_norm": ({}, {"optimizer": {"max_grad_norm": 1e-4}}),
    "optimizer_args.weight_decay": ({}, {"optimizer": {"optimizer_args": {"weight_decay": 0.9}}}),
    "flip_aug": ({}, {"dataset": {"flip_aug": True}}),
    # sd-scripts augments a third of the images: 16 samples leave it unused with probability 0.67^16 < 0.2 %.
    "color_aug": ({"training": {"max_train_steps": 8}}, {"dataset": {"color_aug": True}}),
    "caption_prefix": ({}, {"dataset": {"caption_prefix": "masterpiece"}}),
    "caption_suffix": ({}, {"dataset": {"caption_suffix": "sketch"}}),
    "shuffle_caption": ({}, SHUFFLED),
    "keep_tokens": (SHUFFLED, {"dataset": {"keep_tokens": 2}}),
    # with ";" as the separator the captions are one tag each: nothing left to shuffle
    "caption_separator": (SHUFFLED, {"dataset": {"caption_separator": ";"}}),
    "caption_tag_dropout_rate": ({}, {"dataset": {"caption_tag_dropout_rate": 0.5}}),
    "dataset.caption_dropout_rate": ({}, {"dataset": {"caption_dropout_rate": 0.5}}),
    "resolution": ({}, {"dataset": {"resolution": 32}}),
    # square images in a 64x32 frame: the centre crop against a random one
    "random_crop": ({"dataset": {"resolution": [64, 32]}}, {"dataset": {"random_crop": True}}),
}


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for table, values in layer.items():
            out.setdefault(table, {}).update(values)
    return out


@pytest.fixture(scope="module")
def train(tmp_path_factory, tiny_model):
    data = write_images(tmp_path_factory.mktemp("images") / "data", count=2)
    for i, caption in enumerate(sorted(data.rglob("*.txt"))):
        caption.write_text(f"1girl, tag{i}, red hair, smile, outdoors, simple background\n")
    done: dict[str, dict[str, torch.Tensor]] = {}

    def run(tables: dict) -> dict[str, torch.Tensor]:
        key = repr(sorted((t, sorted(v.items())) for t, v in tables.items()))
        if key not in done:
            root = tmp_path_factory.mktemp("run")
            (root / "data").symlink_to(data, target_is_directory=True)
            done[key] = load_file(make_run(root, tiny_model, **merged(
                UNCACHED, {"training": {"max_train_steps": 2}}, tables)).run().lora_path)
        return done[key]

    return run


@pytest.mark.parametrize("case", CASES)
def test_the_option_changes_the_trained_lora(train, case):
    base, change = CASES[case]
    before, after = train(base), train(merged(base, change))
    assert before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before), case
