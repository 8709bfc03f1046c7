"""Datasets and loaders."""

from . import coco_json, detection, loaders  # noqa: F401 - their datasets register themselves
from .fmnist import FMNIST_CLASSES, FMNIST_DEFAULT_ROOT, FashionMNIST, read_idx
from .registry import DataConfigError, dataset_spec, registered_datasets

__all__ = ["FMNIST_CLASSES", "FMNIST_DEFAULT_ROOT", "DataConfigError", "FashionMNIST", "dataset_spec", "read_idx",
           "registered_datasets"]
