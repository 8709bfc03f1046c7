"""Validate a composed training config before anything is built: every bad value is named in the first second."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .data.loaders import DataConfigError, check_imagenet_root
from .models import registered_models
from .norms import registered_norms

AMP_MODES = ("auto", "bf16", "fp16", "off")
_BATCH_ARG = re.compile(r"^batch=(-?\d+(?:,-?\d+)*)$")


def normalize_batch_override(argv: list[str]) -> list[str]:
    """``batch=2`` / ``batch=2,4,8`` -> ``batch.norm_batch=2`` / ``batch.norm_batch=2,4,8``.

    Hydra parses ``batch=2`` as an int, and a config-group override must be a string ("Config group
    override must be a string or a list. Got int"). So the numeric form users type sets the group's
    ``norm_batch`` key (any n, checked by ``validate``); the named options (``batch=n2``, configs/batch/)
    work as usual. Rewritten before Hydra reads the command line; sweeps stay plain value sweeps.
    """
    return [re.sub(_BATCH_ARG, r"batch.norm_batch=\1", arg) for arg in argv]


class ConfigError(ValueError):
    """A config value that cannot work; the message names it and what would be valid."""


@dataclass(frozen=True)
class BatchPlan:
    """The three batches the papers distinguish, per DESIGN.md."""

    norm_batch: int      # n: samples per normalization-layer call
    device_batch: int    # samples per device per step
    world_size: int

    @property
    def sgd_batch(self) -> int:
        return self.device_batch * self.world_size

    @property
    def grouped(self) -> bool:
        return self.norm_batch < self.device_batch


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def plan_batches(cfg, world_size: int) -> BatchPlan:
    """batch=n with batch.mode grouped (split data.batch_size into groups of n) or device (device batch n)."""
    n = _positive_int(cfg.batch.norm_batch, "batch (batch.norm_batch)")
    mode = cfg.batch.mode
    if mode == "device":
        return BatchPlan(n, n, world_size)
    if mode != "grouped":
        raise ConfigError(f"batch.mode must be grouped or device, got {mode!r}")
    device_batch = _positive_int(cfg.data.batch_size, "data.batch_size")
    if n > device_batch:
        raise ConfigError(f"batch={n} is larger than the device batch data.batch_size={device_batch}; use "
                          f"data.batch_size={n} or batch.mode=device")
    if device_batch % n:
        raise ConfigError(f"batch={n} does not divide the device batch data.batch_size={device_batch}; valid "
                          f"normalization batches: {[d for d in range(1, device_batch + 1) if device_batch % d == 0]}")
    return BatchPlan(n, device_batch, world_size)


def validate(cfg, world_size: int = 1, device_type: str = "cpu") -> BatchPlan:
    """Check names, batches, schedule and data before building anything; returns the batch plan."""
    if cfg.norm.name not in registered_norms():
        raise ConfigError(f"unknown norm {cfg.norm.name!r}; registered norms: {', '.join(registered_norms())}")
    if cfg.model.name not in registered_models():
        raise ConfigError(f"unknown model {cfg.model.name!r}; registered: {', '.join(registered_models())}")
    plan = plan_batches(cfg, world_size)
    _positive_int(cfg.epochs, "epochs")
    if cfg.train.amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {AMP_MODES}, got {cfg.train.amp!r}")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {cfg.train.device!r}")
    for key in ("ckpt_every_iters", "log_every"):
        _positive_int(cfg.train[key], f"train.{key}")
    if cfg.norm.name == "syncbn" and plan.grouped:
        raise ConfigError(f"norm=syncbn normalizes over the global batch (device batch x devices); batch={plan.norm_batch} "
                          f"in grouped mode would need groups: use batch.mode=device or batch={plan.device_batch}")
    if cfg.norm.name == "syncbn" and world_size > 1 and device_type != "cuda":
        raise ConfigError("norm=syncbn across processes needs CUDA devices (torch's SyncBatchNorm does not "
                          "synchronise CPU tensors); use norm=bn on CPU")
    try:
        if cfg.data.name == "imagenet":
            check_imagenet_root(cfg.data.root)
        elif cfg.data.name == "fmnist":
            root = Path(cfg.data.root)
            if not any(root.glob("train-images-idx3-ubyte*")):
                raise DataConfigError(f"data.root={root} holds no Fashion-MNIST IDX files (train-images-idx3-ubyte"
                                      f"[.gz]); install Debian's dataset-fashion-mnist or point data.root at them")
        else:
            raise DataConfigError(f"unknown data {cfg.data.name!r}; valid: imagenet, fmnist")
    except DataConfigError as err:
        raise ConfigError(str(err)) from err
    return plan
