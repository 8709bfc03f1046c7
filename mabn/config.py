"""Validate a composed training config before anything is built: every bad value is named in the first second."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .data.detection import check_coco_root
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


def _check_norm_name(cfg) -> None:
    if cfg.norm.name not in registered_norms():
        raise ConfigError(f"unknown norm {cfg.norm.name!r}; registered norms: {', '.join(registered_norms())}")


def _check_common(cfg, plan: BatchPlan, world_size: int, device_type: str) -> None:
    """What classification and detection runs share: AMP and device modes, syncbn's limits."""
    if cfg.train.amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {AMP_MODES}, got {cfg.train.amp!r}")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {cfg.train.device!r}")
    if cfg.norm.name == "syncbn" and plan.grouped:
        raise ConfigError(f"norm=syncbn normalizes over the global batch (device batch x devices); batch={plan.norm_batch} "
                          f"in grouped mode would need groups: use batch.mode=device or batch={plan.device_batch}")
    if cfg.norm.name == "syncbn" and world_size > 1 and device_type != "cuda":
        raise ConfigError("norm=syncbn across processes needs CUDA devices (torch's SyncBatchNorm does not "
                          "synchronise CPU tensors); use norm=bn on CPU")


def validate(cfg, world_size: int = 1, device_type: str = "cpu") -> BatchPlan:
    """Check names, batches, schedule and data before building anything; returns the batch plan."""
    if cfg.model.name not in registered_models():
        raise ConfigError(f"unknown model {cfg.model.name!r}; registered: {', '.join(registered_models())}")
    _check_norm_name(cfg)
    plan = plan_batches(cfg, world_size)
    _check_common(cfg, plan, world_size, device_type)
    _positive_int(cfg.epochs, "epochs")
    for key in ("ckpt_every_iters", "log_every"):
        _positive_int(cfg.train[key], f"train.{key}")
    _positive_int(cfg.diag.every, "diag.every")
    try:
        if cfg.data.name == "imagenet":
            check_imagenet_root(cfg.data.root, cfg.data.num_classes)
        elif cfg.data.name == "fmnist":
            root = Path(cfg.data.root)
            if not any(root.glob("train-images-idx3-ubyte*")):
                raise DataConfigError(f"data.root={root} holds no Fashion-MNIST IDX files (train-images-idx3-ubyte"
                                      f"[.gz]); install Debian's dataset-fashion-mnist or point data.root at them")
        else:
            raise DataConfigError(f"unknown data {cfg.data.name!r} for classification; valid: imagenet, fmnist "
                                  f"(coco and shapes are detection data: train_coco.py)")
    except DataConfigError as err:
        raise ConfigError(str(err)) from err
    return plan


DETECTION_MODELS = ("mask_rcnn_r50_fpn",)
DETECTION_DATA = ("coco", "shapes")


def validate_detection(cfg, world_size: int = 1, device_type: str = "cpu") -> BatchPlan:
    """train_coco.py's checks: the same norm/batch rules, detection model and data, a consistent schedule."""
    if cfg.model.name not in DETECTION_MODELS:
        raise ConfigError(f"unknown detection model {cfg.model.name!r}; valid: {', '.join(DETECTION_MODELS)}")
    if cfg.batch.mode != "device":
        raise ConfigError(f"detection trains with batch.mode=device (batch=n images per device), got "
                          f"batch.mode={cfg.batch.mode!r}")
    _check_norm_name(cfg)
    plan = plan_batches(cfg, world_size)
    _check_common(cfg, plan, world_size, device_type)
    solver = cfg.solver
    max_iter = _positive_int(solver.max_iter, "solver.max_iter")
    steps = list(solver.steps)
    if any(not isinstance(s, int) or not 0 < s < max_iter for s in steps) or steps != sorted(steps):
        raise ConfigError(f"solver.steps must be increasing iterations inside (0, solver.max_iter={max_iter}), "
                          f"got {steps}")
    for key in ("eval_period", "ckpt_period", "log_period"):
        _positive_int(cfg.train[key], f"train.{key}")
    _positive_int(cfg.train.num_gpus, "train.num_gpus")
    if cfg.model.freeze_at not in range(6):
        raise ConfigError(f"model.freeze_at must be 0-5 (0: nothing frozen, 1: stem, k: stem + res2..res{{k}}), "
                          f"got {cfg.model.freeze_at!r}")
    if cfg.model.weights is not None and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights={cfg.model.weights} is not a file (a train_imagenet.py checkpoint, a "
                          f"torchvision .pth or a detectron2 .pkl); set model.weights=null to train from scratch")
    if cfg.data.name == "coco":
        try:
            check_coco_root(cfg.data.root)
        except DataConfigError as err:
            raise ConfigError(str(err)) from err
    elif cfg.data.name != "shapes":
        raise ConfigError(f"unknown detection data {cfg.data.name!r}; valid: {', '.join(DETECTION_DATA)}")
    return plan
