"""The project's norms inside detectron2: names in yacs configs resolved to the registry's constructors.

detectron2's ``get_norm`` takes a name from a dict literal inside the function or any callable
``ctor(channels)``, so the project's layers reach detectron2 as callables and nothing of detectron2 is
patched: LazyConfigs are handed the constructor (``model.build_mask_rcnn``), and the yacs builders that
``mabn.d2.model`` registers resolve the project's names (``resolve_norm``) before calling detectron2's
stock constructors. Runtime facts (images per device, iterations) come from the innermost ``norm_context``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from mabn.norms import (
    FrozenBatchNorm2d,
    NormContext,
    NormRecipe,
    batch_dependent_types,
    build_norm,
    canonical_name,
)

# detectron2's own names (layers/batch_norm.py: get_norm's table) keep detectron2's meaning; any other
# registered name, in any case ("MABN", "mabn", "BRN"), is the project's layer
DETECTRON2_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")

_active: list[tuple[NormContext, Mapping[str, Mapping[str, Any]]]] = []


def project_norm_name(norm: Any) -> str | None:
    """The registry name a detectron2 ``norm`` value selects, or None when it is detectron2's own."""
    if not isinstance(norm, str) or norm in DETECTRON2_NAMES:
        return None
    return canonical_name(norm)


def recipe_for(name: str) -> NormRecipe:
    """The recipe of a project norm under the innermost ``norm_context`` (registry defaults outside one)."""
    ctx, params = _active[-1] if _active else (NormContext(), {})
    return build_norm({"name": name, **params.get(name, {})}, ctx)


def resolve_norm(norm: Any) -> tuple[Any, NormRecipe | None]:
    """A yacs ``NORM`` value as detectron2's ``get_norm`` takes it, and the project recipe behind it.

    The project's names (``mabn``, ``MABN``, ``brn``, ...) become the registry's constructor; detectron2's own
    names (``BN``, ``GN``, ``FrozenBN``, ``""``) and callables pass unchanged, with no recipe.
    """
    name = project_norm_name(norm)
    if name is None:
        return norm, None
    recipe = recipe_for(name)
    return recipe.ctor, recipe


@contextlib.contextmanager
def norm_context(context: NormContext,
                 params: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[None]:
    """Bind the runtime facts (images per device, iterations) and hyper-parameters that norms named in a
    yacs config are built with, e.g. ``with norm_context(NormContext(norm_batch=2, device_batch=2)):
    build_model(cfg)``. ``params`` maps a registry name to hyper-parameters (``{"mabn": {"window": 16}}``)."""
    _active.append((context, dict(params or {})))
    try:
        yield
    finally:
        _active.pop()


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
