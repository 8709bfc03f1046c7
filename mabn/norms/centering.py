"""Pairing a model's convs with the norms that normalize their outputs (``NormLayer.pair_conv``), as a model
transform: MABN's weight centering, GN+WS's weight standardization and CBN's Taylor compensation all start
from the same structural rule, and each norm does with its conv what its paper says.
"""

from __future__ import annotations

import itertools

from torch import nn
from torch.nn.utils import parametrize

from . import protocol
from ._table import norm_types
from ._weights import (  # re-exported: the parametrizations and their baking live in _weights
    CenteredWeight,
    StandardizedWeight,
    bake_weight_centering,
    is_centered,
    is_paired,
    unparametrize_weight,
)

__all__ = ["CenteredWeight", "StandardizedWeight", "bake_weight_centering", "center_conv_weights",
           "conv_norm_pairs", "is_centered", "is_paired", "unparametrize_weight"]


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.Module]]:
    """(conv name, conv, norm name, norm) for every Conv2d whose output feeds a registered norm directly.

    Structural rule, as torchvision/detectron2/pycls ResNets are written: the norm is the next module after
    the conv in registration order (a child of the conv counts, as in detectron2's ``Conv2d(norm=...)``)
    and has ``num_features == conv.out_channels``. A wrapper whose class sets ``wraps_norm`` (``NormAct2d``:
    a norm and its activation, where convert_norms replaced a timm BatchNormAct2d) is looked through.
    """
    types = norm_types()
    mods = [(n, m) for n, m in model.named_modules()
            if ".parametrizations" not in n and not isinstance(m, parametrize.ParametrizationList)
            and not getattr(type(m), "wraps_norm", False)]
    pairs = []
    for (cname, conv), (nname, norm) in itertools.pairwise(mods):
        if (isinstance(conv, nn.Conv2d) and isinstance(norm, types)
                and _channels(norm) == conv.out_channels):
            pairs.append((cname, conv, nname, norm))
    return pairs


def _channels(norm: nn.Module) -> int | None:
    return getattr(norm, "num_features", None) or getattr(norm, "num_channels", None)


def center_conv_weights(model: nn.Module, norm_types_to_center: tuple[type, ...] | None = None) -> list[str]:
    """Hand every conv feeding a norm of the given types (default: every registered norm) to that norm
    (``pair_conv``); returns the names of the convs a norm paired with. Idempotent."""
    targets = norm_types_to_center or (nn.Module,)
    return [cname for cname, conv, _, norm in conv_norm_pairs(model)
            if isinstance(norm, targets) and protocol.pair_conv(norm, conv)]
