"""Options whose effect has a size, measured: the share of LoRA modules a step skips, of ranks, captions and tags
dropped, of images flipped, where crops fall, how tags are shuffled, what the LoRA scale is.

test_option_sensitivity.py proves an option reaches the training (the LoRA differs); it cannot tell an option
that does its job from one that does something else (issue #32: module_dropout disabled at the line that
applies it left every test green). Each test here asserts what the option is documented to do. Shares are
counted over many draws from fixed seeds and compared with p within 4.5 binomial standard deviations: a correct
implementation fails that for fewer than 1 seed in 100,000, a rate off by the tolerance fails it always.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_lora_network import dit_inputs, net_cfg, opt_cfg, tiny_dit

from anima_core.data import DataOptions, build_training_data
from anima_core.data.captions import CaptionStep, process_caption
from anima_core.data.config import SubsetSpec
from anima_plugins.lora import create_network
from anima_plugins.lora.module import LoRAModule


def assert_share(hits: int, draws: int, p: float, what: str) -> None:
    tolerance = 4.5 * math.sqrt(p * (1 - p) / draws)
    assert abs(hits / draws - p) <= tolerance, f"{what}: {hits}/{draws} = {hits / draws:.3f}, expected {p} ± {tolerance:.3f}"


# ---- LoRA modules (plugins/lora/module.py) -----------------------------------------------------------------


def _count_branch_calls(network) -> list[int]:
    """A counter of LoRA branches run: lora_down is called once for each module that is not skipped."""
    calls = [0]
    for lora in network.loras.values():
        lora.lora_down.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _dit_forwards(dit, count: int) -> None:
    with torch.no_grad():
        for _ in range(count):
            dit(*dit_inputs())


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_module_dropout_skips_that_share_of_the_modules_in_training_only(p):
    """module_dropout: in a training step each LoRA module is skipped (its branch adds nothing) with probability p,
    independently; in eval mode, and at p = 0, every module runs."""
    dit = tiny_dit()
    network = create_network(net_cfg({"module_dropout": str(p), "target_preset": "sd-scripts"}), dit=dit,
                             text_encoder=None, train_text_encoder=False)
    network.apply_to()
    calls = _count_branch_calls(network)
    modules, forwards = len(network.loras), 50
    network.eval()
    _dit_forwards(dit, 3)
    assert calls[0] == 3 * modules  # every module's branch runs once a forward
    calls[0] = 0
    network.train()
    torch.manual_seed(11)
    _dit_forwards(dit, forwards)
    assert_share(forwards * modules - calls[0], forwards * modules, p, f"modules skipped at module_dropout {p}")

    plain_dit = tiny_dit()
    plain = create_network(net_cfg({"target_preset": "sd-scripts"}), dit=plain_dit, text_encoder=None,
                           train_text_encoder=False)
    plain.apply_to()
    plain_calls = _count_branch_calls(plain)
    plain.train()
    _dit_forwards(plain_dit, 5)
    assert plain_calls[0] == 5 * modules  # without module_dropout a training step runs every module


def test_a_skipped_module_gives_exactly_the_base_output_and_a_kept_one_the_whole_lora():
    linear = torch.nn.Linear(8, 6)
    lora = LoRAModule("x", linear, rank=4, alpha=2.0, module_dropout=0.5)
    torch.nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(5, 8)
    base = torch.nn.functional.linear(x, linear.weight, linear.bias)
    full = base + 0.5 * lora.lora_up(lora.lora_down(x))
    lora.train()
    torch.manual_seed(0)
    outs = [linear(x) for _ in range(400)]
    skipped = sum(torch.equal(out, base) for out in outs)
    kept = sum(torch.allclose(out, full, atol=1e-6) for out in outs)
    assert skipped + kept == len(outs)
    assert_share(skipped, len(outs), 0.5, "forwards skipped at module_dropout 0.5")
    lora.eval()
    assert all(torch.allclose(linear(x), full, atol=1e-6) for _ in range(20))
    lora.train()
    lora.module_dropout = 0.0
    assert all(torch.allclose(linear(x), full, atol=1e-6) for _ in range(20))


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_rank_dropout_zeroes_that_share_of_ranks_per_sample_and_rescales_the_rest(p):
    """rank_dropout: in training each (sample, rank) of the down projection is zeroed with probability p, the same
    for every token of the sample, and the kept ranks are scaled by 1 / (1 - p) so the expected output is the
    eval output."""
    rank, batch, tokens = 16, 64, 3
    linear = torch.nn.Linear(8, rank, bias=False)
    lora = LoRAModule("x", linear, rank=rank, alpha=4.0, multiplier=0.5, rank_dropout=p)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.eye(rank))  # the branch's output is its hidden state: ranks stay readable
    lora.apply_to()
    x = torch.randn(batch, tokens, 8)
    base, hidden = linear.weight @ x.unsqueeze(-1), lora.lora_down(x)
    base = base.squeeze(-1)
    scale = 0.5 * (4.0 / rank)
    lora.train()
    torch.manual_seed(3)
    with torch.no_grad():
        delta = linear(x) - base
    kept = torch.isclose(delta, hidden * scale / (1 - p), atol=1e-6)
    zeroed = delta.abs() <= 1e-7
    assert bool((kept | zeroed).all()), "each rank is either zeroed or kept at scale / (1 - p)"
    assert bool((zeroed == zeroed[:, :1]).all()), "one decision per sample and rank, for every token"
    assert_share(int(zeroed[:, 0].sum()), batch * rank, p, f"ranks zeroed at rank_dropout {p}")
    lora.eval()
    with torch.no_grad():
        assert torch.allclose(linear(x) - base, hidden * scale, atol=1e-6)


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_network_dropout_zeroes_that_share_of_the_hidden_elements_and_rescales_the_rest(p):
    """network.dropout: each element of the down projection's output is zeroed with probability p in training, the
    rest scaled by 1 / (1 - p); every module gets it."""
    dit = tiny_dit()
    network = create_network(net_cfg({"target_preset": "sd-scripts"}, dropout=p), dit=dit, text_encoder=None,
                             train_text_encoder=False)
    assert {lora.dropout for lora in network.loras.values()} == {p}
    rank = 16
    linear = torch.nn.Linear(8, rank, bias=False)
    lora = LoRAModule("x", linear, rank=rank, alpha=float(rank), dropout=p)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.eye(rank))
    lora.apply_to()
    x = torch.randn(128, 8)
    with torch.no_grad():
        base, hidden = x @ linear.weight.T, lora.lora_down(x)
        lora.train()
        torch.manual_seed(6)
        delta = linear(x) - base
    zeroed = delta.abs() <= 1e-7
    assert bool((zeroed | torch.isclose(delta, hidden / (1 - p), atol=1e-6)).all())
    assert_share(int(zeroed.sum()), zeroed.numel(), p, f"elements zeroed at dropout {p}")


@pytest.mark.parametrize(("alpha", "scale"), [(2.0, 2.0 / 8), (16.0, 2.0), (None, 1.0 / 8), (0, 1.0)])
def test_network_alpha_over_dim_is_the_scale_of_every_module(alpha, scale):
    """network.alpha / network.dim scales each module's up·down (sd-scripts: alpha defaults to 1, and 0 means no
    scaling); network.dim is every module's rank."""
    dit = tiny_dit()
    network = create_network(net_cfg({"target_preset": "sd-scripts"}, dim=8, alpha=alpha), dit=dit, text_encoder=None,
                             train_text_encoder=False)
    network.apply_to()
    network.eval()
    torch.manual_seed(4)
    for name, lora in network.loras.items():
        assert (lora.lora_down.out_features, lora.lora_up.in_features) == (8, 8), name
        torch.nn.init.normal_(lora.lora_up.weight)
        x = torch.randn(2, lora.lora_down.in_features)
        target = lora.target
        with torch.no_grad():
            delta = target(x) - torch.nn.functional.linear(x, target.weight, target.bias)
            assert torch.allclose(delta, scale * lora.lora_up(lora.lora_down(x)), atol=1e-5), name


# ---- captions (anima_core/data/captions.py) ------------------------------------------------------------------

AT = CaptionStep(epoch=1, step=0, max_train_steps=100)
TAGS = [f"t{i}" for i in range(8)]


def _captions(draws: int, caption: str = ", ".join(TAGS), at: CaptionStep = AT, **kw) -> list[str]:
    subset = SubsetSpec(image_dir=None, **kw)
    return [process_caption(subset, caption, at, np.random.default_rng(seed)) for seed in range(draws)]


@pytest.mark.parametrize("p", [0.2, 0.75])
def test_caption_dropout_rate_empties_that_share_of_the_captions(p):
    """caption_dropout_rate: each caption becomes "" with probability p, and is otherwise left whole."""
    outs = _captions(2000, caption_dropout_rate=p)
    assert set(outs) == {"", ", ".join(TAGS)}
    assert_share(outs.count(""), len(outs), p, f"captions dropped at caption_dropout_rate {p}")
    assert "" not in _captions(300)


@pytest.mark.parametrize("p", [0.2, 0.75])
def test_caption_tag_dropout_rate_drops_that_share_of_the_tags_after_keep_tokens(p):
    """caption_tag_dropout_rate: each tag after the first keep_tokens is dropped with probability p; the kept ones
    keep their order (no shuffle asked) and the first keep_tokens are never dropped."""
    outs = [o.split(", ") for o in _captions(500, caption_tag_dropout_rate=p, keep_tokens=2)]
    for tags in outs:
        assert tags[:2] == TAGS[:2] and tags[2:] == [t for t in TAGS[2:] if t in tags[2:]]
    dropped = sum(len(TAGS) - len(tags) for tags in outs)
    assert_share(dropped, 500 * (len(TAGS) - 2), p, f"tags dropped at caption_tag_dropout_rate {p}")


def test_shuffle_caption_puts_every_tag_at_every_position_equally_often_after_keep_tokens():
    """shuffle_caption: a uniform permutation of the tags after the first keep_tokens, which stay in place."""
    draws, keep = 3000, 2
    outs = [o.split(", ") for o in _captions(draws, shuffle_caption=True, keep_tokens=keep)]
    assert all(tags[:keep] == TAGS[:keep] and sorted(tags[keep:]) == TAGS[keep:] for tags in outs)
    flexible = len(TAGS) - keep
    for tag in TAGS[keep:]:
        for position in range(keep, len(TAGS)):
            hits = sum(tags[position] == tag for tags in outs)
            assert_share(hits, draws, 1 / flexible, f"{tag} at position {position}")
    # and the orders themselves are all drawn: 3000 draws of 720 orders see about 709 (a rotation would see 6)
    assert len({tuple(tags) for tags in outs}) >= 680
    assert _captions(5, keep_tokens=keep) == [", ".join(TAGS)] * 5  # keep_tokens alone reorders nothing


# ---- images (anima_core/data/training_data.py, images.py) ------------------------------------------------------


def _one_image(root: Path, w: int, h: int, repeats: int, caption: str = "a, b, c") -> np.ndarray:
    """A folder with one random image repeated `repeats` times an epoch; returns its pixels (HxWx3 uint8)."""
    folder = root / f"{repeats}_x"
    folder.mkdir(parents=True)
    array = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(array).save(folder / "img.png")
    (folder / "img.txt").write_text(caption)
    return array


def _data(root: Path, **kw):
    base = {"train_data_dir": str(root), "resolution": 64, "enable_bucket": False, "caption_extension": ".txt",
            "max_data_loader_n_workers": 0, "seed": 7, "train_batch_size": 1}
    return build_training_data(DataOptions(**{**base, **kw}), base_dir=root)


def _as_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("cached", [False, True], ids=["pixels", "cached latents"])
def test_flip_aug_mirrors_half_of_the_samples(tmp_path, cached):
    """flip_aug: each sample is the image or its left-right mirror, each with probability 1/2 (from the pixels, and
    from the cached plain and mirrored latents)."""
    from test_data_images import FakeVAE

    array = _one_image(tmp_path, 64, 64, repeats=400)
    data = _data(tmp_path, flip_aug=True)
    if cached:
        data.cache_latents(FakeVAE(), to_disk=False, batch_size=4, device="cpu")
        plain = FakeVAE().encode(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
        samples = [b.latents[0] for b in data.epoch_batches(0)]
        same, mirrored = (lambda s: torch.allclose(s, plain, atol=1e-5)), (lambda s: torch.allclose(s, plain.flip(-1), atol=1e-5))
    else:
        samples = [_as_uint8(b.pixels[0]) for b in data.epoch_batches(0)]
        same, mirrored = (lambda s: np.array_equal(s, array)), (lambda s: np.array_equal(s, array[:, ::-1]))
    flips = [mirrored(s) for s in samples]
    assert all(f or same(s) for f, s in zip(flips, samples))
    assert_share(sum(flips), len(samples), 0.5, "samples mirrored by flip_aug")
    if cached:  # the same samples are mirrored as when the pixels are loaded
        uncached = [np.array_equal(_as_uint8(b.pixels[0]), array[:, ::-1]) for b in _data(tmp_path, flip_aug=True).epoch_batches(0)]
        assert flips == uncached
    assert not any(np.array_equal(_as_uint8(b.pixels[0]), array[:, ::-1]) for b in _data(tmp_path).epoch_batches(0))


@pytest.mark.parametrize(("w", "h"), [(96, 64), (64, 96)])
def test_random_crop_offsets_are_uniform_over_the_slack_and_the_centre_crop_is_centred(tmp_path, w, h):
    """random_crop: the crop of an image larger than its bucket starts anywhere in 0..slack, uniformly; without it
    the crop is centred (offset slack // 2)."""
    array = _one_image(tmp_path, w, h, repeats=600)
    slack = max(w, h) - 64

    crops = [array[:, o:o + 64] if w > h else array[o:o + 64] for o in range(slack + 1)]

    def offsets(data) -> list[int]:
        found = []
        for batch in data.epoch_batches(0):
            got = _as_uint8(batch.pixels[0])
            (offset,) = [o for o, crop in enumerate(crops) if np.array_equal(got[:2, :2], crop[:2, :2])]
            assert np.array_equal(got, crops[offset])
            found.append(offset)
        return found

    assert set(offsets(_data(tmp_path))) == {slack // 2}
    drawn = offsets(_data(tmp_path, random_crop=True))
    assert min(drawn) == 0 and max(drawn) == slack  # each end is missed with probability (32/33)^600 < 1e-7
    sd_of_mean = math.sqrt(((slack + 1) ** 2 - 1) / 12 / len(drawn))
    assert abs(np.mean(drawn) - slack / 2) <= 4.5 * sd_of_mean
    assert_share(sum(o < (slack + 1) // 3 for o in drawn), len(drawn), ((slack + 1) // 3) / (slack + 1),
                 "offsets in the first third")


def test_color_aug_changes_a_third_of_the_samples(tmp_path):
    """color_aug (sd-scripts): a third of the samples get a hue shift or a gamma, the rest are left as they are."""
    array = _one_image(tmp_path, 64, 64, repeats=600)
    changed = [not np.array_equal(_as_uint8(b.pixels[0]), array) for b in _data(tmp_path, color_aug=True).epoch_batches(0)]
    assert_share(sum(changed), len(changed), 0.33, "samples colour-augmented")


def test_caption_dropout_rate_with_cached_text_empties_that_share(tmp_path):
    from test_data_images import FakeTextEncoder

    _one_image(tmp_path, 64, 64, repeats=600)
    data = _data(tmp_path, caption_dropout_rate=0.3, qwen3_max_token_length=8, t5_max_token_length=6)
    data.cache_text(FakeTextEncoder(), to_disk=False, batch_size=2)
    batches = list(data.epoch_batches(0))
    dropped = [b.captions == [""] for b in batches]
    assert all(not b.text[0].any() for b, d in zip(batches, dropped) if d)
    assert all(b.text[0].any() for b, d in zip(batches, dropped) if not d)
    assert_share(sum(dropped), len(dropped), 0.3, "cached captions dropped")


# ---- the optimizer step (a tiny run through the trainer) -------------------------------------------------------


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory, tiny_model):
    """The LoRA after one step of plain SGD (lr 1 and no clipping unless set); runs cached. lora_up starts at zero,
    so after the step it is minus the (clipped) gradient times the rate, and lora_down gets no gradient."""
    from safetensors.torch import load_file
    from training_helpers import make_run

    done: dict[str, dict[str, torch.Tensor]] = {}

    def run(**optimizer) -> dict[str, torch.Tensor]:
        key = repr(sorted(optimizer.items()))
        if key not in done:
            settings = {"optimizer_type": "SGD", "learning_rate": 1.0, "max_grad_norm": 0.0, **optimizer}
            trainer = make_run(tmp_path_factory.mktemp("sgd"), tiny_model, training={"max_train_steps": 1}, optimizer=settings)
            done[key] = load_file(trainer.run().lora_path)
        return done[key]

    return run


def _flat(tensors: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
    return torch.cat([tensors[k].flatten().double() for k in sorted(tensors) if k.endswith(suffix)])


@pytest.fixture
def sgd_step(sgd_run):
    """The lora_up weights after one SGD step, flattened in key order."""
    return lambda **optimizer: _flat(sgd_run(**optimizer), "lora_up.weight")


def test_max_grad_norm_is_the_norm_of_the_clipped_gradient(sgd_step):
    """max_grad_norm clips the whole gradient to that norm: after one SGD step at lr 1 the up weights have norm
    max_grad_norm, in the direction of the unclipped step."""
    free, clipped = sgd_step(), sgd_step(max_grad_norm=1e-3)
    assert float(free.norm()) > 1e-2  # the gradient is well above the limit, so clipping acts
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-4)
    assert torch.allclose(clipped, free * (1e-3 / free.norm()), rtol=1e-4, atol=1e-12)


def test_learning_rate_and_unet_lr_scale_the_step(sgd_step):
    """learning_rate is the step size (SGD: the update is rate x gradient); unet_lr replaces it for the DiT's LoRA."""
    full = sgd_step()
    assert float(full.norm()) > 0
    assert torch.allclose(sgd_step(learning_rate=0.25), 0.25 * full, rtol=1e-5, atol=1e-12)
    assert torch.allclose(sgd_step(unet_lr=0.25), 0.25 * full, rtol=1e-5, atol=1e-12)


def test_optimizer_args_reach_the_optimizer_weight_decay_shrinks_lora_down_by_lr_times_it(sgd_run):
    """optimizer_args are the optimizer's keyword arguments: SGD's weight_decay 0.1 at lr 1 turns the first step of
    lora_down (no gradient yet) into exactly down * (1 - 0.1), and leaves lora_up's step (it starts at zero) alone."""
    free, decayed = sgd_run(), sgd_run(optimizer_args={"weight_decay": 0.1})
    assert torch.allclose(_flat(decayed, "lora_down.weight"), 0.9 * _flat(free, "lora_down.weight"), rtol=1e-6, atol=0)
    assert torch.allclose(_flat(decayed, "lora_up.weight"), _flat(free, "lora_up.weight"), rtol=1e-6, atol=1e-12)


def test_cross_attn_lr_is_the_rate_of_exactly_the_cross_attention_modules():
    dit = tiny_dit()
    network = create_network(net_cfg(), dit=dit, text_encoder=None, train_text_encoder=False)
    groups = {g["name"]: g for g in network.param_groups(opt_cfg(learning_rate=1e-4, cross_attn_lr=3e-5))}
    assert groups["cross_attn"]["lr"] == pytest.approx(3e-5)
    assert {g["lr"] for name, g in groups.items() if name != "cross_attn"} == {1e-4}  # the rest keep learning_rate
    cross = {id(p) for name, lora in network.loras.items() if "cross_attn" in name and "adaln" not in name
             for p in lora.parameters()}
    assert cross and {id(p) for p in groups["cross_attn"]["params"]} == cross


# ---- text lengths (the text encoder, and the options handed to caching) -------------------------------------


def test_token_lengths_pad_and_cut_the_encoded_text_to_that_many_tokens(tiny_model):
    """qwen3_max_token_length / t5_max_token_length: the Qwen3 states and the T5 ids have exactly that many tokens,
    a longer caption is cut (its first tokens are the same states as uncut: Qwen3 is causal) and T5 keeps </s>
    last; the profile's values are the ones the text cache encodes with."""
    from anima_core.config.schema import ModelTable, Profile
    from anima_core.models import load_text_encoder
    from anima_core.training.data_phase import data_options

    te = load_text_encoder(tiny_model.qwen3, t5_tokenizer_path=tiny_model.t5_tokenizer, dtype=torch.float32)
    caption = ["1girl, red hair, smile, outdoors, simple background, looking at viewer"]
    states, mask, t5_ids, t5_mask = te.encode(caption, qwen_max_length=5, t5_max_length=4)
    long_states, long_mask, long_ids, _ = te.encode(caption, qwen_max_length=64, t5_max_length=64)
    assert states.shape[1] == 5 and mask.tolist() == [[1] * 5] and int(long_mask.sum()) > 5
    assert torch.allclose(states, long_states[:, :5], atol=1e-5)
    assert t5_ids.shape[1] == 4 and t5_mask.tolist() == [[1] * 4]
    assert t5_ids[0, :3].tolist() == long_ids[0, :3].tolist() and int(t5_ids[0, 3]) == 1  # </s> closes the cut ids
    padded = te.encode(["a cat"], qwen_max_length=12, t5_max_length=9)
    assert padded[0].shape[1] == 12 and padded[2].shape[1] == 9
    opts = data_options(Profile(model=ModelTable(qwen3_max_token_length=77, t5_max_token_length=33)))
    assert (opts.qwen3_max_token_length, opts.t5_max_token_length) == (77, 33)


def test_the_step_reports_the_gradient_norm_before_clipping_with_or_without_it(tmp_path, tiny_model):
    """lora_up starts at zero and lora_down gets no gradient in the first step, so after one SGD step at lr 1 the
    whole gradient is minus lora_up: the step event's grad_norm is its norm, unclipped or (reported before
    clipping) clipped. An unclipped run's norm is also what catches a non-finite gradient."""
    from safetensors.torch import load_file
    from training_helpers import make_run, read_events

    def step(name, max_grad_norm):
        result = make_run(tmp_path / name, tiny_model, training={"max_train_steps": 1},
                          optimizer={"optimizer_type": "SGD", "learning_rate": 1.0, "max_grad_norm": max_grad_norm}).run()
        (event,) = [e for e in read_events(result.run_dir) if e["type"] == "step"]
        return event["grad_norm"], float(_flat(load_file(result.lora_path), "lora_up.weight").norm())

    reported, update = step("free", 0.0)
    assert update > 1e-2 and reported == pytest.approx(update, rel=1e-5)
    clipped_report, clipped_update = step("clipped", 1e-3)
    assert clipped_report == pytest.approx(reported, rel=1e-5) and clipped_update == pytest.approx(1e-3, rel=1e-4)
