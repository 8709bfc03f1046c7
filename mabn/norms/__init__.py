"""Every normalization layer of the project and the registry that names them (the only place norm classes live).

Importing this package registers every norm (each layer file registers its own builder); the protocol every
norm answers is ``mabn.norms.protocol``. Triton and inductor are imported only when a fused or compiled path
is first used.
"""

from . import protocol
from .activations import apply_norm_activations
from .batchnorm import BatchNorm2d, CenteredConvBatchNorm2d, FrozenBatchNorm2d, SyncBatchNorm
from .brn import BatchRenorm2d
from .cbn import CrossIterationBatchNorm2d
from .centering import (
    CenteredWeight,
    StandardizedWeight,
    bake_weight_centering,
    center_conv_weights,
    conv_norm_pairs,
    is_centered,
    is_paired,
)
from .convert import ConversionReport, NormAct2d, convert_norms, revert_norms
from .evonorm import EvoNormS0
from .frn import FilterResponseNorm2d
from .gnws import GroupNormWS
from .groupnorm import GroupNorm
from .layernorm import InstanceNorm2d, LayerNorm2d
from .mabn import MABN2d
from .protocol import NormLayer, carries_activation
from .registry import (
    NormContext,
    NormRecipe,
    batch_dependent_types,
    build_norm,
    canonical_name,
    foldable_types,
    norm_defaults,
    norm_types,
    norm_variant,
    register_norm,
    registered_norms,
)
from .timm_layers import timm_norm_layer

__all__ = [
    "BatchNorm2d", "BatchRenorm2d", "CenteredConvBatchNorm2d", "CenteredWeight", "ConversionReport",
    "CrossIterationBatchNorm2d", "EvoNormS0", "FilterResponseNorm2d", "FrozenBatchNorm2d", "GroupNorm", "GroupNormWS",
    "InstanceNorm2d", "LayerNorm2d", "MABN2d", "NormAct2d", "NormContext", "NormLayer", "NormRecipe",
    "StandardizedWeight", "SyncBatchNorm", "apply_norm_activations", "bake_weight_centering",
    "batch_dependent_types", "build_norm", "canonical_name", "carries_activation", "center_conv_weights",
    "conv_norm_pairs", "convert_norms", "foldable_types", "is_centered", "is_paired", "norm_defaults",
    "norm_types", "norm_variant", "protocol", "register_norm", "registered_norms", "revert_norms",
    "timm_norm_layer",
]
