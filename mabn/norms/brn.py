"""Batch Renormalization (Ioffe, NeurIPS 2017) with the grouped normalization batch."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from . import _fused
from ._centered import centered_norm
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
from ._table import register_norm
from .protocol import NormLayer, centered_batch_forward, running_affine
from .registry import NormContext, NormRecipe


def clip_limits(t: Tensor, r_max: float, d_max: float, warmup_iters: int, r_max_iters: int,
                d_max_iters: int) -> tuple[Tensor, Tensor]:
    """(r_max, d_max) in force at normalization batch t: 1 and 0 through warm-up, then linear ramps."""

    def ramp(end: int) -> Tensor:  # 0 up to warm-up, linear to 1 at ``end``, 1 after; t counted from 1
        return ((t - warmup_iters) / max(end - warmup_iters, 1)).clamp(0.0, 1.0)

    t = t.to(torch.float64)
    return 1.0 + (r_max - 1.0) * ramp(r_max_iters), d_max * ramp(d_max_iters)


def renorm_state(mean_b: Tensor, var_b: Tensor, running_mean: Tensor, running_var: Tensor,
                 num_batches_tracked: Tensor, count: int, momentum: float, eps: float, r_max: float,
                 d_max: float, warmup_iters: int, r_max_iters: int,
                 d_max_iters: int) -> tuple[Tensor, Tensor]:
    """r, d (G, C) of each group from the running statistics as it sees them; then the G updates, in order."""
    groups, dt = mean_b.shape[0], mean_b.dtype
    mu_seq, mu_end = sequential_ema(running_mean.to(dt), mean_b, momentum)
    var_seq, var_end = sequential_ema(running_var.to(dt), var_b * (count / (count - 1)), momentum)
    sigma = torch.sqrt(var_seq + eps)
    t = num_batches_tracked + 1 + torch.arange(groups, device=mean_b.device)
    lim_r, lim_d = (lim.to(dt).view(groups, 1) for lim in
                    clip_limits(t, r_max, d_max, warmup_iters, r_max_iters, d_max_iters))
    r = torch.minimum(torch.maximum(torch.sqrt(var_b + eps) / sigma, 1.0 / lim_r), lim_r)
    d = torch.minimum(torch.maximum((mean_b - mu_seq) / sigma, -lim_d), lim_d)
    running_mean.copy_(mu_end)
    running_var.copy_(var_end)
    num_batches_tracked.add_(groups)
    return r, d


# The backward needs r and d, computed from the running statistics the forward then updates in place.
# AOTAutograd's partitioners may recompute such values in the backward from the (by then updated) buffers:
# the gradient silently uses the next step's statistics. Outputs of an opaque op are saved, not recomputed,
# and the op's schema declares the writes.
@torch.library.custom_op("mabn::renorm_state",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def renorm_state_op(mean_b: Tensor, var_b: Tensor, running_mean: Tensor, running_var: Tensor,
                    num_batches_tracked: Tensor, count: int, momentum: float, eps: float, r_max: float,
                    d_max: float, warmup_iters: int, r_max_iters: int,
                    d_max_iters: int) -> tuple[Tensor, Tensor]:
    """``renorm_state`` as an op: BRN's writes to its running statistics and counter, declared."""
    return renorm_state(mean_b, var_b, running_mean, running_var, num_batches_tracked, count, momentum, eps,
                        r_max, d_max, warmup_iters, r_max_iters, d_max_iters)


@renorm_state_op.register_fake
def _(mean_b, var_b, *args):
    return torch.empty_like(mean_b), torch.empty_like(mean_b)


class BatchRenorm2d(NormLayer, nn.Module):
    """Batch Renormalization: x̂ = (x − μ_B)/σ_B · r + d with r, d constants in backward (Ioffe 2017, Alg. 1).

    r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), σ = √(running_var + ε),
    σ_B = √(var_B + ε). Schedule (counted in normalization batches, ``num_batches_tracked``): plain BN
    (r_max = 1, d_max = 0) for the first ``warmup_iters``, then r_max ramps linearly to ``r_max`` by
    ``r_max_iters`` and d_max to ``d_max`` by ``d_max_iters``. Running statistics follow BatchNorm's update
    (unbiased variance), so with r_max = 1, d_max = 0 training equals BatchNorm exactly. Eval is BatchNorm's.
    ``impl`` picks the fused Triton path or the PyTorch reference, as in ``MABN2d``.
    """

    statistic = "mean_var"

    def __init__(self, num_features: int, *, group_size: int | None = None, eps: float = 1e-5,
                 momentum: float = 0.1, r_max: float = 3.0, d_max: float = 5.0, warmup_iters: int = 5000,
                 r_max_iters: int = 40000, d_max_iters: int = 25000, impl: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        self.impl = _fused.check_impl(impl)
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
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, group_size={self.group_size}, "
                f"r_max={self.r_max}, d_max={self.d_max}, warmup_iters={self.warmup_iters}, "
                f"r_max_iters={self.r_max_iters}, d_max_iters={self.d_max_iters}")

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        return running_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        return centered_batch_forward(x, self.weight, self.bias, self.eps)  # r = 1, d = 0

    def clip_limits(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) in force at normalization batch t (a tensor: no host sync)."""
        return clip_limits(t, self.r_max, self.d_max, self.warmup_iters, self.r_max_iters, self.d_max_iters)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if x.shape[0] == 0:
            return empty_forward(x, self.weight, self.bias)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dt = stat_dtype(x)
        if not self.training:
            scale, shift = self.eval_affine()
            return (x.to(dt) * scale.view(shape).to(dt) + shift.view(shape).to(dt)).to(x.dtype)
        groups, n = num_groups(x.shape[0], self.group_size)
        count = n * x[0, 0].numel()
        if count < 2:
            raise ValueError(f"BatchRenorm2d needs more than 1 value per channel in a normalization batch, "
                             f"got a group of {n} sample(s) of spatial size {tuple(x.shape[2:])}")

        tensors = [self.weight, self.bias, self.running_mean, self.running_var]
        if _fused.use_fused(self.impl, x, tensors, type(self).__name__, module=self):
            sched = (self.r_max, self.d_max, self.warmup_iters, self.r_max_iters, self.d_max_iters)
            return _fused.FusedCentered.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                             self.num_batches_tracked, groups, self.eps, self.momentum, sched)
        # under torch.compile: the state update as an op declaring the buffers it writes (renorm_state_op)
        state = renorm_state_op if torch.compiler.is_compiling() else renorm_state
        limits = (self.r_max, self.d_max, self.warmup_iters, self.r_max_iters, self.d_max_iters)

        def renorm(mean_b: Tensor, var_b: Tensor) -> tuple[Tensor, Tensor]:
            return state(mean_b, var_b, self.running_mean, self.running_var, self.num_batches_tracked, count,
                         self.momentum, self.eps, *limits)

        return centered_norm(x, self.weight, self.bias, groups, self.eps, renorm)[0]


@register_norm("brn", types=(BatchRenorm2d,),
               defaults={"eps": 1e-5, "momentum": 0.1, "r_max": 3.0, "d_max": 5.0, "warmup_iters": 5000,
                         "r_max_iters": 40000, "d_max_iters": 25000, "schedule_ref_iters": None,
                         "impl": "auto"},
               batch_dependent=True, foldable=True)
def _build_brn(p: dict, ctx: NormContext) -> NormRecipe:
    # Schedule lengths are given in training iterations (as in Ioffe 2017); with schedule_ref_iters set they
    # are scaled by total_iters / schedule_ref_iters ("scale these with run length").
    scale = 1.0
    if p["schedule_ref_iters"] is not None and ctx.total_iters is not None:
        scale = ctx.total_iters / p["schedule_ref_iters"]
    ctor = functools.partial(
        BatchRenorm2d, group_size=ctx.group_size, eps=p["eps"], momentum=p["momentum"], r_max=p["r_max"],
        d_max=p["d_max"], warmup_iters=ctx.iters(p["warmup_iters"], scale),
        r_max_iters=ctx.iters(p["r_max_iters"], scale), d_max_iters=ctx.iters(p["d_max_iters"], scale),
        impl=p["impl"])
    return NormRecipe("brn", ctor, params=p)
