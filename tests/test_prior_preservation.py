"""Prior-model preservation (training/prior.py): samples of subsets marked prior_preservation (or is_reg ones with
dataset.reg_prior_preservation) train toward the base model's own prediction, the DiT with the network's
adapters at multiplier 0, computed in the same step without grad, weighted by dataset.prior_loss_weight and
reported as the step event's prior_loss."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_tui_editor import row
from test_tui_monitor import fixed_system, plain, polled, stats_text
from textual.widgets import Switch
from test_tui_monitor import make_run as monitor_run
from test_tui_monitor import step as monitor_step
from training_helpers import make_run, read_events, tiny_profile_data, write_images

from anima_core.config import profile_from_dict
from anima_core.config.schema import NetworkTable, Profile
from anima_core.data import DataOptions, build_training_data
from anima_core.errors import AnimaError
from anima_core.hookspecs import hookimpl
from anima_core.models import load_dit
from anima_core.plugins import build_plugins
from anima_core.preflight import preflight
from anima_core.training.flow import LOSS_WEIGHTINGS
from anima_core.training.prior import PriorPass, switch_off_problem
from anima_core.training.step import StepInputs, noised_loss
from anima_core.training.step_report import merge_step_report
from anima_plugins.trackers.base import step_scalars
from anima_tui.app import AnimaApp, WatchApp
from anima_tui.plain_watch import format_event
from anima_tui.run_state import RunState
from anima_tui.widgets.line_plot import LinePlot

L2 = SimpleNamespace(loss_type="l2")
UNIFORM = LOSS_WEIGHTINGS["uniform"]


# ---- the loss on the real step code, against a hand computation ----------------------------------------------

@pytest.fixture
def dit_and_network(tiny_model):
    torch.manual_seed(0)
    dit = load_dit(tiny_model.dit, dtype=torch.float32)
    dit.requires_grad_(False)
    plugins = build_plugins(entry_points=False)
    cfg = NetworkTable(dim=4, alpha=4.0, train_unet_only=True)
    network = plugins.registry("register_networks").get("lora_anima")(cfg, dit=dit, text_encoder=None,
                                                                      train_text_encoder=False)
    network.apply_to()
    return dit, network


def step_inputs(batch: int, prior: list[bool], loss_weights: list[float]) -> StepInputs:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (batch, 8), generator=g)
    mask = torch.ones(batch, 8, dtype=torch.long)
    return StepInputs(torch.randn(batch, 16, 8, 8, generator=g), torch.randn(batch, 8, 64, generator=g), mask, ids, mask,
                      torch.tensor(loss_weights), None, torch.tensor(prior))


def velocity(dit, noisy, sigmas, inputs):
    return dit(noisy.unsqueeze(2), sigmas, inputs.qwen_states, target_input_ids=inputs.t5_ids,
               target_attention_mask=inputs.t5_mask, source_attention_mask=inputs.qwen_mask).squeeze(2)


def test_the_prior_loss_is_the_mse_to_the_lora_off_prediction(dit_and_network):
    dit, network = dit_and_network
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.normal_(0, 0.2)  # a trained LoRA: its prediction differs from the base model's
    inputs = step_inputs(3, [True, False, True], [0.5, 1.0, 0.5])  # prior_loss_weight 0.5 on the prior samples
    sigmas, noise = torch.tensor([0.3, 0.6, 0.8]), torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2))

    prior = PriorPass(network, 1.0)
    loss = noised_loss(dit, inputs, sigmas, noise, weighting=UNIFORM, cfg=L2, prior=prior)
    loss.backward()
    got = {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}
    network.zero_grad(set_to_none=True)

    # by hand: the same noised input, the base prediction with the LoRA at 0 as the target of samples 0 and 2
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * inputs.latents + s * noise
    network.set_multiplier(0.0)
    with torch.no_grad():
        base = velocity(dit, noisy, sigmas, inputs)
    network.set_multiplier(1.0)
    pred = velocity(dit, noisy, sigmas, inputs)
    assert not torch.allclose(pred.detach(), base, atol=1e-3)  # the LoRA matters here
    target = torch.stack([base[0], noise[1] - inputs.latents[1], base[2]])
    per_sample = ((pred - target) ** 2).flatten(1).mean(1)
    expected = (per_sample * torch.tensor([0.5, 1.0, 0.5])).mean()
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert prior.losses.tolist() == pytest.approx(per_sample.detach()[[0, 2]].tolist(), rel=1e-5)
    assert network.loras  # gradients flow through the LoRA-on prediction only, the target is a constant
    for name, p in network.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7)
    assert set(got) == {name for name, p in network.named_parameters() if p.grad is not None}
    assert network.loras[next(iter(network.loras))].multiplier == 1.0  # the batch's multiplier is back


def test_with_the_lora_at_zero_the_prior_loss_is_exactly_zero(dit_and_network):
    """lora_up starts at zero: the LoRA-on prediction is the base prediction, so a batch of prior samples has
    loss 0 and no gradient, exactly. A batch that mixes them with training samples computes the base prediction of
    its prior samples alone, a smaller matrix product, so there it is zero up to float rounding."""
    dit, network = dit_and_network
    sigmas, noise = torch.tensor([0.3, 0.7]), torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    prior = PriorPass(network, 1.0)
    loss = noised_loss(dit, step_inputs(2, [True, True], [1.0, 1.0]), sigmas, noise, weighting=UNIFORM, cfg=L2,
                       prior=prior)
    loss.backward()
    assert loss.item() == 0.0 and prior.losses.tolist() == [0.0, 0.0]
    assert all(p.grad is None or not p.grad.any() for p in network.parameters())

    mixed = PriorPass(network, 1.0)
    noised_loss(dit, step_inputs(2, [True, False], [1.0, 1.0]), sigmas, noise, weighting=UNIFORM, cfg=L2, prior=mixed)
    assert 0.0 <= float(mixed.losses[0]) < 1e-10


def test_prior_rows_without_a_prior_pass_are_refused(dit_and_network):
    dit, _ = dit_and_network
    with pytest.raises(ValueError, match="prior-preservation samples"):
        noised_loss(dit, step_inputs(1, [True], [1.0]), torch.tensor([0.5]), torch.zeros(1, 16, 8, 8),
                    weighting=UNIFORM, cfg=L2)


# ---- every network module switches off ---------------------------------------------------------------------

LYCORIS = {"lokr": {"algo": "lokr", "factor": 4}, "loha": {"algo": "loha"}, "locon": {"algo": "locon"},
           "full": {"algo": "full"}, "bypass": {"algo": "locon", "bypass_mode": True}}


@pytest.mark.parametrize("module", ["lora_anima", *LYCORIS, "dora"])
def test_at_multiplier_zero_every_network_is_the_base_model_but_dora_which_is_refused(tiny_model, module):
    if module != "lora_anima":
        pytest.importorskip("lycoris")
    dit = load_dit(tiny_model.dit, dtype=torch.float32)
    dit.requires_grad_(False)
    inputs = step_inputs(2, [False, False], [1.0, 1.0])
    noisy, sigmas = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        base = velocity(dit, noisy, sigmas, inputs)
    args = {"algo": "locon", "dora_wd": True} if module == "dora" else LYCORIS.get(module)
    cfg = NetworkTable(dim=4, alpha=4.0, module="lycoris" if args else "lora_anima", args=args or {})
    plugins = build_plugins(entry_points=False)
    network = plugins.registry("register_networks").get(cfg.module)(cfg, dit=dit, text_encoder=None,
                                                                    train_text_encoder=False)
    network.apply_to()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with PriorPass(network, 1.0).base_model():
        off = velocity(dit, noisy, sigmas, inputs)
    with torch.no_grad():
        on = velocity(dit, noisy, sigmas, inputs)
    assert not torch.allclose(on, base, atol=1e-4)
    why = switch_off_problem(Profile(network=cfg), plugins)
    if module == "dora":  # LyCORIS's DoRA at multiplier 0 keeps W + ΔW: not the base model, so refused
        assert not torch.allclose(off, base, atol=1e-4)
        assert why.startswith("network.args.dora_wd:") and "W + ΔW" in why
    else:
        assert torch.equal(off, base) and why is None


def test_the_base_prediction_leaves_the_random_streams_and_the_multiplier_as_they_were(dit_and_network):
    """LoRA dropouts of the training forward draw from the global RNG: the extra forward must not move it (LyCORIS
    modules draw their module dropout even at multiplier 0)."""
    dit, network = dit_and_network
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    with PriorPass(network, -0.5).base_model():
        assert all(lora.multiplier == 0.0 for lora in network.loras.values())
        torch.rand(100)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.rand(4), expected)
    assert all(lora.multiplier == -0.5 for lora in network.loras.values())  # the batch's network_multiplier


# ---- the data: which samples, their weight, is_reg subsets as in sd-scripts -------------------------------------

def _config(root, subsets: list[dict], **general) -> str:
    lines = ["[general]", 'caption_extension = ".txt"', "resolution = 64", "batch_size = 1",
             *(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in general.items()), "[[datasets]]"]
    for i, subset in enumerate(subsets):
        folder = write_images(root / f"set{i}", count=2, repeats=1) / "1_tiny"
        lines += ["[[datasets.subsets]]", f"image_dir = '{folder}'"]
        lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in subset.items()]
    path = root / "datasets.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _flags(data) -> dict[str, list]:
    """folder (set0, set1, ...) -> [(prior, loss weight)] of its samples in epoch 0."""
    found: dict[str, list] = {}
    for batch in data.epoch_batches(0):
        prior = batch.prior.tolist() if batch.prior is not None else [False] * len(batch.paths)
        for path, flag, weight in zip(batch.paths, prior, batch.loss_weights.tolist()):
            found.setdefault(path.split("/")[-3], []).append((flag, weight))
    return found


def test_reg_subsets_keep_their_images_unless_prior_preservation_is_asked(tmp_path):
    subsets = [{}, {"is_reg": True}, {"is_reg": True, "prior_preservation": False}, {"prior_preservation": True}]
    config = _config(tmp_path, subsets)
    for reg_prior in (False, True):
        opts = DataOptions(dataset_config=config, seed=3, prior_loss_weight=0.25, reg_prior_preservation=reg_prior)
        data = build_training_data(opts, base_dir=tmp_path)
        found = _flags(data)
        assert found["set0"] == [(False, 1.0)] * 2  # a training subset
        assert found["set1"] == [(reg_prior, 0.25)] * 2  # is_reg: images as sd-scripts trains them, or the base model
        assert found["set2"] == [(False, 0.25)] * 2  # its own key wins over the profile's
        assert found["set3"] == [(True, 0.25)] * 2  # a subset marked for it, not a regularisation one
        assert data.num_reg_images == 4 and data.num_train_images == 4  # is_reg counting and balance unchanged
        subsets_meta = json.loads(data.metadata()["ss_datasets"])[0]["subsets"]
        assert [s.get("prior_preservation", False) for s in subsets_meta] == [False, reg_prior, False, True]


def test_prior_subsets_are_never_held_out_for_validation(tmp_path):
    config = _config(tmp_path, [{}, {"prior_preservation": True}], validation_split=0.5)
    data = build_training_data(DataOptions(dataset_config=config, seed=3), base_dir=tmp_path)
    assert sorted(_flags(data)) == ["set0", "set1"] and len(_flags(data)["set1"]) == 2
    assert all("set1" not in path for batch in data.validation.epoch_batches(0) for path in batch.paths)


def test_the_folder_forms_reg_data_dir_follows_reg_prior_preservation(tmp_path, tiny_model):
    write_images(tmp_path / "data", count=2)
    write_images(tmp_path / "reg", count=2, repeats=1)
    for value in (False, True):
        data = tiny_profile_data(tmp_path, tiny_model, dataset={"reg_data_dir": str(tmp_path / "reg"),
                                                                "reg_prior_preservation": value})
        from anima_core.training.data_phase import data_options

        opts = data_options(profile_from_dict(data, plugins=build_plugins(entry_points=False)))
        built = build_training_data(opts, base_dir=tmp_path)
        flags = {(path.split("/")[-3], flag) for batch in built.epoch_batches(0)
                 for path, flag in zip(batch.paths, batch.prior.tolist() if batch.prior is not None else [False] * 9)}
        assert flags == {("data", False), ("reg", value)}


# ---- runs -----------------------------------------------------------------------------------------------------

def prior_run(root, tiny_model, name, *, steps=4, prior_loss_weight=1.0, **tables):
    """2 training images and 2 regularisation images (balanced to the 4 training samples), batch 2."""
    if not (root / "reg").exists():
        write_images(root / "reg", count=2, repeats=1)
    dataset = {"reg_data_dir": str(root / "reg"), "reg_prior_preservation": True, "prior_loss_weight": prior_loss_weight,
               **tables.pop("dataset", {})}
    trainer = make_run(root, tiny_model, dataset=dataset, training={"max_train_steps": steps, **tables.pop("training", {})},
                       logging={"run_name": name}, saving={"output_dir": str(root / "out" / name)}, **tables)
    return trainer, trainer.run()


def lora_distance(a, b) -> float:
    left, right = load_file(a), load_file(b)
    return sum(float((left[k].double() - right[k].double()).pow(2).sum()) for k in left) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("prior")
    return root, {name: prior_run(root, tiny_model, name, **tables)[1] for name, tables in {
        "prior": {}, "unweighted": {"prior_loss_weight": 0.0}, "one_step": {"steps": 1},
        "one_step_unweighted": {"steps": 1, "prior_loss_weight": 0.0},
        "checkpointed": {"memory": {"gradient_checkpointing": True, "blocks_to_swap": 2}},
        "unsloth": {"memory": {"unsloth_offload_checkpointing": True}},
    }.items()}


def test_a_run_trains_prior_samples_toward_the_base_model_and_reports_their_loss(runs):
    root, results = runs
    assert all(r.status == "finished" for r in results.values())
    steps = [e for e in read_events(results["prior"].run_dir) if e["type"] == "step"]
    prior = [e.get("prior_loss") for e in steps]
    # step 1: every sample of the first batch is a regularisation one and the LoRA is zero, so the base model's
    # prediction is the LoRA's: loss 0 exactly; a step without regularisation samples has no prior_loss
    assert steps[0]["loss"] == 0.0 and prior[0] == 0.0
    assert None in prior and any(v and v > 0 for v in prior)
    # A prior batch at a zero LoRA adds no gradient, weighted or not: one step trains the same LoRA either way
    # (a prior that trained toward the images would not) ...
    assert lora_distance(results["one_step"].lora_path, results["one_step_unweighted"].lora_path) == 0.0
    # ... and once the LoRA moves, the weighted prior loss pulls it (a target taken with the LoRA on would not)
    assert lora_distance(results["prior"].lora_path, results["unweighted"].lora_path) > 1e-4


def test_checkpointing_and_block_swap_see_the_no_grad_forward_and_train_the_same_lora(runs):
    _, results = runs
    reference = load_file(results["prior"].lora_path)
    size = sum(float(t.double().pow(2).sum()) for t in reference.values()) ** 0.5
    for name in ("checkpointed", "unsloth"):
        assert lora_distance(results[name].lora_path, results["prior"].lora_path) <= 1e-6 * size, name


def test_a_trained_text_encoder_is_switched_off_for_the_base_prediction_too(tmp_path, tiny_model):
    trainer, result = prior_run(tmp_path, tiny_model, "te", steps=3, network={"train_unet_only": False},
                                caching={"cache_text_encoder_outputs": False})
    assert result.status == "finished" and trainer.network.trains_text_encoder
    with torch.no_grad():
        for p in trainer.network.trainable_parameters():
            p.normal_(0, 0.2)
    batch = next(b for b in trainer.data.epoch_batches(0) if b.prior is not None)
    inputs = trainer._inputs(batch)
    prior = trainer.prior.for_batch(batch, inputs)
    with prior.base_model():
        conditioning = prior.conditioning(inputs)
    trainer.network.set_multiplier(0.0)
    with torch.no_grad():
        base_states = trainer.text_encoder.encode(batch.captions, 16, 16)[0]
    trainer.network.set_multiplier(1.0)
    assert torch.equal(conditioning.qwen_states, base_states)
    assert not torch.allclose(inputs.qwen_states.detach(), base_states, atol=1e-4)


# ---- several processes: the step's prior loss is the mean over its prior samples, however they are split ------

class Exchange:
    def __init__(self, others):
        self.others, self.is_main = others, True

    def exchange(self, mine):
        return [mine, *self.others]


class Tally:
    def __init__(self, total, count):
        self.value = (total, count)

    def take(self):
        return self.value


def test_the_prior_loss_of_a_step_does_not_depend_on_the_process_count():
    data = SimpleNamespace(take_pending=list, warning=print)
    losses = [torch.tensor(1.0)]
    one = merge_step_report(Exchange([]), torch.device("cpu"), losses, [], data, Tally(0.9, 3))
    other = {"loss": 0.0, "samples": [], "memory": {}, "warnings": [], "prior": (0.6, 2)}
    two = merge_step_report(Exchange([other]), torch.device("cpu"), losses, [], data, Tally(0.3, 1))
    assert one.prior_loss == pytest.approx(0.3) and two.prior_loss == pytest.approx(0.3)
    none = {"loss": 0.0, "samples": [], "memory": {}, "warnings": [], "prior": (0.0, 0)}
    assert merge_step_report(Exchange([none]), torch.device("cpu"), losses, [], data, Tally(0.0, 0)).prior_loss is None


# ---- the curve: events, trackers, the TUI ------------------------------------------------------------------

def test_the_prior_loss_reaches_trackers_the_monitor_and_the_plain_watch(tmp_path):
    with_prior = {"type": "step", "step": 2, "loss": 0.5, "loss_avg": 0.5, "lr": [1e-3], "prior_loss": 0.125}
    without = {"type": "step", "step": 3, "loss": 0.4, "loss_avg": 0.45, "lr": [1e-3]}
    assert step_scalars(with_prior)["loss/prior"] == 0.125 and "loss/prior" not in step_scalars(without)
    state = RunState()
    state.add([without, with_prior, without])
    assert state.prior_losses == [None, 0.125, None] and len(state.losses) == 3
    assert "prior 0.1250" in format_event(with_prior, {}) and "prior" not in format_event(without, {})
    asyncio.run(_monitor(tmp_path))


async def _monitor(tmp_path):
    # steps 1-12 without prior samples, then some with: the curve and its line appear, gaps and all
    lines = "".join(json.dumps({**monitor_step(n, 0.3), **({"prior_loss": 0.01 * n} if n % 2 else {})}) + "\n"
                    for n in range(13, 40))
    for run, shown in ((monitor_run(tmp_path / "plain"), False), (monitor_run(tmp_path / "prior", extra_lines=lines), True)):
        app = WatchApp(run, probe=fixed_system)
        async with app.run_test(size=(120, 40)) as pilot:
            await polled(pilot)
            plot = app.screen.query_one("#loss", LinePlot)
            assert ("prior in green" in plain(plot).splitlines()[0]) == shown
            assert (any(series.style == "bold green" for series in plot.series)) == shown
            assert ("prior 0.3900" in stats_text(app)) == shown


def test_the_editor_shows_the_profile_key_with_its_help(tmp_path):
    asyncio.run(_editor(tmp_path))


async def _editor(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[dataset]\nreg_prior_preservation = true\n")
    async with AnimaApp(path).run_test(size=(100, 40)) as pilot:
        field = await row(pilot, "dataset", "reg_prior_preservation")
        assert field.query_one(Switch).value is True
        assert "base model's own prediction" in str(field.query_one(".field-help").content)


# ---- validate and run refuse what they cannot honour ---------------------------------------------------------

class NoMultiplier:
    """A network plugin whose networks cannot scale their adapters."""

    class Network(torch.nn.Module):
        trains_text_encoder = False

    @hookimpl
    def register_networks(self, register):
        register("fixed_strength", self.Network)


def _problems(tmp_path, tiny_model, subsets, **tables):
    data = tiny_profile_data(tmp_path, tiny_model, **tables)
    data["dataset"] = {"dataset_config": _config(tmp_path, subsets)}
    plugins = build_plugins(entry_points=False, extra=(NoMultiplier(),))
    profile = profile_from_dict(data, plugins=plugins)
    return preflight(profile, plugins, scan_images=False).problems


def test_validate_reports_prior_preservation_it_cannot_honour(tmp_path, tiny_model):
    marked = [{}, {"is_reg": True, "prior_preservation": True}]
    assert _problems(tmp_path, tiny_model, marked) == []
    assert _problems(tmp_path, tiny_model, [{"is_reg": True}]) == []  # plain is_reg subsets need nothing
    (fixed,) = _problems(tmp_path, tiny_model, marked, network={"module": "fixed_strength"})
    assert fixed.startswith("network.module: 'fixed_strength' cannot scale its adapters")
    everything = _problems(tmp_path, tiny_model, [{"prior_preservation": True}])
    assert len(everything) == 1 and "the LoRA learns nothing" in everything[0]
    (full,) = _problems(tmp_path, tiny_model, marked, network={"module": "full", "dim": None, "alpha": None})
    assert full.startswith("network.module: 'full' trains the model's own weights") and "second copy" in full
    if importlib.util.find_spec("lycoris") is not None:
        (dora,) = _problems(tmp_path, tiny_model, marked,
                            network={"module": "lycoris", "args": {"algo": "locon", "dora_wd": True}})
        assert dora.startswith("network.args.dora_wd:")


def test_a_run_refuses_a_network_that_cannot_switch_off_before_training(tmp_path, tiny_model):
    pytest.importorskip("lycoris")
    with pytest.raises(AnimaError, match="prior preservation cannot run: network.args.dora_wd"):
        prior_run(tmp_path, tiny_model, "dora", network={"module": "lycoris", "args": {"algo": "locon", "dora_wd": True}})
