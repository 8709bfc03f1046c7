"""The detectron2 plugin: the only package that imports detectron2.

LazyConfigs take the registry's constructors directly (``model.build_mask_rcnn``). yacs configs name the
project's norms (``MODEL.RESNETS.NORM: "MABN"``) through the backbone and heads ``model`` registers in
detectron2's registries; importing this package registers them and changes nothing else in detectron2.
"""

from . import model  # noqa: F401  (registers the yacs builders in detectron2's registries)
from .norms import add_mabn_config, freeze_frozen_blocks, project_norm_name, resolve_norm, set_norm

__all__ = ["add_mabn_config", "freeze_frozen_blocks", "project_norm_name", "resolve_norm", "set_norm"]
