"""TensorBoard and Weights & Biases as event sinks, selected by `logging.log_with` (optional extras)."""

from anima_core.hookspecs import hookimpl
from anima_plugins.trackers.base import TrackerFactory
from anima_plugins.trackers.tensorboard_sink import TensorBoardSink
from anima_plugins.trackers.wandb_sink import WandbSink


@hookimpl
def register_event_sinks(register):
    register("tensorboard", TrackerFactory("tensorboard", TensorBoardSink))
    register("wandb", TrackerFactory("wandb", WandbSink))
