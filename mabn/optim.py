"""Optimizer parameter groups and per-iteration learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from .norms import norm_types


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# optim.<key> and schedule.<key> values, checked before anything is built (a typo fails in the first second)
_OPTIM_RULES = {
    "name": (lambda v: v == "sgd", "sgd"),
    "lr": (lambda v: v is None or (_num(v) and v > 0), "a positive number, or null for the linear scaling rule"),
    "base_lr": (lambda v: _num(v) and v > 0, "a positive number"),
    "base_batch": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "momentum": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "norm_weight_decay": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "nesterov": (lambda v: isinstance(v, bool), "true or false"),
    "label_smoothing": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
}
_SCHEDULE_RULES = {
    "name": (lambda v: v in ("step", "cosine"), "step or cosine"),
    "gamma": (lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "warmup_epochs": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "warmup_factor": (lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "milestones": (lambda v: all(isinstance(m, int) and m > 0 for m in v) and list(v) == sorted(v),
                   "increasing positive epochs"),
}


def check_settings(prefix: str, settings: dict) -> None:
    """Raise a ValueError naming ``<prefix>.<key>``, the value and what is valid, for ``optim`` or ``schedule``."""
    rules = {"optim": _OPTIM_RULES, "schedule": _SCHEDULE_RULES}[prefix]
    for key, (ok, what) in rules.items():
        if key in settings and not ok(settings[key]):
            raise ValueError(f"{prefix}.{key} must be {what}, got {settings[key]!r}")


def linear_scaled_lr(optim_cfg, sgd_batch: int) -> float:
    """optim.lr, or base_lr scaled to the SGD batch (the linear scaling rule, Goyal et al. 2017)."""
    if optim_cfg["lr"] is not None:
        return optim_cfg["lr"]
    return optim_cfg["base_lr"] * sgd_batch / optim_cfg["base_batch"]


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Norm-layer parameters (found through the registry's type tuple) get their own weight decay."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types()) for p in m.parameters(recurse=False)}
    norm, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (norm if id(p) in norm_params else rest).append(p)
    return [{"params": rest, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


def lr_lambda(schedule: dict, iters_per_epoch: int, total_iters: int):
    """Multiplier of the base lr at iteration it (0-based): optional linear warm-up, then step or cosine."""
    warm = int(schedule.get("warmup_epochs", 0) * iters_per_epoch)
    factor = schedule.get("warmup_factor", 0.1)
    name = schedule["name"]
    if name not in ("step", "cosine"):
        raise ValueError(f"unknown schedule {name!r}; valid: step, cosine")
    milestones = [m * iters_per_epoch for m in schedule.get("milestones", [])]

    def fn(it: int) -> float:
        scale = factor + (1 - factor) * it / warm if it < warm else 1.0
        if name == "step":
            return scale * schedule["gamma"] ** sum(it >= m for m in milestones)
        return scale * 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / max(total_iters, 1)))

    return fn


def build_optimizer(model: nn.Module, optim_cfg: dict, lr: float, *, capturable: bool = False
                    ) -> torch.optim.Optimizer:
    """SGD over ``param_groups``; ``capturable``: fused SGD, each group's lr a float32 tensor on the model's
    device that the scheduler fills in place and a CUDA graph reads at every replay (``mabn.graphs``)."""
    if optim_cfg["name"] != "sgd":
        raise ValueError(f"unknown optimizer {optim_cfg['name']!r}; valid: sgd")
    groups = param_groups(model, optim_cfg["weight_decay"], optim_cfg["norm_weight_decay"])
    if not capturable:
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg["momentum"], nesterov=optim_cfg["nesterov"])
    device = next(model.parameters()).device
    for group in groups:  # one tensor per group: the scheduler fills each group's own
        group["lr"] = torch.tensor(float(lr), device=device, dtype=torch.float32)
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg["momentum"], nesterov=optim_cfg["nesterov"],
                           fused=True)
