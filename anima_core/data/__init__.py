"""Datasets: sd-scripts dataset configs, captions, buckets, image checks, latent/text caches, batches."""

from anima_core.data.options import DataOptions
from anima_core.data.progress import PhaseProgress
from anima_core.data.training_data import Batch, TrainingData, build_training_data

__all__ = ["Batch", "DataOptions", "PhaseProgress", "TrainingData", "build_training_data"]
