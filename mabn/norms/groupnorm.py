"""Group Normalization (Wu & He, ECCV 2018) with a channel-first constructor."""

from __future__ import annotations

import functools

from torch import nn

from ._table import register_norm
from .protocol import NormLayer
from .registry import NormContext, NormRecipe


class GroupNorm(NormLayer, nn.GroupNorm):
    """``nn.GroupNorm(min(num_groups, C), C)``: groups capped at the channel count, as XBNBlock's GN does."""

    def __init__(self, num_channels: int, *, num_groups: int = 32, eps: float = 1e-5, device=None, dtype=None):
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"GroupNorm num_groups must be a positive int, got {num_groups!r}")
        groups = min(num_groups, num_channels)
        if num_channels % groups:
            raise ValueError(f"GroupNorm: num_groups={groups} must divide num_channels={num_channels}")
        super().__init__(groups, num_channels, eps=eps, device=device, dtype=dtype)


@register_norm("gn", types=(nn.GroupNorm,), defaults={"num_groups": 32, "eps": 1e-5},
               batch_dependent=False, foldable=False)
def _build_gn(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("gn", functools.partial(GroupNorm, num_groups=p["num_groups"], eps=p["eps"]), params=p)
