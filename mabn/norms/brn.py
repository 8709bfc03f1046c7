"""Batch Renormalization (Ioffe, NeurIPS 2017) with the grouped normalization batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._centred import centred_norm
from ._common import (
    check_group_size,
    check_input,
    check_momentum,
    check_positive,
    empty_forward,
    num_groups,
    sequential_ema,
    stat_dtype,
)


class BatchRenorm2d(nn.Module):
    """Batch Renormalization: x̂ = (x − μ_B)/σ_B · r + d with r, d constants in backward (Ioffe 2017, Alg. 1).

    r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), σ = √(running_var + ε),
    σ_B = √(var_B + ε). Schedule (counted in normalization batches, ``num_batches_tracked``): plain BN
    (r_max = 1, d_max = 0) for the first ``warmup_iters``, then r_max ramps linearly to ``r_max`` by
    ``r_max_iters`` and d_max to ``d_max`` by ``d_max_iters``. Running statistics follow BatchNorm's update
    (unbiased variance), so with r_max = 1, d_max = 0 training equals BatchNorm exactly. Eval is BatchNorm's.
    """

    def __init__(self, num_features: int, *, group_size: int | None = None, eps: float = 1e-5,
                 momentum: float = 0.1, r_max: float = 3.0, d_max: float = 5.0, warmup_iters: int = 5000,
                 r_max_iters: int = 40000, d_max_iters: int = 25000):
        super().__init__()
        self.num_features = num_features
        self.group_size = check_group_size(group_size)
        self.eps = check_positive("eps", eps)
        self.momentum = check_momentum(momentum)
        if not r_max >= 1.0:
            raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
        self.r_max = float(r_max)
        self.d_max = float(check_positive("d_max", d_max, allow_zero=True))
        self.warmup_iters = int(check_positive("warmup_iters", warmup_iters, integer=True, allow_zero=True))
        for name, end in (("r_max_iters", r_max_iters), ("d_max_iters", d_max_iters)):
            check_positive(name, end, integer=True, allow_zero=True)
            if end < warmup_iters:
                raise ValueError(f"{name}={end} must be >= warmup_iters={warmup_iters} (ramps end after warm-up)")
        self.r_max_iters, self.d_max_iters = int(r_max_iters), int(d_max_iters)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, group_size={self.group_size}, "
                f"r_max={self.r_max}, d_max={self.d_max}, warmup_iters={self.warmup_iters}, "
                f"r_max_iters={self.r_max_iters}, d_max_iters={self.d_max_iters}")

    def _ramp(self, t: Tensor, end: int) -> Tensor:
        """0 up to warm-up, linear to 1 at ``end``, 1 after; t counts normalization batches from 1."""
        span = max(end - self.warmup_iters, 1)
        return ((t - self.warmup_iters) / span).clamp(0.0, 1.0)

    def clip_limits(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) in force at normalization batch t (a tensor: no host sync)."""
        t = t.to(torch.float64)
        r_max = 1.0 + (self.r_max - 1.0) * self._ramp(t, self.r_max_iters)
        d_max = self.d_max * self._ramp(t, self.d_max_iters)
        return r_max, d_max

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if x.shape[0] == 0:
            return empty_forward(x, self.weight, self.bias)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dt = stat_dtype(x)
        if not self.training:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
            return (x.to(dt) * scale.view(shape).to(dt) + shift.view(shape).to(dt)).to(x.dtype)
        groups, n = num_groups(x.shape[0], self.group_size)
        count = n * x[0, 0].numel()
        if count < 2:
            raise ValueError(f"BatchRenorm2d needs more than 1 value per channel in a normalization batch, "
                             f"got a group of {n} sample(s) of spatial size {tuple(x.shape[2:])}")

        def renorm(mean_b: Tensor, var_b: Tensor) -> tuple[Tensor, Tensor]:
            # r, d from the running statistics as each group sees them (sequential contract); the running
            # statistics then take the G group updates in order
            mu_seq, mu_end = sequential_ema(self.running_mean.to(dt), mean_b, self.momentum)
            var_seq, var_end = sequential_ema(self.running_var.to(dt), var_b * (count / (count - 1)), self.momentum)
            sigma = torch.sqrt(var_seq + self.eps)
            t = self.num_batches_tracked + 1 + torch.arange(groups, device=x.device)
            r_max, d_max = (lim.to(dt).view(groups, 1) for lim in self.clip_limits(t))
            r = torch.minimum(torch.maximum(torch.sqrt(var_b + self.eps) / sigma, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum((mean_b - mu_seq) / sigma, -d_max), d_max)
            self.running_mean.copy_(mu_end)
            self.running_var.copy_(var_end)
            self.num_batches_tracked.add_(groups)
            return r, d

        return centred_norm(x, self.weight, self.bias, groups, self.eps, renorm)[0]
