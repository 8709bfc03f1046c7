"""The norm registry: names -> builders of channel-first constructors; the plan of batches they are built for.

``build_norm(cfg, context) -> NormRecipe`` turns a flat norm config (``{"name": "mabn", **hyper_params}``) and
the runtime facts of a ``NormContext`` (normalization batch, device batch, world size, iterations) into the
constructor ``ctor(num_channels)`` that torchvision's ``norm_layer``, timm's ``norm_layer`` and detectron2's
``get_norm`` take. Every layer file registers its own builder (``register_norm``, in ``_table``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._table import (
    Entry,
    batch_dependent_types,
    canonical_name,
    entry,
    foldable_types,
    norm_defaults,
    norm_types,
    norm_variant,
    register_norm,
    registered_norms,
)
from .centering import center_conv_weights

NormCtor = Callable[..., nn.Module]


def _check_count(name: str, value: Any, *, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NormContext.{name} must be a positive integer{' or None' if optional else ''}, "
                         f"got {value!r}")


@dataclass(frozen=True)
class NormContext:
    """The batches a run normalizes, computes and steps with, and the facts a recipe may depend on (bound by
    the registry, never read from globals by a layer); the one plan type of both entry scripts.

    ``norm_batch``: samples per normalization batch n (None = the device batch); ``device_batch``: samples per
    device per step; ``world_size``: devices; ``total_iters``: training iterations of the run (if known);
    ``device_type``: where the layers run ("cpu", "cuda"; None: not known). n must divide the device batch.
    """

    norm_batch: int | None = None
    device_batch: int | None = None
    world_size: int = 1
    total_iters: int | None = None
    device_type: str | None = None

    def __post_init__(self):
        _check_count("norm_batch", self.norm_batch, optional=True)
        _check_count("device_batch", self.device_batch, optional=True)
        _check_count("world_size", self.world_size, optional=False)
        if self.total_iters is not None:
            _check_count("total_iters", self.total_iters, optional=False)
        n, d = self.norm_batch, self.device_batch
        if n is not None and d is not None and (n > d or d % n):
            valid = [k for k in range(1, d + 1) if d % k == 0]
            raise ValueError(f"normalization batch {n} does not divide the device batch {d}; valid "
                             f"normalization batches: {valid}")

    @property
    def sgd_batch(self) -> int | None:
        """Samples behind one weight update (device batch x devices)."""
        return None if self.device_batch is None else self.device_batch * self.world_size

    @property
    def grouped(self) -> bool:
        """Whether the device batch is split into several normalization batches."""
        return self.group_size is not None

    @property
    def group_size(self) -> int | None:
        """``group_size`` for batch-dependent layers: None when n is the whole device batch."""
        if self.norm_batch is None or self.norm_batch == self.device_batch:
            return None
        return self.norm_batch

    @property
    def groups_per_step(self) -> int:
        """Normalization batches per device per iteration (what layer counters advance by each step)."""
        if self.group_size is None or self.device_batch is None:
            return 1
        return self.device_batch // self.group_size

    def norm_context(self, total_iters: int | None = None) -> NormContext:
        """This plan with the run's length (what schedules counted in iterations are scaled by)."""
        return dataclasses.replace(self, total_iters=total_iters)

    def iters(self, value: int, scale: float = 1.0) -> int:
        """Training iterations -> normalization batches, which is what layer counters count."""
        return int(round(value * scale)) * self.groups_per_step


@dataclass(frozen=True)
class NormRecipe:
    """What a model builder needs: the constructor, and whether the convs feeding the norm pair with it.

    ``pairs_convs``: ``prepare`` hands every conv whose output a norm of the model normalizes to that norm
    (``NormLayer.pair_conv``: MABN's weight centering, GN+WS's standardization, CBN's compensation).
    ``batch_dependent`` and ``foldable`` are the registry's facts about the norm, filled in by ``build_norm``.
    """

    name: str
    ctor: NormCtor
    pairs_convs: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    batch_dependent: bool = False
    foldable: bool = False

    @property
    def frozen(self) -> bool:
        """An affine eval map that training does not change (frozenbn): nothing to learn from random init."""
        return self.foldable and not self.batch_dependent

    def prepare(self, model: nn.Module) -> nn.Module:
        """Pair the convs that feed this recipe's norms as it asks, in place. Model builders call it once
        after building; a model built by hand calls it too."""
        if self.pairs_convs:
            center_conv_weights(model)
        return model


def build_norm(cfg: Mapping[str, Any] | str, context: NormContext | None = None) -> NormRecipe:
    """Turn a flat norm config (``{"name": "mabn", **hyper_params}`` or a bare name) into a recipe.

    Names are case-insensitive. Unknown names and unknown hyper-parameters raise a ValueError listing the
    valid ones; every value is checked before a layer is built.
    """
    params = {"name": cfg} if isinstance(cfg, str) else dict(cfg)
    found = entry(params.pop("name", None))
    unknown = sorted(set(params) - set(found.defaults))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for norm {found.name!r}; "
                         f"valid: {sorted(found.defaults)}")
    ctx = context or NormContext()
    if ctx.grouped and not found.groupable:
        raise ValueError(f"{found.name} normalizes over the global batch (device batch x devices); normalization "
                         f"batch {ctx.norm_batch} != device batch {ctx.device_batch} would need groups: use "
                         f"batch_mode=device or a normalization batch of {ctx.device_batch}")
    merged = {**found.defaults, **{k: v for k, v in params.items() if v is not None}}
    for key, value in merged.items():
        _check_value(key, value)
    recipe = found.builder(merged, ctx)
    recipe = dataclasses.replace(recipe, name=found.name, batch_dependent=found.batch_dependent,
                                 foldable=found.foldable)
    _check_ctor(recipe)
    return recipe


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# What each hyper-parameter name means in every norm that has it; checked before any layer is built.
_VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "eps": (lambda v: _number(v) and v > 0, "a positive number"),
    "momentum": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1] (the weight of the new value)"),
    "window": (lambda v: v is None or (_count(v) and v > 0), "a positive integer or null"),
    "num_groups": (lambda v: _count(v) and v > 0, "a positive integer"),
    "warmup_iters": (_count, "a non-negative integer"),
    "renorm_iters": (_count, "a non-negative integer"),
    "r_max_iters": (_count, "a non-negative integer"),
    "d_max_iters": (_count, "a non-negative integer"),
    "burnin_iters": (lambda v: v is None or _count(v), "a non-negative integer or null"),
    "schedule_ref_iters": (lambda v: v is None or (_count(v) and v > 0), "a positive integer or null"),
    "r_max": (lambda v: _number(v) and v >= 1, "a number >= 1"),
    "d_max": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "weight_centering": (lambda v: isinstance(v, bool), "true or false"),
    "learnable_eps": (lambda v: isinstance(v, bool), "true or false"),
    "forward_stat": (lambda v: v in ("sma", "batch"), "one of sma, batch"),
    "backward_stat": (lambda v: v in ("sma", "batch"), "one of sma, batch"),
    "average": (lambda v: v in ("sma", "ema"), "one of sma, ema"),
    "renorm": (lambda v: isinstance(v, bool), "true or false"),
    "impl": (lambda v: v in ("auto", "fused", "torch"), "auto, fused or torch"),
}


def _check_value(key: str, value: Any) -> None:
    ok, what = _VALUE_RULES.get(key, (lambda v: True, ""))
    if not ok(value):
        raise ValueError(f"norm.{key} must be {what}, got {value!r}")
    if key == "momentum" and value > 0.5:
        warnings.warn(f"norm.momentum={value!r} is read in PyTorch's convention, the weight of the NEW value "
                      f"(running <- (1 - m)·running + m·batch); the official MABN/TensorFlow convention "
                      f"weights the old value, so its {value!r} is {1 - value:.4g} here", UserWarning, stacklevel=3)


def _check_ctor(recipe: NormRecipe) -> None:
    # Build one layer now so that a bad hyper-parameter fails before any model or data is built.
    try:
        recipe.ctor(64)
    except ValueError as err:
        raise ValueError(f"norm {recipe.name!r} with {dict(recipe.params)}: {err} "
                         f"(checked on a 64-channel layer when the config was built)") from err


__all__ = ["Entry", "NormContext", "NormCtor", "NormRecipe", "batch_dependent_types", "build_norm",
           "canonical_name", "entry", "foldable_types", "norm_defaults", "norm_types", "norm_variant",
           "register_norm", "registered_norms"]
