"""The norm registry: names -> builders of channel-first constructors, and the derived tuples of norm types."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .batchnorm import BatchNorm2d, CenteredConvBatchNorm2d, FrozenBatchNorm2d, SyncBatchNorm
from .brn import BatchRenorm2d
from .cbn import CrossIterationBatchNorm2d
from .evonorm import EvoNormS0
from .frn import FilterResponseNorm2d
from .gnws import GroupNormWS
from .groupnorm import GroupNorm
from .layernorm import InstanceNorm2d, LayerNorm2d
from .mabn import MABN2d

NormCtor = Callable[[int], nn.Module]


@dataclass(frozen=True)
class NormContext:
    """Runtime facts a recipe may depend on (bound by the registry, never read from globals by a layer).

    ``norm_batch``: samples per normalization batch n (None = the device batch); ``device_batch``: samples per
    device per step; ``world_size``: devices; ``total_iters``: training iterations of the run (if known).
    """

    norm_batch: int | None = None
    device_batch: int | None = None
    world_size: int = 1
    total_iters: int | None = None

    @property
    def group_size(self) -> int | None:
        """``group_size`` for batch-dependent layers: None when n is the whole device batch."""
        if self.norm_batch is None or self.norm_batch == self.device_batch:
            return None
        if self.device_batch is not None and self.device_batch % self.norm_batch:
            raise ValueError(f"normalization batch {self.norm_batch} must divide the device batch {self.device_batch}")
        return self.norm_batch

    @property
    def groups_per_step(self) -> int:
        """Normalization batches per device per iteration (what layer counters advance by each step)."""
        if self.group_size is None or self.device_batch is None:
            return 1
        return self.device_batch // self.group_size


@dataclass(frozen=True)
class NormRecipe:
    """What a model builder needs: the constructor, and whether the convs feeding the norm are paired with it.

    ``weight_centering``: the convs feeding the norm get the norm's weight parametrization through
    ``center_conv_weights`` (MABN: centering; GN+WS: standardization, i.e. centering and scaling).
    """

    name: str
    ctor: NormCtor
    weight_centering: bool = False
    batch_dependent: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Parametrize the convs that feed this recipe's norms as it asks (MABN: weight centering), in place.
        Model builders call it once after building; a model built by hand calls it too."""
        if self.weight_centering:
            from .centering import center_conv_weights  # centering reads the registry's type tuples

            center_conv_weights(model)
        return model


@dataclass(frozen=True)
class _Entry:
    builder: Callable[[dict, NormContext], NormRecipe]
    types: tuple[type, ...]
    defaults: Mapping[str, Any]
    batch_dependent: bool
    foldable: bool
    switches: tuple[str, ...] = ()


_REGISTRY: dict[str, _Entry] = {}


def register_norm(name: str, *, types: tuple[type, ...], defaults: Mapping[str, Any], batch_dependent: bool,
                  foldable: bool, switches: tuple[str, ...] = ()):
    """Decorator registering ``builder(params, context) -> NormRecipe`` under ``name``.

    ``switches``: the hyper-parameters that make another variant of the method (ablations), not another
    setting of it; results tables name a run's non-default switches in its row (``norm_variant``)."""

    def deco(builder):
        if name in _REGISTRY:
            raise ValueError(f"norm {name!r} is already registered")
        _REGISTRY[name] = _Entry(builder, types, dict(defaults), batch_dependent, foldable, tuple(switches))
        return builder

    return deco


def norm_variant(name: str, params: Mapping[str, Any] | None) -> str:
    """The non-default switches of a run's norm params, e.g. ``"backward_stat=batch, renorm=false"``;
    "" for the method as published (and for params recorded before a switch existed, or unknown norms)."""
    entry = _REGISTRY.get(name)
    if entry is None or not params:
        return ""
    changed = [(k, params[k]) for k in entry.switches if k in params and params[k] != entry.defaults[k]]
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changed)


def registered_norms() -> tuple[str, ...]:
    """Every registered norm name, sorted."""
    return tuple(sorted(_REGISTRY))


def norm_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters a norm accepts, with their defaults (what configs/norm/<name>.yaml mirrors)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; registered norms: {', '.join(registered_norms())}")
    return dict(_REGISTRY[name].defaults)


def _types(pred: Callable[[_Entry], bool]) -> tuple[type, ...]:
    out: list[type] = []
    for entry in _REGISTRY.values():
        if pred(entry):
            out.extend(t for t in entry.types if t not in out)
    return tuple(out)


def norm_types() -> tuple[type, ...]:
    """All normalization layer types (for no-weight-decay groups, precise-BN, folding, diagnostics)."""
    return _types(lambda e: True)


def batch_dependent_types() -> tuple[type, ...]:
    """Types whose training output depends on the other samples of the batch (bn, brn, mabn, syncbn)."""
    return _types(lambda e: e.batch_dependent)


def foldable_types() -> tuple[type, ...]:
    """Types whose eval mode is a per-channel affine map that folds into the preceding conv."""
    return _types(lambda e: e.foldable)


def build_norm(cfg: Mapping[str, Any] | str, context: NormContext | None = None) -> NormRecipe:
    """Turn a flat norm config (``{"name": "mabn", **hyper_params}`` or a bare name) into a recipe.

    Unknown names and unknown hyper-parameters raise a ValueError listing the valid ones.
    """
    params = {"name": cfg} if isinstance(cfg, str) else dict(cfg)
    name = params.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; registered norms: {', '.join(registered_norms())}")
    entry = _REGISTRY[name]
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for norm {name!r}; valid: {sorted(entry.defaults)}")
    merged = {**entry.defaults, **{k: v for k, v in params.items() if v is not None}}
    for key, value in merged.items():
        _check_value(key, value)
    ctx = context or NormContext()
    recipe = entry.builder(merged, ctx)
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
    "schedule_ref_iters": (lambda v: v is None or (_count(v) and v > 0), "a positive integer or null"),
    "r_max": (lambda v: _number(v) and v >= 1, "a number >= 1"),
    "d_max": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "weight_centering": (lambda v: isinstance(v, bool), "true or false"),
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


def _check_ctor(recipe: NormRecipe) -> None:
    # Build one layer now so that a bad hyper-parameter fails before any model or data is built.
    try:
        recipe.ctor(64)
    except ValueError as err:
        raise ValueError(f"norm {recipe.name!r} with {dict(recipe.params)}: {err} "
                         f"(checked on a 64-channel layer when the config was built)") from err


def _iters(value: int, ctx: NormContext, scale: float = 1.0) -> int:
    """Training iterations -> normalization batches, which is what layer counters count."""
    return int(round(value * scale)) * ctx.groups_per_step


@register_norm("bn", types=(BatchNorm2d, nn.BatchNorm2d),
               defaults={"eps": 1e-5, "momentum": 0.1, "impl": "auto", "weight_centering": False},
               batch_dependent=True, foldable=True, switches=("weight_centering",))
def _build_bn(p: dict, ctx: NormContext) -> NormRecipe:
    # weight_centering: MABN's centered filters in the convs feeding BN (an ablation of MABN's parts)
    cls = CenteredConvBatchNorm2d if p["weight_centering"] else BatchNorm2d
    ctor = functools.partial(cls, group_size=ctx.group_size, eps=p["eps"], momentum=p["momentum"], impl=p["impl"])
    return NormRecipe("bn", ctor, weight_centering=bool(p["weight_centering"]), batch_dependent=True, params=p)



@register_norm("gn", types=(nn.GroupNorm,), defaults={"num_groups": 32, "eps": 1e-5},
               batch_dependent=False, foldable=False)
def _build_gn(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("gn", functools.partial(GroupNorm, num_groups=p["num_groups"], eps=p["eps"]), params=p)


@register_norm("ln", types=(LayerNorm2d,), defaults={"eps": 1e-5}, batch_dependent=False, foldable=False)
def _build_ln(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("ln", functools.partial(LayerNorm2d, eps=p["eps"]), params=p)


@register_norm("in", types=(InstanceNorm2d,), defaults={"eps": 1e-5}, batch_dependent=False, foldable=False)
def _build_in(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("in", functools.partial(InstanceNorm2d, eps=p["eps"]), params=p)


@register_norm("gnws", types=(GroupNormWS,), defaults={"num_groups": 32, "eps": 1e-5, "ws_eps": 1e-5},
               batch_dependent=False, foldable=False)
def _build_gnws(p: dict, ctx: NormContext) -> NormRecipe:
    ctor = functools.partial(GroupNormWS, num_groups=p["num_groups"], eps=p["eps"], ws_eps=p["ws_eps"])
    return NormRecipe("gnws", ctor, weight_centering=True, params=p)  # pairs convs: weight standardization


@register_norm("evonorm_s0", types=(EvoNormS0,), defaults={"num_groups": 32, "eps": 1e-5},
               batch_dependent=False, foldable=False)
def _build_evonorm_s0(p: dict, ctx: NormContext) -> NormRecipe:
    ctor = functools.partial(EvoNormS0, num_groups=p["num_groups"], eps=p["eps"])
    return NormRecipe("evonorm_s0", ctor, params=p)


@register_norm("frn", types=(FilterResponseNorm2d,), defaults={"eps": 1e-6, "learnable_eps": False},
               batch_dependent=False, foldable=False)
def _build_frn(p: dict, ctx: NormContext) -> NormRecipe:
    ctor = functools.partial(FilterResponseNorm2d, eps=p["eps"], learnable_eps=bool(p["learnable_eps"]))
    return NormRecipe("frn", ctor, params=p)


@register_norm("brn", types=(BatchRenorm2d,),
               defaults={"eps": 1e-5, "momentum": 0.1, "r_max": 3.0, "d_max": 5.0, "warmup_iters": 5000,
                         "r_max_iters": 40000, "d_max_iters": 25000, "schedule_ref_iters": None,
                         "impl": "auto"},
               batch_dependent=True, foldable=True)
def _build_brn(p: dict, ctx: NormContext) -> NormRecipe:
    # Schedule lengths are given in training iterations (as in Ioffe 2017); with schedule_ref_iters set they
    # are scaled by total_iters / schedule_ref_iters ("scale these with run length").
    scale = 1.0
    if p["schedule_ref_iters"] is not None and ctx.total_iters is not None:
        scale = ctx.total_iters / p["schedule_ref_iters"]
    ctor = functools.partial(
        BatchRenorm2d, group_size=ctx.group_size, eps=p["eps"], momentum=p["momentum"], r_max=p["r_max"],
        d_max=p["d_max"], warmup_iters=_iters(p["warmup_iters"], ctx, scale),
        r_max_iters=_iters(p["r_max_iters"], ctx, scale), d_max_iters=_iters(p["d_max_iters"], ctx, scale),
        impl=p["impl"])
    return NormRecipe("brn", ctor, batch_dependent=True, params=p)


SIMULATED_BATCH = 32  # MABN's default window is simulated batch / n (paper: n = 2 -> m = 16)


MABN_SWITCHES = {"forward_stat": "sma", "backward_stat": "sma", "average": "sma", "renorm": True}


@register_norm("mabn", types=(MABN2d,),
               defaults={"window": None, "eps": 1e-5, "momentum": 0.02, "warmup_iters": 100,
                         "renorm_iters": 1000, "r_max": 5.0, "weight_centering": True, **MABN_SWITCHES,
                         "impl": "auto"},
               batch_dependent=True, foldable=True, switches=(*MABN_SWITCHES, "weight_centering"))
def _build_mabn(p: dict, ctx: NormContext) -> NormRecipe:
    n = ctx.norm_batch or ctx.device_batch
    window = p["window"] if p["window"] is not None else max(1, SIMULATED_BATCH // n) if n else 16
    ctor = functools.partial(
        MABN2d, window=window, group_size=ctx.group_size, eps=p["eps"], momentum=p["momentum"],
        warmup_iters=_iters(p["warmup_iters"], ctx), renorm_iters=_iters(p["renorm_iters"], ctx),
        r_max=p["r_max"], impl=p["impl"], **{k: p[k] for k in MABN_SWITCHES})
    return NormRecipe("mabn", ctor, weight_centering=bool(p["weight_centering"]), batch_dependent=True,
                      params={**p, "window": window})


@register_norm("cbn", types=(CrossIterationBatchNorm2d,),
               defaults={"window": 4, "burnin_iters": None, "eps": 1e-5, "momentum": 0.1},
               batch_dependent=True, foldable=True)
def _build_cbn(p: dict, ctx: NormContext) -> NormRecipe:
    # Official COCO setting: window 4 (the current and 3 previous batches), burn-in 8 of 12 epochs; burn-in
    # defaults to 2/3 of the run when its length is known.
    burnin = p["burnin_iters"]
    if burnin is None:
        burnin = (2 * ctx.total_iters) // 3 if ctx.total_iters else 0
    ctor = functools.partial(CrossIterationBatchNorm2d, window=p["window"], burnin_iters=_iters(burnin, ctx),
                             group_size=ctx.group_size, eps=p["eps"], momentum=p["momentum"])
    return NormRecipe("cbn", ctor, weight_centering=True, batch_dependent=True,
                      params={**p, "burnin_iters": burnin})


@register_norm("syncbn", types=(nn.SyncBatchNorm,), defaults={"eps": 1e-5, "momentum": 0.1},
               batch_dependent=True, foldable=True)
def _build_syncbn(p: dict, ctx: NormContext) -> NormRecipe:
    # SyncBN normalizes over the whole global batch (device batch x world size); it has no group_size.
    if ctx.group_size is not None:
        raise ValueError(f"syncbn normalizes over the global batch; normalization batch {ctx.norm_batch} "
                         f"!= device batch {ctx.device_batch} (use batch_mode=device or bn with groups)")
    return NormRecipe("syncbn", functools.partial(SyncBatchNorm, eps=p["eps"], momentum=p["momentum"]),
                      batch_dependent=True, params=p)


@register_norm("frozenbn", types=(FrozenBatchNorm2d,), defaults={"eps": 1e-5}, batch_dependent=False,
               foldable=True)
def _build_frozenbn(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("frozenbn", functools.partial(FrozenBatchNorm2d, eps=p["eps"]), params=p)
