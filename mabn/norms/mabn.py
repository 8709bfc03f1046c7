"""Moving Average Batch Normalization (Yan et al., ICLR 2020, arXiv 2001.06838), grouped normalization batch."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from . import _fused
from . import _mabn_ops as ops
from ._common import (
    check_group_size,
    check_input,
    check_momentum,
    check_positive,
    empty_forward,
    num_groups,
    stat_dtype,
)
from ._table import register_norm
from ._weights import CenteredWeight, parametrize_weight
from .protocol import NormLayer, running_affine, second_moment_batch_forward
from .registry import NormContext, NormRecipe


class MABN2d(NormLayer, nn.Module):
    """Moving Average Batch Normalization for (N, C, H, W) inputs.

    Normalizes by the second moment (no centering), replaces the forward statistic χ² and the backward
    statistic Ψ by simple moving averages over the last ``window`` normalization batches, and applies a
    BRN-like correction r = clip(√(χ̄²+ε)/√(v+ε), 1/r_max, r_max) (constant in backward) after
    max(renorm_iters, warmup_iters) normalization batches; v (``running_var``) is an EMA of χ̄² and the
    eval statistic: y = γ·x/√(v+ε) + β. Every counter counts normalization batches; ``group_size`` n splits
    the device batch into groups that behave exactly like consecutive calls (the grouped contract,
    tests/test_grouped_contract.py).

    Buffers (all in ``state_dict``): ``running_var`` (C,), ``ring_x2`` and ``ring_gz`` (window, C) with the
    statistic of batch t in slot t mod window, ``num_batches_tracked`` (t of the last batch seen).
    ``ring_gz`` is written by the backward: a training-mode forward that never gets one (e.g. under
    ``torch.no_grad``) advances the counter and ``ring_x2`` but leaves its Ψ slot as it was, as the official
    layer does. ``impl``: "auto" (fused Triton kernels for float32/bf16/fp16 CUDA training calls of the
    official layer, see ``_fused``), "fused" or "torch" (the reference; always used under torch.compile, on
    CPU, for float64, with an ablation switch off its default — refused with impl="fused" — and on a step
    a tracer records).

    Ablation switches (defaults: the official layer): ``forward_stat`` / ``backward_stat`` ``"batch"``
    normalizes by χ²_t / uses Ψ_t of the current normalization batch only (the average is still kept);
    ``average="ema"`` replaces both SMAs by EMAs of the same center of mass, α = 2/(window+1), seeded with
    the first batch's statistic, kept in ``ema_x2`` and ``ema_gz`` (C,) instead of the rings (the default
    layer's state dict is unchanged); ``renorm=False`` keeps r ≡ 1. ``uses_default_statistics`` is False
    when any switch is off its default (the fused path, which has no ablations, falls back on this one).
    """

    SWITCHES = {"forward_stat": ("sma", "batch"), "backward_stat": ("sma", "batch"), "average": ("sma", "ema")}
    _DEFAULTS = {"forward_stat": "sma", "backward_stat": "sma", "average": "sma", "renorm": True}
    statistic = "second_moment"  # running_var is v, the EMA of χ̄² = E[x²]: nothing is centered
    reports_used_statistics = True  # χ̄², Ψ̄ and r, to a tracer (used_stats)

    def __init__(self, num_features: int, *, window: int = 16, group_size: int | None = None,
                 eps: float = 1e-5, momentum: float = 0.02, warmup_iters: int = 100,
                 renorm_iters: int = 1000, r_max: float = 5.0, forward_stat: str = "sma",
                 backward_stat: str = "sma", average: str = "sma", renorm: bool = True, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.impl = _fused.check_impl(impl)
        check_positive("num_features", num_features, integer=True)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (normalization batches in the moving average), "
                             f"got {window!r}")
        self.num_features = num_features
        self.window = window
        self.group_size = check_group_size(group_size)
        self.eps = float(check_positive("eps", eps))
        self.momentum = check_momentum(momentum)
        self.warmup_iters = int(check_positive("warmup_iters", warmup_iters, integer=True, allow_zero=True))
        self.renorm_iters = int(check_positive("renorm_iters", renorm_iters, integer=True, allow_zero=True))
        if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or r_max < 1.0:
            raise ValueError(f"r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
        self.r_max = float(r_max)
        for key, valid in self.SWITCHES.items():
            value = {"forward_stat": forward_stat, "backward_stat": backward_stat, "average": average}[key]
            if not isinstance(value, str) or value not in valid:
                raise ValueError(f"{key} must be one of {', '.join(valid)}, got {value!r}")
        if not isinstance(renorm, bool):
            raise ValueError(f"renorm must be true or false (the r correction on or off), got {renorm!r}")
        self.forward_stat, self.backward_stat, self.average = forward_stat, backward_stat, average
        self.renorm = renorm
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        if average == "sma":
            self.register_buffer("ring_x2", torch.zeros(window, num_features, **factory))
            self.register_buffer("ring_gz", torch.zeros(window, num_features, **factory))
        else:  # EMAs of χ² and Ψ (seeded by the first normalization batch)
            self.register_buffer("ema_x2", torch.zeros(num_features, **factory))
            self.register_buffer("ema_gz", torch.zeros(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.used_stats: dict | None = None  # set to {} by a tracer: the statistics of the last traced call

    @property
    def uses_default_statistics(self) -> bool:
        """True for the official layer: both statistics averaged by SMAs, and the r correction on."""
        return all(getattr(self, k) == v for k, v in self._DEFAULTS.items())

    def _averages(self) -> tuple[Tensor, Tensor]:
        """The buffers of the χ² and Ψ moving averages: the rings (SMA) or the EMAs."""
        return (self.ring_x2, self.ring_gz) if self.average == "sma" else (self.ema_x2, self.ema_gz)

    @torch.no_grad()
    def reset_averages(self) -> None:
        """Clear the moving averages' history (rings or EMAs); running_var and the counter are kept."""
        for buf in self._averages():
            buf.zero_()

    @torch.no_grad()
    def restart(self) -> None:
        """Counter to 0 and the moving averages cleared: warm-up, SMA fill and renorm start over."""
        self.num_batches_tracked.zero_()
        self.reset_averages()

    def pair_conv(self, conv: nn.Module) -> bool:
        """Weight centering of the feeding conv (Yan et al. 2020, Sec. 4.3)."""
        return parametrize_weight(conv, CenteredWeight())

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        return second_moment_batch_forward(x, self.weight, self.bias, self.eps)  # r = 1

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window={self.window}, group_size={self.group_size}, eps={self.eps}, "
                f"momentum={self.momentum}, warmup_iters={self.warmup_iters}, "
                f"renorm_iters={self.renorm_iters}, r_max={self.r_max}" + "".join(
                    f", {k}={getattr(self, k)!r}" for k, v in self._DEFAULTS.items() if getattr(self, k) != v))

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map of eval mode, γ/√(v+ε) and β (what folding puts into the conv)."""
        return running_affine(None, self.running_var, self.weight, self.bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if x.shape[0] == 0:
            return empty_forward(x, self.weight, self.bias)
        dt = stat_dtype(x)
        if not self.training:
            scale, shift = self.eval_affine()
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.addcmul(shift.view(shape).to(dt), x.to(dt), scale.view(shape).to(dt)).to(x.dtype)
        groups, _ = num_groups(x.shape[0], self.group_size)
        tensors = [self.weight, self.bias, self.running_var, *self._averages()]
        # a step a tracer records takes the reference path: the tracer reads what it computes
        if self.used_stats is None and _fused.use_fused(self.impl, x, tensors, type(self).__name__,
                                                        None if self.uses_default_statistics else "ablations",
                                                        module=self):
            hp = (self.window, self.warmup_iters, max(self.renorm_iters, self.warmup_iters), self.r_max,
                  self.momentum, self.eps)
            return _fused.FusedMABN.apply(x, self.weight, self.bias, self.ring_x2, self.running_var,
                                          self.num_batches_tracked, self.ring_gz, groups, hp)
        # under torch.compile: the same kernels as ops that declare the buffers they write (see _mabn_ops)
        compiling = torch.compiler.is_compiling()
        ring_x2, ring_gz = self._averages()
        ema = self.average == "ema"
        with torch.no_grad():
            chi2_bar, r, use_sma, t0 = (ops.forward_state_op if compiling else ops.forward_state)(
                x.detach(), ring_x2, self.running_var, self.num_batches_tracked, groups, self.window,
                self.warmup_iters, self.renorm_iters, self.r_max, self.momentum, self.eps,
                self.forward_stat == "sma", ema, self.renorm)
        args = (x, self.weight, self.bias, chi2_bar, r, use_sma, ring_gz, t0, self.window, self.eps,
                self.backward_stat == "sma", ema)
        if compiling:
            return ops.normalize_op(*args)
        sink = self.used_stats
        if sink is not None:  # a tracer asked: references to what this call uses, filled in by the backward
            sink.clear()
            sink.update(chi2_bar=chi2_bar, r=r)
        return ops.MABNNormalize.apply(*args, sink)


SIMULATED_BATCH = 32  # MABN's default window is simulated batch / n (paper: n = 2 -> m = 16)


@register_norm("mabn", types=(MABN2d,),
               defaults={"window": None, "eps": 1e-5, "momentum": 0.02, "warmup_iters": 100,
                         "renorm_iters": 1000, "r_max": 5.0, "weight_centering": True, **MABN2d._DEFAULTS,
                         "impl": "auto"},
               batch_dependent=True, foldable=True, switches=(*MABN2d._DEFAULTS, "weight_centering"))
def _build_mabn(p: dict, ctx: NormContext) -> NormRecipe:
    n = ctx.norm_batch or ctx.device_batch
    window = p["window"] if p["window"] is not None else max(1, SIMULATED_BATCH // n) if n else 16
    ctor = functools.partial(
        MABN2d, window=window, group_size=ctx.group_size, eps=p["eps"], momentum=p["momentum"],
        warmup_iters=ctx.iters(p["warmup_iters"]), renorm_iters=ctx.iters(p["renorm_iters"]),
        r_max=p["r_max"], impl=p["impl"], **{k: p[k] for k in MABN2d._DEFAULTS})
    return NormRecipe("mabn", ctor, pairs_convs=bool(p["weight_centering"]), params={**p, "window": window})
