"""Plugin discovery: built-ins and the ``anima_train`` entry-point group, through one pluggy manager."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from functools import lru_cache

import pluggy

from anima_core import hookspecs

BUILTIN_PLUGINS = (
    "anima_plugins.anima_loader",
    "anima_plugins.lora",
    "anima_plugins.lycoris",
    "anima_plugins.memory",
    "anima_plugins.flow",
    "anima_plugins.optimizers",
    "anima_plugins.event_sinks",
    "anima_plugins.trackers",
)

# hook name -> the kind of thing it registers, as shown by `anima-train plugins` and in errors.
KINDS = {
    "register_model_loaders": "model loader",
    "register_networks": "network",
    "register_memory_strategies": "memory strategy",
    "register_loss_weightings": "loss weighting",
    "register_timestep_samplers": "timestep sampler",
    "register_optimizers": "optimizer",
    "register_event_sinks": "event sink",
}


class UnknownNameError(LookupError):
    """A profile named something no plugin registered."""


@dataclass
class Entry:
    name: str
    obj: object
    plugin: str
    aliases: tuple[str, ...] = ()


@dataclass
class Registry:
    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        if entry.name in self.entries:
            other = self.entries[entry.name].plugin
            raise ValueError(
                f"{self.kind} {entry.name!r} is registered twice: by {other} and by {entry.plugin}"
            )
        self.entries[entry.name] = entry
        for alias in entry.aliases:
            self.aliases[alias] = entry.name

    def names(self) -> list[str]:
        return sorted(self.entries)

    def resolve(self, name: str) -> str:
        """The canonical name for ``name`` (aliases allowed), or UnknownNameError with a suggestion."""
        if name in self.entries:
            return name
        if name in self.aliases:
            return self.aliases[name]
        known = self.names() + sorted(self.aliases)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}."
        )

    def get(self, name: str) -> object:
        return self.entries[self.resolve(name)].obj


def _plugin_label(plugin: object, pm: pluggy.PluginManager) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    registries: dict[str, Registry]

    def registry(self, hook_name: str) -> Registry:
        return self.registries[hook_name]

    def describe(self) -> list[dict]:
        """One row per plugin: its name, distribution version and the hooks it implements."""
        versions = {
            _plugin_label(plugin, self.manager): dist.version
            for plugin, dist in self.manager.list_plugin_distinfo()
        }
        rows = []
        for plugin in self.manager.get_plugins():
            label = _plugin_label(plugin, self.manager)
            hooks = sorted(h.name for h in self.manager.get_hookcallers(plugin) or [])
            provided = [
                f"{reg.kind}: {e.name}"
                for reg in self.registries.values()
                for e in reg.entries.values()
                if e.plugin == label
            ]
            version = versions.get(label)
            if version is None and label.startswith("anima_plugins."):
                from anima_core import __version__ as version
            rows.append({"name": label, "version": version or "-", "hooks": hooks, "provides": provided})
        return sorted(rows, key=lambda r: r["name"])


def build_plugins(*, entry_points: bool = True, extra: tuple[object, ...] = ()) -> Plugins:
    """Load built-ins, installed plugin packages and ``extra`` plugin objects; fill the registries.

    A hook implementation whose name matches no hook spec (a typo) fails here, at start.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()

    registries = {hook: Registry(kind) for hook, kind in KINDS.items()}
    for hook_name, registry in registries.items():
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            label = _plugin_label(impl.plugin, pm)

            def register(name, obj, aliases=(), _label=label, _registry=registry):
                _registry.add(Entry(name, obj, _label, tuple(aliases)))

            impl.function(register=register)
    return Plugins(pm, registries)


@lru_cache(maxsize=1)
def default_plugins() -> Plugins:
    return build_plugins()


def names_for(hook_name: str) -> list[str]:
    """Registered names plus aliases for one hook, for profile validation messages."""
    registry = default_plugins().registry(hook_name)
    return registry.names() + sorted(registry.aliases)


def network_arg_help(module: object, args: object) -> dict[str, str]:
    """Help text per network arg from the network plugin ``module`` names (for the profile editor); empty when
    the plugin gives none, the name is unknown, or ``args`` is not a table yet."""
    try:
        network = default_plugins().registry("register_networks").get(str(module))
    except UnknownNameError:
        return {}
    helper = getattr(network, "arg_help", None)
    return helper(args) if helper is not None and isinstance(args, dict) else {}
