"""Filter Response Normalization with the Thresholded Linear Unit (Singh & Krishnan, CVPR 2020, Eq. 1-5).

ν² = mean over H×W of x² (per sample and channel), y = γ·x/√(ν² + |ε|) + β, z = max(y, τ) with a per-channel
learned τ (init 0). Batch-free. FRN + TLU replaces a BN-ReLU pair; where BN has no ReLU after it, FRN is used
without TLU (``apply_act=False``). ε may be learned (the paper does it for 1×1 activation maps, where ν² is a
single value); the paper's listing uses |ε| so a learned ε cannot go negative.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import check_input, check_positive, stat_dtype


class FilterResponseNorm2d(nn.Module):
    """FRN (+ TLU when ``apply_act``), per-channel γ (init 1), β, τ (init 0); ε a scalar, learned if asked."""

    carries_activation = True  # the TLU replaces the ReLU: model builders leave out the ReLU after it

    def __init__(self, num_features: int, *, eps: float = 1e-6, learnable_eps: bool = False, apply_act: bool = True):
        super().__init__()
        self.num_features = num_features
        self.learnable_eps = bool(learnable_eps)
        self.apply_act = bool(apply_act)
        eps = float(check_positive("eps", eps, allow_zero=True))
        if self.learnable_eps:
            self.eps = nn.Parameter(torch.tensor(eps))
        else:
            self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if self.apply_act else None

    def extra_repr(self) -> str:
        eps = "learned" if self.learnable_eps else self.eps
        return f"{self.num_features}, eps={eps}, apply_act={self.apply_act}"

    def without_activation(self) -> FilterResponseNorm2d:
        """The variant for a position without activation (no TLU), with this layer's γ, β and ε."""
        eps = 0.0 if self.learnable_eps else self.eps  # a learned ε is copied below, with γ and β
        other = FilterResponseNorm2d(self.num_features, eps=eps, learnable_eps=self.learnable_eps, apply_act=False)
        other.to(self.weight).load_state_dict(self.state_dict(), strict=False)
        return other

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dt = stat_dtype(x)  # float32 statistics and arithmetic under autocast, output in x's dtype
        xd = x.to(dt)
        spatial = tuple(range(2, x.dim()))
        nu2 = xd.square().mean(dim=spatial, keepdim=True) if spatial else xd.square()
        eps = self.eps.to(dt).abs() if self.learnable_eps else self.eps
        y = torch.addcmul(self.bias.to(dt).view(shape), xd * torch.rsqrt(nu2 + eps), self.weight.to(dt).view(shape))
        if self.apply_act:
            y = torch.maximum(y, self.tau.to(dt).view(shape))
        return y.to(x.dtype)
