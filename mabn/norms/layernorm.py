"""Layer and Instance Normalization of conv features as GroupNorm(1) and GroupNorm(C) (Wu & He 2018, Sec. 3.1)."""

from __future__ import annotations

import functools

from torch import nn

from ._table import register_norm
from .protocol import NormLayer
from .registry import NormContext, NormRecipe


class LayerNorm2d(NormLayer, nn.GroupNorm):
    """Layer Normalization (Ba et al. 2016) over each sample's C×H×W values, per-channel affine."""

    def __init__(self, num_channels: int, *, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(1, num_channels, eps=eps, device=device, dtype=dtype)


class InstanceNorm2d(NormLayer, nn.GroupNorm):
    """Instance Normalization (Ulyanov et al. 2016) over each sample's channel's H×W values.

    Unlike ``nn.InstanceNorm2d`` it is affine and keeps no running statistics (batch-free in eval too).
    """

    def __init__(self, num_channels: int, *, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(num_channels, num_channels, eps=eps, device=device, dtype=dtype)


@register_norm("ln", types=(LayerNorm2d,), defaults={"eps": 1e-5}, batch_dependent=False, foldable=False)
def _build_ln(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("ln", functools.partial(LayerNorm2d, eps=p["eps"]), params=p)


@register_norm("in", types=(InstanceNorm2d,), defaults={"eps": 1e-5}, batch_dependent=False, foldable=False)
def _build_in(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("in", functools.partial(InstanceNorm2d, eps=p["eps"]), params=p)
