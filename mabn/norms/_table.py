"""The registry's table: names -> builders and facts, and the type tuples derived from it (imports no layer).

Each layer file registers its own builder (``@register_norm`` beside the class), so a new norm is one file,
its line in ``mabn/norms/__init__.py`` and its tests. Names are case-insensitive (``"MABN"`` is ``"mabn"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered norm: its builder, layer types, hyper-parameter defaults and facts."""

    name: str
    builder: Callable
    types: tuple[type, ...]
    defaults: Mapping[str, Any]
    batch_dependent: bool
    foldable: bool
    switches: tuple[str, ...] = ()
    groupable: bool = True  # a batch-dependent norm that can normalize groups of a device batch (not syncbn)


_REGISTRY: dict[str, Entry] = {}


def register_norm(name: str, *, types: tuple[type, ...], defaults: Mapping[str, Any], batch_dependent: bool,
                  foldable: bool, switches: tuple[str, ...] = (), groupable: bool = True):
    """Decorator registering ``builder(params, context) -> NormRecipe`` under ``name`` (lower case).

    ``batch_dependent``: its training output depends on the other samples of the normalization batch;
    ``foldable``: its eval mode is a per-channel affine map (``eval_affine``) that folds into a conv;
    ``switches``: the hyper-parameters that make another variant of the method (ablations), not another
    setting of it; results tables name a run's non-default switches in its row (``norm_variant``);
    ``groupable=False``: a batch-dependent norm that normalizes whole (global) batches only (syncbn)."""

    def deco(builder):
        if name != name.lower():
            raise ValueError(f"norm names are lower case, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(f"norm {name!r} is already registered")
        unknown = sorted(set(switches) - set(defaults))
        if unknown:
            raise ValueError(f"norm {name!r}: switches {unknown} have no default")
        _REGISTRY[name] = Entry(name, builder, tuple(types), dict(defaults), batch_dependent, foldable,
                                tuple(switches), groupable)
        return builder

    return deco


def registered_norms() -> tuple[str, ...]:
    """Every registered norm name, sorted."""
    return tuple(sorted(_REGISTRY))


def canonical_name(name: Any) -> str | None:
    """The registered name ``name`` means (case-insensitive), or None."""
    if not isinstance(name, str):
        return None
    key = name.lower()
    return key if key in _REGISTRY else None


def entry(name: Any) -> Entry:
    """The registered entry of ``name`` (case-insensitive); ValueError listing the registered names."""
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown norm {name!r}; registered norms: {', '.join(registered_norms())}")
    return _REGISTRY[key]


def norm_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters a norm accepts, with their defaults (what configs/norm/<name>.yaml mirrors)."""
    return dict(entry(name).defaults)


def norm_variant(name: str, params: Mapping[str, Any] | None) -> str:
    """The non-default switches of a run's norm params, e.g. ``"backward_stat=batch, renorm=false"``;
    "" for the method as published (and for params recorded before a switch existed, or unknown norms)."""
    key = canonical_name(name)
    if key is None or not params:
        return ""
    found = _REGISTRY[key]
    changed = [(k, params[k]) for k in found.switches if k in params and params[k] != found.defaults[k]]
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changed)


def _types(pred: Callable[[Entry], bool]) -> tuple[type, ...]:
    out: list[type] = []
    for found in _REGISTRY.values():
        if pred(found):
            out.extend(t for t in found.types if t not in out)
    return tuple(out)


def norm_types() -> tuple[type, ...]:
    """All normalization layer types (for no-weight-decay groups, precise-BN, folding, diagnostics)."""
    return _types(lambda e: True)


def batch_dependent_types() -> tuple[type, ...]:
    """Types whose training output depends on the other samples of the batch (bn, brn, mabn, syncbn, cbn)."""
    return _types(lambda e: e.batch_dependent)


def foldable_types() -> tuple[type, ...]:
    """Types whose eval mode is a per-channel affine map that folds into the preceding conv."""
    return _types(lambda e: e.foldable)
