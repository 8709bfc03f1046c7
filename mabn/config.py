"""Validate a composed training config before anything is built: every bad value is named in the first second."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from .data import DataConfigError, dataset_spec
from .models import registered_models
from .norms import NormContext, build_norm, norm_variant
from .norms.registry import entry
from .optim import check_settings

AMP_MODES = ("auto", "bf16", "fp16", "off")
BATCH_MODES = ("grouped", "device")


def variant_suffix(norm) -> str:
    """``${norm_variant:${norm}}`` in a run name: "" for the published method, else its non-default
    switches, e.g. "-backward_stat_batch-renorm_false" (ablation cells get run directories of their own)."""
    params = OmegaConf.to_container(norm, resolve=True) if OmegaConf.is_config(norm) else dict(norm)
    variant = norm_variant(str(params.get("name")), params)
    return "".join(f"-{part.replace('=', '_')}" for part in variant.split(", ") if part)


def model_label(model) -> str:
    """``${model_label:${model}}`` in a run name: the model's name, and for model=timm its architecture too
    (two timm runs of other architectures get run directories of their own)."""
    name = str(model.get("name"))
    missing = OmegaConf.is_config(model) and "arch" in model and OmegaConf.is_missing(model, "arch")
    arch = None if missing else model.get("arch")
    return f"{name}_{arch}" if arch else name


def norm_settings(norm, *keys: str) -> str:
    """``${norm_settings:${norm},r_max,d_max}`` in a run name: "-r_max_3.0-d_max_0" for those of the keys the
    norm has ("" for a norm with none of them): a sweep over settings that are not ablation switches."""
    return "".join(f"-{key}_{str(norm[key]).lower()}" for key in keys if key in norm)


def batch_label(*, _root_) -> str:
    """``${batch_label:}`` in a run name: "n2-b32" (normalization batch, device batch), with "-device" when
    batch_mode=device trains with device batch n: a true small batch and the grouped run of the same n get run
    directories of their own."""
    mode = _root_.get("batch_mode", "grouped")
    device_batch = _root_.batch if mode == "device" else _root_.data.batch_size
    return f"n{_root_.batch}-b{device_batch}" + ("-device" if mode == "device" else "")


OmegaConf.register_new_resolver("batch_label", batch_label, replace=True)
OmegaConf.register_new_resolver("norm_variant", variant_suffix, replace=True)
OmegaConf.register_new_resolver("norm_settings", norm_settings, replace=True)
OmegaConf.register_new_resolver("model_label", model_label, replace=True)


class ConfigError(ValueError):
    """A config value that cannot work; the message names it and what would be valid."""


def _positive_int(value, key: str, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer{' or null' if optional else ''}, got {value!r}")
    return value


def plan_batches(cfg, world_size: int = 1, device_type: str | None = None) -> NormContext:
    """``batch=n`` with ``batch_mode`` grouped (groups of n in the device batch data.batch_size) or device
    (device batch n): the run's NormContext. Reads a composed config or a checkpoint's saved one."""
    n = _positive_int(cfg.batch, "batch")
    mode = cfg.batch_mode
    if mode not in BATCH_MODES:
        raise ConfigError(f"batch_mode must be grouped or device, got {mode!r}")
    device_batch = n if mode == "device" else _positive_int(cfg.data.batch_size, "data.batch_size")
    try:
        return NormContext(norm_batch=n, device_batch=device_batch, world_size=world_size, device_type=device_type)
    except ValueError as err:  # the divisibility rule lives in NormContext; name the config keys here
        raise ConfigError(f"batch={n}, data.batch_size={device_batch}: {err} (batch_mode=grouped splits the "
                          f"device batch into groups of n; batch_mode=device trains with device batch n)") from err


def _check_norm_name(cfg) -> None:
    try:
        entry(cfg.norm.name)
    except ValueError as err:  # before the batch arithmetic: an unknown name explains more than its batch
        raise ConfigError(f"norm.name: {err}") from err


def _check_norm_and_optim(cfg, plan: NormContext) -> None:
    """Every norm, optimizer and AMP setting, by building the norm recipe (no layer, no data)."""
    try:
        build_norm(OmegaConf.to_container(cfg.norm, resolve=True), plan)
        check_settings("optim", OmegaConf.to_container(cfg.optim, resolve=True))
        if "schedule" in cfg:
            check_settings("schedule", OmegaConf.to_container(cfg.schedule, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if cfg.get("logger") is not None and cfg.logger.get("mode", "disabled") not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode must be online, offline or disabled, got {cfg.logger.mode!r}")
    if cfg.train.amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {AMP_MODES}, got {cfg.train.amp!r}")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {cfg.train.device!r}")


def _check_cuda_graphs(cfg, world_size: int, device_type: str) -> None:
    """train.cuda_graphs (mabn/graphs.py): one CUDA process, bf16 or no autocast, an eager model, no hooks."""
    graphs = cfg.train.get("cuda_graphs", False)  # absent from configs saved before the key existed
    if not isinstance(graphs, bool):
        raise ConfigError(f"train.cuda_graphs must be true or false, got {graphs!r}")
    if not graphs:
        return
    if device_type != "cuda":
        raise ConfigError(f"train.cuda_graphs=true needs a CUDA device, but this process runs on "
                          f"{device_type}; set train.cuda_graphs=false (or run on a GPU machine)")
    if cfg.train.amp == "fp16":
        raise ConfigError("train.cuda_graphs=true with train.amp=fp16: the GradScaler is not captured; use "
                          "train.amp=bf16 (no loss scaling) or off")
    if cfg.train.compile:
        raise ConfigError("train.cuda_graphs=true with train.compile=true: choose one (torch.compile's "
                          "mode=reduce-overhead makes its own CUDA graphs)")
    if world_size > 1:
        raise ConfigError(f"train.cuda_graphs=true runs one process (DDP's all-reduce inside a captured step "
                          f"is not verified here), got world size {world_size}")
    if cfg.diag.batch_stats:
        raise ConfigError("train.cuda_graphs=true with diag.batch_stats=true: the tracer's Python hooks "
                          "would not run on a replay; set one of them false")


def _check_fused(cfg, device_type: str) -> None:
    """norm.impl=fused runs the Triton kernels: on CUDA, or on CPU tensors only under Triton's interpreter."""
    impl = cfg.norm.get("impl")
    if impl == "fused" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"norm.impl=fused runs the Triton kernels on CUDA, but this process runs on {device_type} "
                          f"(the fused path covers CUDA, or CPU under TRITON_INTERPRET=1); use norm.impl=auto "
                          f"(fused on CUDA, the torch path elsewhere) or norm.impl=torch")


def _check_workers(cfg) -> None:
    workers = cfg.data.get("workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"data.workers must be an integer >= 0 (0: load in the training process), got {workers!r}")


def _check_data(cfg, task: str) -> None:
    """The data set's own check; the keys it reads from the files (coco_json: num_classes, mask_format)
    replace their config values, so every later step and the saved config see them."""
    try:
        found = dataset_spec(cfg.data.name, task).check(cfg.data)
    except DataConfigError as err:
        raise ConfigError(str(err)) from err
    for key, value in (found.items() if isinstance(found, Mapping) else ()):
        OmegaConf.update(cfg, f"data.{key}", value, force_add=True)


def _check_timm_arch(model_cfg) -> None:
    """``model=timm`` needs ``model.arch`` to name a timm model (looked up in timm's registry, not built)."""
    if OmegaConf.is_missing(model_cfg, "arch") or not isinstance(model_cfg.get("arch"), str):
        raise ConfigError("model=timm needs model.arch=<a timm model name>, e.g. model.arch=resnet18 "
                          "(python -c 'import timm; print(timm.list_models())' lists them)")
    try:
        import timm
    except ImportError as err:
        raise ConfigError("model=timm needs timm (pinned in requirements/constraints.txt; scripts/install.sh "
                          "installs it)") from err
    arch = model_cfg.arch
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ConfigError(f"unknown timm model model.arch={arch!r}; close names: "
                          f"{', '.join(close) or 'none'} (timm.list_models() lists all)")


PRECISE_WHEN = ("never", "end", "epoch")
NORM_STATS = ("population", "batch")


@dataclass(frozen=True)
class StatisticsPlan:
    """How a run's evaluations treat inference statistics (train.precise_bn, train.freeze_norms_from,
    eval.norm_stats), checked."""

    precise_when: str = "never"
    precise_batches: tuple = (128,)
    precise_images: int | None = 10000
    freeze_from: float | None = None
    norm_stats: tuple = ("population",)


def _as_list(value) -> list:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def statistics_plan(cfg) -> StatisticsPlan:
    """train.precise_bn, train.freeze_norms_from and eval.norm_stats (absent in configs saved before them:
    the defaults, which is what those runs did)."""
    precise = cfg.train.get("precise_bn") or {}
    when = precise.get("when", "never")
    if when not in PRECISE_WHEN:
        raise ConfigError(f"train.precise_bn.when must be one of {', '.join(PRECISE_WHEN)}, got {when!r}")
    batches = _as_list(precise.get("batch", 128))
    if not batches or any(b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1)
                          for b in batches):
        raise ConfigError(f"train.precise_bn.batch must be a positive integer (the estimation batch B), null (the "
                          f"device batch) or a non-empty list of them, got {precise.get('batch')!r}")
    images = _positive_int(precise.get("images", 10000), "train.precise_bn.images", optional=True)
    freeze = cfg.train.get("freeze_norms_from")
    if freeze is not None and (isinstance(freeze, bool) or not isinstance(freeze, (int, float))
                               or not 0 < freeze < 1):
        raise ConfigError(f"train.freeze_norms_from must be a fraction of training in (0, 1) or null, got {freeze!r}")
    stats = _as_list((cfg.get("eval") or {}).get("norm_stats", "population"))
    if not stats or any(s not in NORM_STATS for s in stats) or len(set(stats)) != len(stats):
        raise ConfigError(f"eval.norm_stats must be population, batch or a list of both (each once), got "
                          f"{stats!r}")
    if freeze is not None and cfg.train.get("cuda_graphs", False):
        raise ConfigError("train.freeze_norms_from with train.cuda_graphs=true: a captured step keeps the norms' "
                          "training mode; set one of them off")
    return StatisticsPlan(when, tuple(batches), images, None if freeze is None else float(freeze), tuple(stats))


def validate(cfg, world_size: int = 1, device_type: str = "cpu") -> NormContext:
    """train_imagenet.py's checks of names, batches, hyper-parameters and data; returns the batch plan."""
    if cfg.model.name not in registered_models():
        raise ConfigError(f"unknown model {cfg.model.name!r}; registered: {', '.join(registered_models())}")
    if cfg.model.name == "timm":
        _check_timm_arch(cfg.model)
    _check_norm_name(cfg)  # before the batch arithmetic: an unknown name explains more than its batch
    plan = plan_batches(cfg, world_size, device_type)
    _check_norm_and_optim(cfg, plan)
    _check_cuda_graphs(cfg, world_size, device_type)
    _check_fused(cfg, device_type)
    _check_workers(cfg)
    _positive_int(cfg.train.get("dist_timeout_s", 600), "train.dist_timeout_s")
    _positive_int(cfg.epochs, "epochs")
    for key in ("ckpt_every_iters", "log_every", "keep_last"):
        _positive_int(cfg.train[key], f"train.{key}")
    for key in ("max_iters_per_epoch", "eval_max_batches", "stop_after_iters"):  # 0 would silently mean 1 or none
        _positive_int(cfg.train[key], f"train.{key}", optional=True)
    statistics_plan(cfg)
    _positive_int(cfg.diag.every, "diag.every")
    _check_data(cfg, "classification")
    return plan


DETECTION_MODELS = ("mask_rcnn_r50_fpn",)


def validate_detection(cfg, world_size: int = 1, device_type: str = "cpu") -> NormContext:
    """train_coco.py's checks: the same norm/batch rules, detection model and data, a consistent schedule.
    What the data files determine (coco_json: ``data.num_classes``, ``data.mask_format``) is filled in."""
    if cfg.model.name not in DETECTION_MODELS:
        raise ConfigError(f"unknown detection model {cfg.model.name!r}; valid: {', '.join(DETECTION_MODELS)}")
    if cfg.batch_mode != "device":
        raise ConfigError(f"detection trains with batch_mode=device (batch=n images per device), got "
                          f"batch_mode={cfg.batch_mode!r}")
    _check_norm_name(cfg)
    plan = plan_batches(cfg, world_size, device_type)
    _check_norm_and_optim(cfg, plan)
    _check_fused(cfg, device_type)
    _check_workers(cfg)
    _positive_int(cfg.train.get("dist_timeout_s", 600), "train.dist_timeout_s")
    solver = cfg.solver
    max_iter = _positive_int(solver.max_iter, "solver.max_iter")
    steps = list(solver.steps)
    if any(not isinstance(s, int) or not 0 < s < max_iter for s in steps) or steps != sorted(steps):
        raise ConfigError(f"solver.steps must be increasing iterations inside (0, solver.max_iter={max_iter}), "
                          f"got {steps}")
    for key in ("eval_period", "ckpt_period", "log_period"):
        _positive_int(cfg.train[key], f"train.{key}")
    _positive_int(cfg.train.stop_after_iters, "train.stop_after_iters", optional=True)
    _positive_int(cfg.train.num_gpus, "train.num_gpus")
    if cfg.model.freeze_at not in range(6):
        raise ConfigError(f"model.freeze_at must be 0-5 (0: nothing frozen, 1: stem, k: stem + res2..res{{k}}), "
                          f"got {cfg.model.freeze_at!r}")
    if cfg.model.weights is not None and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights={cfg.model.weights} is not a file (a train_imagenet.py checkpoint, a "
                          f"torchvision .pth or a detectron2 .pkl); set model.weights=null to train from scratch")
    _check_data(cfg, "detection")
    return plan
