"""GroupNorm with Weight Standardization of the convs that feed it (Qiao et al. 2019, "Micro-Batch Training
with Batch-Channel Normalization and Weight Standardization", Eq. 5-6).

Ŵ[o] = (W[o] − mean(W[o])) / (std(W[o]) + ε) over each output filter's in×kh×kw values (``StandardizedWeight``,
in ``_weights``: the official code's unbiased std with ε outside the square root). The layer pairs with its
feeding conv (``pair_conv``) as MABN does for weight centering: a parametrization of the conv's weight.
"""

from __future__ import annotations

import functools

from torch import nn

from ._common import check_positive
from ._table import register_norm
from ._weights import StandardizedWeight, parametrize_weight
from .groupnorm import GroupNorm
from .registry import NormContext, NormRecipe

__all__ = ["GroupNormWS", "StandardizedWeight"]


class GroupNormWS(GroupNorm):
    """GroupNorm (groups capped at the channels) whose feeding convs are weight-standardized when the model's
    convs are paired with their norms (``mabn.norms.center_conv_weights``)."""

    def __init__(self, num_channels: int, *, num_groups: int = 32, eps: float = 1e-5, ws_eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__(num_channels, num_groups=num_groups, eps=eps, device=device, dtype=dtype)
        self.ws_eps = float(check_positive("ws_eps", ws_eps, allow_zero=True))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws_eps={self.ws_eps}"

    def pair_conv(self, conv: nn.Module) -> bool:
        """Weight standardization of the conv whose output this layer normalizes."""
        return parametrize_weight(conv, StandardizedWeight(self.ws_eps))


@register_norm("gnws", types=(GroupNormWS,), defaults={"num_groups": 32, "eps": 1e-5, "ws_eps": 1e-5},
               batch_dependent=False, foldable=False)
def _build_gnws(p: dict, ctx: NormContext) -> NormRecipe:
    ctor = functools.partial(GroupNormWS, num_groups=p["num_groups"], eps=p["eps"], ws_eps=p["ws_eps"])
    return NormRecipe("gnws", ctor, pairs_convs=True, params=p)  # pairs convs: weight standardization
