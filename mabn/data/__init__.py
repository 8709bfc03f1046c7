"""Datasets and loaders."""

from .fmnist import FMNIST_CLASSES, FMNIST_DEFAULT_ROOT, FashionMNIST, read_idx

__all__ = ["FMNIST_CLASSES", "FMNIST_DEFAULT_ROOT", "FashionMNIST", "read_idx"]
