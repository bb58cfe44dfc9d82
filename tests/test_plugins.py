"""Plugin discovery: built-ins through the hooks, a third-party package through its entry point, typos caught."""

import sys
import textwrap

import pluggy
import pytest

from anima_core.cli import main
from anima_core.hookspecs import hookimpl
from anima_core.plugins import build_plugins


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A tiny plugin distribution on sys.path: a module plus dist-info with an `anima_train` entry point."""
    site = tmp_path / "site"
    (site / "anima_extra_weighting").mkdir(parents=True)
    (site / "anima_extra_weighting" / "__init__.py").write_text(textwrap.dedent('''
        from anima_core.hookspecs import hookimpl

        def half_weight(sigmas):
            return sigmas * 0 + 0.5

        @hookimpl
        def register_loss_weightings(register):
            register("half", half_weight)
    '''))
    dist = site / "anima_extra_weighting-0.3.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: anima-extra-weighting\nVersion: 0.3.1\n")
    (dist / "entry_points.txt").write_text("[anima_train]\nextra_weighting = anima_extra_weighting\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("anima_extra_weighting", None)


def test_builtins_register_through_the_hooks():
    plugins = build_plugins(entry_points=False)
    assert plugins.registry("register_networks").resolve("networks.lora_anima") == "lora_anima"
    assert "anima" in plugins.registry("register_model_loaders").names()
    assert {"logit_normal", "sigmoid", "flux_shift", "sigma"} <= set(plugins.registry("register_timestep_samplers").names())
    assert {"AdamW", "AdamW8bit", "Adafactor"} <= set(plugins.registry("register_optimizers").names())
    assert "gradient_checkpointing" in plugins.registry("register_memory_strategies").names()


def test_third_party_plugin_is_found_through_its_entry_point(installed_plugin):
    plugins = build_plugins()
    entry = plugins.registry("register_loss_weightings").entries["half"]
    assert entry.plugin == "extra_weighting"
    rows = {row["name"]: row for row in plugins.describe()}
    assert rows["extra_weighting"]["version"] == "0.3.1"
    assert rows["extra_weighting"]["hooks"] == ["register_loss_weightings"]


def test_profile_selects_the_third_party_weighting_by_name(installed_plugin, tmp_path, tiny_model):
    from training_helpers import make_run, read_events

    plugins = build_plugins()
    result = make_run(tmp_path, tiny_model, plugins=plugins, training={"max_train_steps": 2, "loss_weighting": "half"}).run()
    assert result.status == "finished"
    # The same run with uniform weighting has exactly twice the loss: the plugin's weight was used.
    baseline = make_run(tmp_path / "b", tiny_model, plugins=plugins, training={"max_train_steps": 1}).run()
    half = [e["loss"] for e in read_events(result.run_dir) if e["type"] == "step"][0]
    full = [e["loss"] for e in read_events(baseline.run_dir) if e["type"] == "step"][0]
    assert half == pytest.approx(full / 2, rel=1e-5)


def test_misspelt_hook_fails_at_start():
    class Typo:
        @hookimpl
        def register_loss_weighting(self, register):  # missing the final "s"
            register("x", lambda s: s)

    with pytest.raises(pluggy.PluginValidationError):
        build_plugins(entry_points=False, extra=(Typo(),))


def test_duplicate_names_are_refused():
    class Clash:
        @hookimpl
        def register_optimizers(self, register):
            register("AdamW", object())

    with pytest.raises(ValueError, match="registered twice"):
        build_plugins(entry_points=False, extra=(Clash(),))


def test_plugins_command_lists_versions_and_hooks(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "anima_plugins.lora" in out and "register_networks" in out
    assert "network: lora_anima" in out


def test_every_contract_the_hookspecs_name_exists():
    """The hook docs point plugin authors at real classes: a renamed or missing one fails here."""
    import importlib
    import re

    from anima_core import hookspecs

    named = set(re.findall(r"``(anima_core(?:\.\w+)+)``", "\n".join(
        f.__doc__ or "" for f in vars(hookspecs).values() if callable(f))))
    assert "anima_core.training.network.Network" in named
    for dotted in named:
        module, _, attr = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), dotted


def test_the_builtin_networks_follow_the_network_contract(tiny_model):
    import torch

    from anima_core.config.schema import NetworkTable
    from anima_core.models import load_dit
    from anima_core.training.network import Network

    plugins = build_plugins(entry_points=False)
    dit = load_dit(tiny_model.dit, dtype=torch.float32)
    for name, entry in plugins.registry("register_networks").entries.items():
        network = entry.obj(NetworkTable(dim=2, alpha=2), dit=dit, text_encoder=None, train_text_encoder=False)
        assert isinstance(network, Network), name
