"""The detectron2 plugin: the only package that imports detectron2.

Importing it makes detectron2 resolve the project's norm names (``MODEL.RESNETS.NORM: "MABN"`` in yacs
configs; see ``norms.install``). LazyConfigs take the registry's constructors directly.
"""

from .norms import freeze_frozen_blocks, get_norm, install, norm_context, project_norm_name

install()

__all__ = ["freeze_frozen_blocks", "get_norm", "install", "norm_context", "project_norm_name"]
