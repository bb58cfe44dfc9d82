"""Built-in timestep samplers and loss weightings (the guide's and current sd-scripts')."""

from anima_core.hookspecs import hookimpl
from anima_core.training.flow import LOSS_WEIGHTINGS, TIMESTEP_SAMPLERS


@hookimpl
def register_timestep_samplers(register):
    for name, sampler in TIMESTEP_SAMPLERS.items():
        register(name, sampler)


@hookimpl
def register_loss_weightings(register):
    for name, weighting in LOSS_WEIGHTINGS.items():
        register(name, weighting)
