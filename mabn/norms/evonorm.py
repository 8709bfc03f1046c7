"""EvoNorm-S0 (Liu, Brock, Simonyan, Le; NeurIPS 2020, Table 1): a batch-free normalization-activation layer.

y = x·σ(v·x) / √(Var_g(x) + ε)·γ + β, Var_g the biased variance over each sample's group of C/G channels × H×W
(G = 32). It replaces a BN-ReLU pair. Where the network has a norm without activation (a residual branch's
last norm, a projection shortcut), the official code (tensorflow/tpu resnet_model.py, ``evonorm`` with
``nonlinearity=False``) applies the affine map γx + β alone; ``apply_act=False`` is that variant.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._common import check_input, check_positive, spatial_dot, spatial_sum, spatial_sum_sq, stat_dtype
from ._table import register_norm
from .protocol import NormLayer
from .registry import NormContext, NormRecipe


def evonorm_groups(num_channels: int, num_groups: int) -> int:
    """The official group count: the largest divisor of C not above ``num_groups`` (min(G, C) for powers of 2)."""
    groups = min(num_groups, num_channels)
    while num_channels % groups:
        groups -= 1
    return groups


def _nc(t: Tensor, x: Tensor) -> Tensor:
    """(N, C) or (C,) values -> broadcastable against x (N, C, *)."""
    lead = x.shape[:2] if t.dim() == 2 else (1, -1)
    return t.view(*lead, *([1] * (x.dim() - 2)))


def _per_channel(t: Tensor, channels: int) -> Tensor:
    """(N, G) per-group values -> (N, C), each group's value repeated over its C/G channels."""
    n, g = t.shape
    return t[:, :, None].expand(n, g, channels // g).reshape(n, channels)


class _EvoNormS0(torch.autograd.Function):
    """EvoNorm-S0 with a closed-form backward: x is the only activation-sized tensor kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, v, groups: int, eps: float):
        dt = stat_dtype(x)  # float32 statistics and arithmetic under autocast, output in x's dtype
        xd = x.to(dt)
        n, c = x.shape[:2]
        count = (c // groups) * math.prod(x.shape[2:])
        mean = spatial_sum(xd).view(n, groups, -1).sum(dim=-1) / count  # (N, G)
        # two-pass variance: never negative, so no NaN from the square root (E[x²] − E[x]² can be)
        var = spatial_sum_sq(xd - _nc(_per_channel(mean, c), x)).view(n, groups, -1).sum(dim=-1) / count
        inv = torch.rsqrt(var + eps)  # (N, G)
        swish = xd * torch.sigmoid(xd * _nc(v.to(dt), x))
        y = torch.addcmul(_nc(bias.to(dt), x), swish, _nc(weight.to(dt) * _per_channel(inv, c), x))
        ctx.save_for_backward(x, weight, v, mean, inv)
        ctx.groups, ctx.count = groups, count
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        x, weight, v, mean, inv = ctx.saved_tensors
        dt, c, count = inv.dtype, x.shape[1], ctx.count
        xd, dy = x.to(dt), dz.to(dt)
        inv_c = _per_channel(inv, c)  # (N, C)
        s = torch.sigmoid(xd * _nc(v.to(dt), x))  # recomputed: σ(v·x)
        s_u = spatial_dot(dy, xd * s)  # Σ dy·u per (sample, channel), u = x·σ(v·x)
        w = weight.to(dt)
        # u/√(var+ε): ∂var/∂x = 2(x − μ)/M, so the variance path adds c1·(x − μ) with c1 = −inv³·Σγ·Σdy·u / M
        c1 = _per_channel(-inv.pow(3) * (w * s_u).view(x.shape[0], ctx.groups, -1).sum(dim=-1) / count, c)
        du = dy * _nc(w * inv_c, x)
        q = torch.addcmul(s, s, s, value=-1).mul_(du).mul_(xd)  # du·σ'·x, σ' = s(1 − s)
        dv = spatial_dot(q, xd).sum(dim=0)  # ∂u/∂v = x²·σ'
        # ∂u/∂x = σ + v·x·σ'
        dx = du.mul_(s).addcmul_(q, _nc(v.to(dt), x)).addcmul_(xd, _nc(c1, x))
        dx = dx.sub_(_nc(c1 * _per_channel(mean, c), x)).to(x.dtype)
        dweight = (s_u * inv_c).sum(dim=0).to(weight.dtype)
        return dx, dweight, spatial_sum(dy).sum(dim=0).to(weight.dtype), dv.to(v.dtype), None, None


class EvoNormS0(NormLayer, nn.Module):
    """EvoNorm-S0 with per-channel v (init 1), γ (init 1), β (init 0); ``apply_act=False``: γx + β only."""

    carries_activation = True  # replaces norm + ReLU: model builders leave out the ReLU after it

    def __init__(self, num_features: int, *, num_groups: int = 32, eps: float = 1e-5, apply_act: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_positive("num_groups", num_groups, integer=True)
        self.num_features = num_features
        self.num_groups = evonorm_groups(num_features, num_groups)
        self.eps = float(check_positive("eps", eps, allow_zero=True))
        self.apply_act = bool(apply_act)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.v = nn.Parameter(torch.ones(num_features, **factory)) if self.apply_act else None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
                f"apply_act={self.apply_act}")

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
        return _EvoNormS0.apply(x, self.weight, self.bias, self.v, self.num_groups, self.eps)


@register_norm("evonorm_s0", types=(EvoNormS0,), defaults={"num_groups": 32, "eps": 1e-5},
               batch_dependent=False, foldable=False)
def _build_evonorm_s0(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("evonorm_s0", functools.partial(EvoNormS0, num_groups=p["num_groups"], eps=p["eps"]),
                      params=p)
