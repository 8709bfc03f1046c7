"""Filter Response Normalization with the Thresholded Linear Unit (Singh & Krishnan, CVPR 2020, Eq. 1-5).

ν² = mean over H×W of x² (per sample and channel), y = γ·x/√(ν² + |ε|) + β, z = max(y, τ) with a per-channel
learned τ (init 0). Batch-free. FRN + TLU replaces a BN-ReLU pair; where BN has no ReLU after it, FRN is used
without TLU (``apply_act=False``). ε may be learned (the paper does it for 1×1 activation maps, where ν² is a
single value); the paper's listing uses |ε| so a learned ε cannot go negative.
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


def _nc(t: Tensor, x: Tensor) -> Tensor:
    """(N, C) or (C,) values -> broadcastable against x (N, C, *)."""
    lead = x.shape[:2] if t.dim() == 2 else (1, -1)
    return t.view(*lead, *([1] * (x.dim() - 2)))


class _FRN(torch.autograd.Function):
    """FRN (+ TLU) with a closed-form backward: x is the only activation-sized tensor kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps_param, eps: float):
        dt = stat_dtype(x)  # float32 statistics and arithmetic under autocast, output in x's dtype
        xd = x.to(dt)
        count = math.prod(x.shape[2:])
        eps_t = eps_param.to(dt).abs() if eps_param is not None else eps
        inv = torch.rsqrt(spatial_sum_sq(xd) / count + eps_t)  # 1/√(ν² + |ε|), (N, C)
        y = torch.addcmul(_nc(bias.to(dt), x), xd, _nc(weight.to(dt) * inv, x))
        if tau is not None:
            y = torch.maximum(y, _nc(tau.to(dt), x))
        ctx.save_for_backward(x, weight, bias, tau, eps_param, inv)
        ctx.count = count
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        x, weight, bias, tau, eps_param, inv = ctx.saved_tensors
        dt = inv.dtype
        xd, dy = x.to(dt), dz.to(dt)
        k = weight.to(dt) * inv  # (N, C)
        dtau = None
        if tau is not None:  # TLU: the gradient goes to y where y > τ, to τ elsewhere
            passed = torch.addcmul(_nc(bias.to(dt), x), xd, _nc(k, x)) > _nc(tau.to(dt), x)
            total = spatial_sum(dy)
            dy = torch.where(passed, dy, 0.0)
            dtau = (total - spatial_sum(dy)).sum(dim=0).to(tau.dtype)
        s1, s2 = spatial_sum(dy), spatial_dot(dy, xd)  # Σ dy, Σ dy·x per (sample, channel)
        # y = γ·x·inv + β, inv = (Σx²/M + |ε|)^(-1/2):  ∂L/∂x = k·dy − x·k·inv²·Σ(dy·x)/M
        dx = None
        if ctx.needs_input_grad[0]:
            dx = xd * _nc(-k * inv * inv * s2 / ctx.count, x)
            dx = dx.addcmul_(dy, _nc(k, x)).to(x.dtype)
        dweight = (s2 * inv).sum(dim=0).to(weight.dtype)
        dbias = s1.sum(dim=0).to(bias.dtype)
        deps = None
        if eps_param is not None:  # ∂inv/∂|ε| = −inv³/2, and ∂|ε|/∂ε = sign(ε)
            deps = (-0.5 * (k * inv * inv * s2).sum() * torch.sign(eps_param.to(dt))).to(eps_param.dtype)
        return dx, dweight, dbias, dtau, deps, None


class FilterResponseNorm2d(NormLayer, nn.Module):
    """FRN (+ TLU when ``apply_act``), per-channel γ (init 1), β, τ (init 0); ε a scalar, learned if asked."""

    carries_activation = True  # the TLU replaces the ReLU: model builders leave out the ReLU after it

    def __init__(self, num_features: int, *, eps: float = 1e-6, learnable_eps: bool = False,
                 apply_act: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_features = num_features
        self.learnable_eps = bool(learnable_eps)
        self.apply_act = bool(apply_act)
        eps = float(check_positive("eps", eps, allow_zero=True))
        factory = {"device": device, "dtype": dtype}
        if self.learnable_eps:
            self.eps = nn.Parameter(torch.tensor(eps, **factory))
        else:
            self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.tau = nn.Parameter(torch.zeros(num_features, **factory)) if self.apply_act else None

    def extra_repr(self) -> str:
        eps = "learned" if self.learnable_eps else self.eps
        return f"{self.num_features}, eps={eps}, apply_act={self.apply_act}"

    def without_activation(self) -> FilterResponseNorm2d:
        """The variant for a position without activation (no TLU), with this layer's γ, β and ε."""
        eps = 0.0 if self.learnable_eps else self.eps  # a learned ε is copied below, with γ and β
        other = FilterResponseNorm2d(self.num_features, eps=eps, learnable_eps=self.learnable_eps,
                                     apply_act=False)
        other.to(self.weight).load_state_dict(self.state_dict(), strict=False)
        return other

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        eps_param = self.eps if self.learnable_eps else None
        return _FRN.apply(x, self.weight, self.bias, self.tau if self.apply_act else None, eps_param,
                          0.0 if self.learnable_eps else self.eps)


@register_norm("frn", types=(FilterResponseNorm2d,), defaults={"eps": 1e-6, "learnable_eps": False},
               batch_dependent=False, foldable=False)
def _build_frn(p: dict, ctx: NormContext) -> NormRecipe:
    ctor = functools.partial(FilterResponseNorm2d, eps=p["eps"], learnable_eps=bool(p["learnable_eps"]))
    return NormRecipe("frn", ctor, params=p)
