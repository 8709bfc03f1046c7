"""The centered normalization of BN and BRN over groups of consecutive samples, with a closed-form backward.

y = γ·(r·(x − μ_g)/σ_g + d) + β, μ_g and σ_g² (biased) over each group's samples and positions, r and d
per-group constants (BN: r = 1, d = 0; BRN: Ioffe 2017 Alg. 1). Autograd flows through μ_g and σ_g, r and d
are constants, so the input gradient is BN's, scaled by r:
dx = γ·r/σ·(dy − mean(dy) − x̂·mean(dy·x̂)),  x̂ = (x − μ)/σ.

Written for few passes over the activations: per-(sample, channel) sums (one fused reduction each), the
centered input computed once and kept for backward (instead of x), the output and the input gradient as
fused multiply-adds. The variance is two-pass (mean first, then the centered sum of squares), so inputs far
from zero lose no precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._common import group_sum, per_sample, spatial_dot, spatial_sum, spatial_sum_sq, stat_dtype

Renorm = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class _CenteredNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, renorm: Renorm | None):
        dt = stat_dtype(x)
        xd = x.to(dt)
        count = x.numel() // (groups * x.shape[1])
        mean = group_sum(spatial_sum(xd), groups) / count  # (G, C)
        xc = xd - per_sample(mean, x)
        var = group_sum(spatial_sum_sq(xc), groups) / count  # biased, as the normalization uses
        inv = torch.rsqrt(var + eps)
        if renorm is None:
            r = d = None
            k = weight.to(dt) * inv
            shift = bias.to(dt).expand_as(k)
        else:
            r, d = renorm(mean, var)
            k = weight.to(dt) * r * inv
            shift = bias.to(dt) + weight.to(dt) * d
        y = torch.addcmul(per_sample(shift, x), xc, per_sample(k, x)).to(x.dtype)
        ctx.save_for_backward(xc, weight, inv, r, d)
        ctx.groups, ctx.count, ctx.x_dtype = groups, count, x.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        xc, weight, inv, r, d = ctx.saved_tensors
        groups, count, dt = ctx.groups, ctx.count, inv.dtype
        dyd = dy.to(dt)
        s1 = group_sum(spatial_sum(dyd), groups)  # Σ dy            (G, C)
        s2 = group_sum(spatial_dot(dyd, xc), groups) * inv  # Σ dy·x̂
        w = weight.to(dt)
        k = w * inv if r is None else w * r * inv
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            const = per_sample(-k * s1 / count, xc)
            dx = torch.addcmul(const, dyd, per_sample(k, xc)).addcmul_(xc, per_sample(-k * inv * s2 / count, xc))
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = (s2 if r is None else r * s2 + d * s1).sum(dim=0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = s1.sum(dim=0).to(weight.dtype)
        return dx, dw, db, None, None, None


def centered_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                 renorm: Renorm | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize each group of consecutive samples of ``x`` by its own mean and biased variance.

    ``renorm(mean, var) -> (r, d)`` (both (G, C), constants in backward) is called with the group statistics
    before the output is formed (BRN computes r, d and updates its running statistics there). Returns
    (y, mean, var), the statistics as (G, C) tensors in the statistics dtype, detached.
    """
    return _CenteredNorm.apply(x, weight, bias, groups, eps, renorm)
