"""The project's norms inside detectron2: names in yacs configs resolved to the registry's constructors.

detectron2's ``get_norm`` takes a name from a dict literal inside the function or any callable
``ctor(channels)``, so the project's layers reach detectron2 as callables and nothing of detectron2 is
patched: LazyConfigs are handed the constructor (``model.build_mask_rcnn``), and the yacs builders that
``mabn.d2.model`` registers resolve the project's names (``resolve_norm``) before calling detectron2's
stock constructors. Their runtime facts (normalization batch, images per device, iterations) and
hyper-parameters are config keys, as detectron2's ``projects/`` carry theirs: ``add_mabn_config(cfg)`` adds
``MODEL.MABN.*``; without them they follow ``SOLVER`` (n = the images per device). ``set_norm(cfg, "mabn")``
names a norm at every site and the three builders that resolve it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from mabn.norms import (
    FrozenBatchNorm2d,
    NormContext,
    NormRecipe,
    batch_dependent_types,
    build_norm,
    canonical_name,
    registered_norms,
)

# detectron2's own names (layers/batch_norm.py: get_norm's table) keep detectron2's meaning; any other
# registered name, in any case ("MABN", "mabn", "BRN"), is the project's layer
DETECTRON2_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")

# the yacs builders that resolve the project's names (mabn/d2/model.py registers them)
BUILDERS = {"MODEL.BACKBONE.NAME": "build_mabn_resnet_fpn_backbone", "MODEL.ROI_BOX_HEAD.NAME": "build_mabn_box_head",
            "MODEL.ROI_MASK_HEAD.NAME": "build_mabn_mask_head"}
NORM_SITES = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")


def add_mabn_config(cfg) -> None:
    """Add the project's keys to a detectron2 yacs config (as ``add_tridentnet_config`` adds MODEL.TRIDENT):

    - ``MODEL.MABN.NORM_BATCH``: images per normalization batch n (0: the images per device);
    - ``MODEL.MABN.IMAGES_PER_DEVICE``: 0: ``SOLVER.IMS_PER_BATCH`` / the world size;
    - ``MODEL.MABN.TOTAL_ITERS``: iterations the schedules of brn and mabn span (0: ``SOLVER.MAX_ITER``);
    - ``MODEL.MABN.PARAMS``: hyper-parameters per registry name, e.g. ``{"mabn": {"r_max": 3.0}}``.
    """
    from detectron2.config import CfgNode

    cfg.MODEL.MABN = CfgNode()
    cfg.MODEL.MABN.NORM_BATCH = 0
    cfg.MODEL.MABN.IMAGES_PER_DEVICE = 0
    cfg.MODEL.MABN.TOTAL_ITERS = 0
    cfg.MODEL.MABN.PARAMS = CfgNode(new_allowed=True)


def set_norm(cfg, name: str, **params) -> None:
    """Name one norm at every site of a Mask R-CNN yacs config (backbone, FPN, box and mask heads) and the
    three builders that resolve the project's names; ``params``: its hyper-parameters (MODEL.MABN.PARAMS)."""
    if "MABN" not in cfg.MODEL:
        add_mabn_config(cfg)
    canonical = project_norm_name(name)
    for key, builder in BUILDERS.items():
        _set(cfg, key, builder)
    for key in NORM_SITES:
        _set(cfg, key, name)
    if params:
        from detectron2.config import CfgNode

        cfg.MODEL.MABN.PARAMS[canonical] = CfgNode(dict(params))


def _set(cfg, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value


def project_norm_name(norm: Any) -> str | None:
    """The registry name a detectron2 ``norm`` value selects, or None when it is detectron2's own (or empty);
    a name neither knows is a ValueError that names both lists."""
    if not isinstance(norm, str) or norm in DETECTRON2_NAMES or norm == "":
        return None
    name = canonical_name(norm)
    if name is None:
        raise ValueError(f"unknown norm {norm!r}: detectron2's names are {', '.join(DETECTRON2_NAMES)}; the "
                         f"project's (any case) are {', '.join(registered_norms())}")
    return name


def norm_context_from_cfg(cfg) -> tuple[NormContext, Mapping[str, Mapping[str, Any]]]:
    """The runtime facts and hyper-parameters of a yacs config: MODEL.MABN (add_mabn_config), else SOLVER."""
    from detectron2.utils import comm

    world = comm.get_world_size()
    keys = cfg.MODEL.get("MABN") or {}
    per_device = keys.get("IMAGES_PER_DEVICE") or None
    if per_device is None and cfg.SOLVER.IMS_PER_BATCH % world == 0:
        per_device = cfg.SOLVER.IMS_PER_BATCH // world
    params = {canonical_name(k) or k: dict(v) for k, v in (keys.get("PARAMS") or {}).items()}
    ctx = NormContext(norm_batch=keys.get("NORM_BATCH") or None, device_batch=per_device, world_size=world,
                      total_iters=keys.get("TOTAL_ITERS") or cfg.SOLVER.MAX_ITER)
    return ctx, params


def resolve_norm(norm: Any, cfg=None) -> tuple[Any, NormRecipe | None]:
    """A yacs ``NORM`` value as detectron2's ``get_norm`` takes it, and the project recipe behind it.

    The project's names (``mabn``, ``MABN``, ``brn``, ...) become the registry's constructor, built with the
    facts of ``cfg`` (``norm_context_from_cfg``; no cfg: the registry's defaults); detectron2's own names
    (``BN``, ``GN``, ``FrozenBN``, ``""``) and callables pass unchanged, with no recipe.
    """
    name = project_norm_name(norm)
    if name is None:
        return norm, None
    ctx, params = norm_context_from_cfg(cfg) if cfg is not None else (NormContext(), {})
    recipe = build_norm({"name": name, **params.get(name, {})}, ctx)
    return recipe.ctor, recipe


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
