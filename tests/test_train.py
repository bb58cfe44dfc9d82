"""End-to-end tiny training on the CPU: the loss falls, files are complete, runs repeat exactly."""


import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import make_run, read_events, write_images


def test_tiny_run_learns_and_writes_everything(tmp_path, tiny_model):
    write_images(tmp_path / "data", count=1, repeats=4)
    result = make_run(tmp_path, tiny_model, training={"max_train_steps": 30, "seed": 3},
                      optimizer={"learning_rate": 3e-3}, network={"dim": 8, "alpha": 8.0},
                      saving={"save_every_n_steps": 10}).run()
    assert result.status == "finished" and result.step == 30
    events = read_events(result.run_dir)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and events[-1]["status"] == "finished"
    assert events[0]["num_processes"] == 1 and events[0]["process_group"] is None  # no launcher, no group
    assert all(e["v"] == 1 for e in events)
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8  # falling on a repeated image
    saves = [e for e in events if e["type"] == "save" and e["kind"] == "lora"]
    assert [s["step"] for s in saves] == [10, 20, 30]
    checks = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith("self-check of")]
    assert len(checks) == 3 and all("self-check ok" in m for m in checks)  # each saved LoRA reloaded and compared
    for name in ("profile.toml", "events.jsonl", "train.log"):
        assert (result.run_dir / name).is_file()
    assert oct(result.run_dir.stat().st_mode & 0o777) == "0o700"
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_module"] == "networks.lora_anima" or meta["ss_network_module"].endswith("lora_anima")
    assert meta["ss_network_dim"] == "8" and meta["ss_steps"] == "30"
    for key in ("ss_apply_t5_attn_mask", "ss_weighting_scheme", "ss_discrete_flow_shift", "ss_timestep_sample_method",
                "ss_sigmoid_scale", "ss_num_train_images", "sshs_model_hash", "modelspec.architecture"):
        assert key in meta, key
    assert meta["ss_discrete_flow_shift"] == "3.0" and meta["ss_timestep_sample_method"] == "logit_normal"
    assert any(k.startswith("lora_unet_blocks_0_self_attn_q_proj") for k in keys)


def test_same_seed_gives_identical_loras(tmp_path, tiny_model):
    files = []
    for name in ("a", "b"):
        result = make_run(tmp_path / name, tiny_model, training={"max_train_steps": 4, "caption_dropout_rate": 0.3}).run()
        files.append(load_file(result.lora_path))
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_uncached_run_with_accumulation_and_loss_options(tmp_path, tiny_model):
    result = make_run(
        tmp_path, tiny_model, caching={"cache_latents": False, "cache_text_encoder_outputs": False},
        training={"max_train_steps": 3, "gradient_accumulation_steps": 2, "loss_type": "huber",
                  "weighting_scheme": "cosmap", "timestep_sampling": "sigma", "ip_noise_gamma": 0.1},
        optimizer={"lr_scheduler": "cosine", "lr_warmup_steps": 1},
    ).run()
    assert result.status == "finished"
    steps = [e for e in read_events(result.run_dir) if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]


def test_text_encoder_lora_trains_when_not_cached(tmp_path, tiny_model):
    result = make_run(tmp_path, tiny_model, caching={"cache_text_encoder_outputs": False},
                      network={"train_unet_only": False}, training={"max_train_steps": 2}).run()
    tensors = load_file(result.lora_path)
    te_up = [k for k in tensors if k.startswith("text_encoders.qwen3_06b.transformer.model.layers.") and k.endswith("lora_up.weight")]
    assert te_up and any(tensors[k].abs().sum() > 0 for k in te_up)  # the Qwen3 LoRA was trained


def test_cache_only_exits_before_training(tmp_path, tiny_model):
    trainer = make_run(tmp_path, tiny_model, caching={"cache_latents_to_disk": True})
    trainer.cache_only = True
    result = trainer.run()
    assert result.status == "cached" and result.lora_path is None
    assert list((tmp_path / "data").rglob("*_anima.npz"))


@pytest.mark.parametrize("optimizer", [
    {"optimizer_type": "Adafactor", "optimizer_args": {"relative_step": False, "scale_parameter": False, "warmup_init": False},
     "fused_backward_pass": True, "max_grad_norm": 0.0, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 1},
    {"optimizer_type": "torch.optim.SGD", "optimizer_args": {"momentum": 0.9}, "lr_scheduler": "polynomial"},
], ids=["adafactor-fused", "module-class"])
def test_other_optimizers_train(tmp_path, tiny_model, optimizer):
    result = make_run(tmp_path, tiny_model, optimizer=optimizer, training={"max_train_steps": 3}).run()
    assert result.status == "finished"
    tensors = load_file(result.lora_path)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups)  # lora_up starts at zero: the optimizer stepped


def test_adamw8bit_without_cuda_suggests_adamw(tmp_path, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only message")
    from anima_core.errors import AnimaError

    with pytest.raises(AnimaError, match="optimizer_type = 'AdamW'"):
        make_run(tmp_path, tiny_model, optimizer={"optimizer_type": "AdamW8bit"}).run()


def test_signal_during_caching_stops_at_once_with_run_end(tmp_path, tiny_model):
    import os
    import signal

    from anima_core.hookspecs import hookimpl
    from anima_core.plugins import build_plugins

    class SignalWhileCaching:
        @hookimpl
        def register_event_sinks(self, register):
            def make(run_dir, profile):
                def sink(event):
                    if event.get("message") == "caching latents":
                        os.kill(os.getpid(), signal.SIGTERM)
                return sink
            register("signal_while_caching", make)

    plugins = build_plugins(entry_points=False, extra=(SignalWhileCaching(),))
    result = make_run(tmp_path, tiny_model, plugins=plugins).run()
    assert result.status == "stopped" and result.lora_path is None
    end = read_events(result.run_dir)[-1]
    assert end["type"] == "run_end" and end["status"] == "stopped" and "SIGTERM" in end["reason"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are given back


def test_an_image_that_breaks_during_training_is_reported_in_the_run(tmp_path, tiny_model):
    """img1 breaks after the scan (when the VAE loads, uncached): the steps that would train it skip it, and
    the run says so once (warnings after start-up used to go nowhere)."""
    from anima_plugins.anima_loader import AnimaLoader

    from anima_core.hookspecs import hookimpl
    from anima_core.plugins import build_plugins

    class Breaks(AnimaLoader):
        def load_vae(self, model_cfg, *, dtype, device):
            (tmp_path / "data" / "2_tiny" / "img1.png").write_bytes(b"not an image any more")
            return super().load_vae(model_cfg, dtype=dtype, device=device)

    class Plugin:
        @hookimpl
        def register_model_loaders(self, register):
            register("breaks", Breaks())

    result = make_run(tmp_path, tiny_model, plugins=build_plugins(entry_points=False, extra=(Plugin(),)),
                      model={"loader": "breaks"}, caching={"cache_latents": False},
                      training={"max_train_steps": 2}).run()
    assert result.status == "finished"
    warnings = [e["message"] for e in read_events(result.run_dir) if e["type"] == "warning"]
    assert len([w for w in warnings if "img1.png" in w and "skipped from now on" in w]) == 1, warnings
