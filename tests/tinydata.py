"""Tiny generated Fashion-MNIST-format data (IDX files) for training tests: unit tests never need the real set."""

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def make_fmnist_like(root: Path, train: int = 96, test: int = 32, seed: int = 0) -> Path:
    """Class-dependent blobs so that a few steps of training can learn something."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=count)
        images = rng.integers(0, 60, size=(count, 28, 28))
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 5)
            images[i, 4 + 10 * r:12 + 10 * r, 2 + 5 * c:7 + 5 * c] += 180
        write_idx(root / f"{split}-images-idx3-ubyte.gz", np.clip(images, 0, 255))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def make_imagefolder(root: Path, classes: int = 3, train: int = 8, val: int = 4, size: int = 40, seed: int = 0) -> Path:
    """root/{train,val}/<class>/*.JPEG: class-coloured noisy JPEGs in ImageNet's folder layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, size=(size, size, 3))
                pixels[..., c % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{split}_{c}_{i}.JPEG", "JPEG")
    return root
