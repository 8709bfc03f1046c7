"""GroupNorm with Weight Standardization of the convs that feed it (Qiao et al. 2019, "Micro-Batch Training
with Batch-Channel Normalization and Weight Standardization", Eq. 5-6).

Ŵ[o] = (W[o] − mean(W[o])) / (std(W[o]) + ε) over each output filter's in×kh×kw values. The official code
(joe-siyuan-qiao/WeightStandardization) uses torch's unbiased std and adds ε outside the square root; so does
this. Applied like MABN's weight centering: a ``torch.nn.utils.parametrize`` parametrization on each conv that
feeds a GroupNormWS, so the stored parameter stays the raw weight and baking it is one call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import check_positive
from .groupnorm import GroupNorm


class StandardizedWeight(nn.Module):
    """Parametrization W -> (W − mean) / (std + eps), statistics over all axes but the output-filter axis."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = float(check_positive("ws_eps", eps, allow_zero=True))

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(self, weight: Tensor) -> Tensor:
        dims = tuple(range(1, weight.dim()))
        fan_in = weight[0].numel() if weight.shape[0] else 1
        # unbiased as the official code, except for a single-value filter whose unbiased std is undefined
        std, mean = torch.std_mean(weight, dim=dims, correction=1 if fan_in > 1 else 0, keepdim=True)
        return (weight - mean) / (std + self.eps)


class GroupNormWS(GroupNorm):
    """GroupNorm (groups capped at the channels) whose feeding convs are weight-standardized when the model's
    convs are paired with their norms (``mabn.norms.center_conv_weights``)."""

    def __init__(self, num_channels: int, *, num_groups: int = 32, eps: float = 1e-5, ws_eps: float = 1e-5):
        super().__init__(num_channels, num_groups=num_groups, eps=eps)
        self.ws_eps = float(check_positive("ws_eps", ws_eps, allow_zero=True))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws_eps={self.ws_eps}"

    def feeding_conv_parametrization(self) -> nn.Module:
        """The weight parametrization of the conv whose output this layer normalizes."""
        return StandardizedWeight(self.ws_eps)
