"""Dataset registry: name -> task, input channels, a root check that runs before anything is built, a builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class DataConfigError(ValueError):
    """A data setting that cannot work (missing root, wrong layout); raised before training starts."""


@dataclass(frozen=True)
class DatasetSpec:
    """How the entry scripts treat one ``data=<name>``: ``check(data_cfg)`` raises DataConfigError in the first
    second; a mapping it returns holds data keys read from the files (``{"num_classes": 5}``), which the
    validated config then takes; ``build(data_cfg, seed)`` returns the datasets (classification: train with
    augmentation, val; detection: the splits' ``(json, image folder)``)."""

    name: str
    task: str                                   # classification (train_imagenet.py) | detection (train_coco.py)
    in_channels: int
    check: Callable[[Any], Any]
    build: Callable[..., Any] | None = None


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, task: str, in_channels: int = 3, check: Callable[[Any], Any]):
    """Decorator registering ``build(data_cfg, seed)`` for ``data=<name>`` (None for detection sets)."""

    def deco(build):
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetSpec(name, task, in_channels, check, build)
        return build

    return deco


def registered_datasets(task: str) -> tuple[str, ...]:
    """The dataset names an entry script of ``task`` accepts, sorted."""
    return tuple(sorted(n for n, s in _DATASETS.items() if s.task == task))


def dataset_spec(name: str, task: str) -> DatasetSpec:
    """The spec of ``data=<name>`` for ``task``, or a DataConfigError naming the valid ones."""
    spec = _DATASETS.get(name)
    if spec is None or spec.task != task:
        other = f" ({name} is {spec.task} data)" if spec else ""
        raise DataConfigError(f"unknown {task} data {name!r}{other}; valid: "
                              f"{', '.join(registered_datasets(task))}")
    return spec
