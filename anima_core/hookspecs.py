"""The hooks a plugin may implement, in the order a run calls them.

Every hook receives a ``register`` callable. A plugin calls it once per thing it provides:
``register(name, obj, aliases=())``. Built-in plugins use exactly these hooks.
"""

import pluggy

PROJECT = "anima_train"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_model_loaders(register):
    """Model loaders: objects with ``load_dit(model_cfg, *, dtype, device)``,
    ``load_vae(model_cfg, *, dtype, device)`` and ``load_text_encoder(model_cfg, *, dtype, device)``."""


@hookspec
def register_networks(register):
    """Network modules: callables ``create(network_cfg, *, dit, text_encoder, train_text_encoder)``
    returning an object that follows ``anima_core.training.network.Network``. A network may also offer
    ``self_check(path)``, run after every save."""


@hookspec
def register_memory_strategies(register):
    """Memory strategies: classes following ``anima_core.training.memory.MemoryStrategy``."""


@hookspec
def register_loss_weightings(register):
    """Loss weightings: ``weight(sigmas: Tensor[B]) -> Tensor[B]``."""


@hookspec
def register_timestep_samplers(register):
    """Timestep samplers: ``sample(batch_size, cfg, generator, latent_hw) -> Tensor[B]`` of sigmas in [0, 1]."""


@hookspec
def register_optimizers(register):
    """Optimizers: ``create(param_groups, lr, optimizer_args: dict) -> torch.optim.Optimizer``."""


@hookspec
def register_event_sinks(register):
    """Event sinks: factories ``make_sink(run_dir: Path, profile) -> callable(event: dict)``; every event
    of the run goes to every sink. A factory returns None to stay off for a run (TensorBoard and W&B do unless
    ``logging.log_with`` names them); a factory with ``validate(profile) -> list[str]`` reports problems at
    ``validate`` time (a missing package, a bad tracker config). A sink closes its files at ``run_end``."""
