"""Datasets: sd-scripts dataset configs, captions, buckets, image checks, latent/text caches, batches."""

from anima_core.data.options import DataOptions
from anima_core.data.training_data import (
    Batch,
    Progress,
    TrainingData,
    build_training_data,
)

__all__ = ["Batch", "DataOptions", "Progress", "TrainingData", "build_training_data"]
