"""EvoNorm-S0 (Liu, Brock, Simonyan, Le; NeurIPS 2020, Table 1): a batch-free normalization-activation layer.

y = x·σ(v·x) / √(Var_g(x) + ε)·γ + β, Var_g the biased variance over each sample's group of C/G channels × H×W
(G = 32). It replaces a BN-ReLU pair. Where the network has a norm without activation (a residual branch's
last norm, a projection shortcut), the official code (tensorflow/tpu resnet_model.py, ``evonorm`` with
``nonlinearity=False``) applies the affine map γx + β alone; ``apply_act=False`` is that variant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import check_input, check_positive, stat_dtype


def evonorm_groups(num_channels: int, num_groups: int) -> int:
    """The official group count: the largest divisor of C not above ``num_groups`` (= min(G, C) for powers of 2)."""
    groups = min(num_groups, num_channels)
    while num_channels % groups:
        groups -= 1
    return groups


class EvoNormS0(nn.Module):
    """EvoNorm-S0 with per-channel v (init 1), γ (init 1), β (init 0); ``apply_act=False``: γx + β only."""

    carries_activation = True  # replaces norm + ReLU: model builders leave out the ReLU after it

    def __init__(self, num_features: int, *, num_groups: int = 32, eps: float = 1e-5, apply_act: bool = True):
        super().__init__()
        check_positive("num_groups", num_groups, integer=True)
        self.num_features = num_features
        self.num_groups = evonorm_groups(num_features, num_groups)
        self.eps = float(check_positive("eps", eps, allow_zero=True))
        self.apply_act = bool(apply_act)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if self.apply_act else None

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, apply_act={self.apply_act}"

    def without_activation(self) -> EvoNormS0:
        """The variant for a position without activation, with this layer's γ and β."""
        other = EvoNormS0(self.num_features, num_groups=self.num_groups, eps=self.eps, apply_act=False)
        other.to(self.weight).load_state_dict(self.state_dict(), strict=False)  # all but v
        return other

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dt = stat_dtype(x)  # float32 statistics and arithmetic under autocast, output in x's dtype
        xd = x.to(dt)
        w, b = self.weight.to(dt).view(shape), self.bias.to(dt).view(shape)
        if not self.apply_act or x.shape[0] == 0:  # N = 0: nothing to normalize (and no group variance)
            return torch.addcmul(b, xd, w).to(x.dtype)
        n, c, g = x.shape[0], x.shape[1], self.num_groups
        grouped = xd.reshape(n, g, (c // g) * math.prod(x.shape[2:]))  # explicit sizes: N may be 0
        # two-pass biased variance: never negative, so no NaN from the square root (E[x²]−E[x]² can be)
        var = torch.var(grouped, dim=-1, correction=0, keepdim=True)
        inv_std = torch.rsqrt(var + self.eps).expand(n, g, c // g).reshape(n, c, *([1] * (x.dim() - 2)))
        y = xd * torch.sigmoid(self.v.to(dt).view(shape) * xd) * inv_std
        return torch.addcmul(b, y, w).to(x.dtype)
