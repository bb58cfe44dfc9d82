"""Previews during a real tiny run: images at the expected steps, and the trained LoRA is unchanged by them."""

import torch
from safetensors.torch import load_file
from training_helpers import make_run, read_events


def test_previews_do_not_change_training(tmp_path, tiny_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\n1girl, tag0 --w 64 --h 64 --s 2 --d 5\nsimple background --n bad --w 64 --h 64 --s 2 --l 3.0\n")
    common = {"training": {"max_train_steps": 4}, "network": {"args": {"rank_dropout": 0.2}}}
    with_previews = make_run(tmp_path / "a", tiny_model, sampling={"sample_prompts": str(prompts), "sample_every_n_steps": 2,
                                                                   "sample_at_first": True}, **common).run()
    plain = make_run(tmp_path / "b", tiny_model, **common).run()

    samples = [e for e in read_events(with_previews.run_dir) if e["type"] == "sample"]
    assert sorted({e["step"] for e in samples}) == [0, 2, 4]
    assert len(samples) == 6 and all((with_previews.run_dir / "samples").joinpath(e["path"]).exists() for e in samples)

    a, b = load_file(with_previews.lora_path), load_file(plain.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
