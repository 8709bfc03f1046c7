"""The project's norms inside detectron2: by name in yacs configs, as callables in LazyConfigs, frozen stages.

detectron2 resolves a norm given by name in ``detectron2.layers.get_norm``, whose table of names is a dict
literal inside the function: it cannot be extended by registration. ``install()`` wraps it once: the
project's names (the registry's ``bn``, ``gn``, ``brn``, ``mabn``, ``syncbn``, ``frozenbn``, plus the
upper-case ``MABN`` and ``BRN`` that detectron2 does not define) build the project's layers; every other
value (detectron2's ``BN``, ``GN``, ``SyncBN``, ``FrozenBN``, ``LN``, callables, ``""``) goes to the original
function unchanged. Modules import ``get_norm`` by name (``from detectron2.layers import get_norm``), so the
wrapper replaces the reference in every detectron2 module that holds the original, and in the two places
later imports read it from.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from mabn.norms import (
    FrozenBatchNorm2d,
    NormContext,
    NormRecipe,
    batch_dependent_types,
    build_norm,
    registered_norms,
)

# detectron2 spells norms in upper case; these two are not in its table, so they can mean the project's layers
UPPER_CASE_NAMES = {"MABN": "mabn", "BRN": "brn"}

_active: list[tuple[NormContext, Mapping[str, Mapping[str, Any]]]] = []
_original_get_norm = None


def project_norm_name(norm: Any) -> str | None:
    """The registry name a detectron2 ``norm`` value selects, or None when it is detectron2's own."""
    if not isinstance(norm, str):
        return None
    if norm in registered_norms():
        return norm
    return UPPER_CASE_NAMES.get(norm)


def recipe_for(name: str) -> NormRecipe:
    """The recipe of a project norm under the innermost ``norm_context`` (registry defaults outside one)."""
    ctx, params = _active[-1] if _active else (NormContext(), {})
    return build_norm({"name": name, **params.get(name, {})}, ctx)


@contextlib.contextmanager
def norm_context(context: NormContext, params: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[None]:
    """Bind the runtime facts (images per device, iterations) and hyper-parameters that norms named in a
    yacs config are built with, e.g. ``with norm_context(NormContext(norm_batch=2, device_batch=2)):
    build_model(cfg)``. ``params`` maps a registry name to hyper-parameters (``{"mabn": {"window": 16}}``)."""
    _active.append((context, dict(params or {})))
    try:
        yield
    finally:
        _active.pop()


def get_norm(norm, out_channels):
    """detectron2's ``get_norm`` with the project's names added (see the module docstring)."""
    name = project_norm_name(norm)
    if name is None:
        return _original_get_norm(norm, out_channels)
    return recipe_for(name).ctor(out_channels)


def install() -> None:
    """Make detectron2 resolve the project's norm names (idempotent)."""
    global _original_get_norm
    import detectron2.layers
    import detectron2.layers.batch_norm as batch_norm

    if _original_get_norm is None:
        _original_get_norm = batch_norm.get_norm
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith("detectron2")
                and getattr(module, "get_norm", None) is _original_get_norm):
            module.get_norm = get_norm
    # modules imported later read it from here
    batch_norm.get_norm = detectron2.layers.get_norm = get_norm


def freeze_frozen_blocks(model: nn.Module) -> list[str]:
    """Replace batch-dependent norms inside frozen detectron2 blocks by FrozenBatchNorm2d (in place).

    detectron2 freezes a block (``CNNBlockBase.freeze``: ``freeze_at``) by turning off its gradients and
    converting torch ``BatchNorm2d``/``SyncBatchNorm`` found by isinstance; MABN2d and BatchRenorm2d are
    not among them and would keep normalizing with live batch statistics and updating their state inside
    a frozen stage. Here every registry batch-dependent norm in a block without trainable parameters
    becomes a frozen copy of its eval-mode map. Returns the names of the converted layers.
    """
    from detectron2.layers import CNNBlockBase

    converted = []
    for block_name, block in model.named_modules():
        if not isinstance(block, CNNBlockBase) or any(p.requires_grad for p in block.parameters()):
            continue
        for name, module in list(block.named_modules()):
            if isinstance(module, batch_dependent_types()):
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attr, FrozenBatchNorm2d.from_batchnorm(module))
                converted.append(f"{block_name}.{name}")
    return converted
