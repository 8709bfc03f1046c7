"""Fashion-MNIST (Xiao et al. 2017) read from its IDX files, as Debian's ``dataset-fashion-mnist`` installs them."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .registry import DataConfigError

FMNIST_DEFAULT_ROOT = Path(os.environ.get("FMNIST_ROOT", "/usr/share/datasets/fashion-mnist"))
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped); a malformed file raises a ValueError naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4].hex()})")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header says shape {dims} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install Debian's package "
        f"(`apt-get install dataset-fashion-mnist`, what scripts/install.sh does as root), or set data.root / "
        f"FMNIST_ROOT to a folder holding the four IDX files.")


def fmnist_root(root) -> Path:
    """``data.root`` as a folder: the given one, or the default (``FMNIST_ROOT``, Debian's package)."""
    return Path(root) if root not in (None, "", "None") else FMNIST_DEFAULT_ROOT


def check_fmnist_root(root, num_classes: int | None = None) -> Path:
    """``root`` holding the four IDX files, each readable (magic, header, length), images and labels of each split
    in equal numbers, train and test images of one size, labels in [0, num_classes): else a DataConfigError
    naming the file, the key and the value (before a run directory is claimed). Reads every file once."""
    root = fmnist_root(root)
    try:
        shapes = {}
        for split, (images_stem, labels_stem) in _FILES.items():
            images_file, labels_file = _find(root, images_stem), _find(root, labels_stem)
            images, labels = read_idx(images_file), read_idx(labels_file)
            _check_split(images_file, images, labels_file, labels)
            bad = labels[(labels < 0) | (labels >= num_classes)] if num_classes is not None else labels[:0]
            if len(bad):
                raise ValueError(f"{labels_file}: {len(bad)} label(s) outside [0, data.num_classes={num_classes}), "
                                 f"e.g. {int(bad[0])}")
            shapes[split] = (images_file, images.shape[1:])
        (train_file, train_shape), (test_file, test_shape) = shapes["train"], shapes["test"]
        if train_shape != test_shape:
            raise ValueError(f"{test_file}: images of {test_shape[0]}x{test_shape[1]} but the training images "
                             f"({train_file}) are {train_shape[0]}x{train_shape[1]}")
    except (FileNotFoundError, ValueError) as err:
        raise DataConfigError(f"data.root={root}: {err}") from err
    return root


def _check_split(images_file: Path, images: np.ndarray, labels_file: Path, labels: np.ndarray) -> None:
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_file} / {labels_file}: shapes {images.shape} and {labels.shape} do not match "
                         f"(N images of HxW and N labels expected)")


class FashionMNIST(Dataset):
    """(image, label) pairs; images as uint8 tensors (1, 28, 28) before ``transform``."""

    def __init__(self, root: str | Path | None = None, split: str = "train", transform=None):
        if split not in _FILES:
            raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
        self.root = Path(root) if root is not None else FMNIST_DEFAULT_ROOT
        images_file, labels_file = (_find(self.root, stem) for stem in _FILES[split])
        images, labels = read_idx(images_file), read_idx(labels_file)
        _check_split(images_file, images, labels_file, labels)
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
