"""Moving Average Batch Normalization (Yan et al., ICLR 2020, arXiv 2001.06838), grouped normalization batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._common import (
    check_group_size,
    check_input,
    check_momentum,
    check_positive,
    empty_forward,
    group_sum,
    num_groups,
    per_sample,
    sequential_ema,
    spatial_dot,
    spatial_sum_sq,
    stat_dtype,
)


def _window_means(ring: Tensor, t0: Tensor, new: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Simple moving averages over the last ``window`` normalization batches, current one included.

    ``ring[t mod window]`` holds the statistic of normalization batch t (t counted from 1, ``t0`` seen so
    far); ``new`` (G, C) holds those of batches t0+1 .. t0+G. Returns the SMA ending at each new batch
    (G, C), and the ring's next content with its slot indices, all with tensor ops (no host sync).
    """
    steps = torch.arange(window, device=ring.device)
    old = ring.index_select(0, (t0 - window + 1 + steps) % window).to(new.dtype)
    seq = torch.cat([old, new])  # chronological: times t0-window+1 .. t0+G
    sma = seq.unfold(0, window, 1)[1:].mean(dim=-1)  # windows ending at t0+1 .. t0+G
    groups = new.shape[0]
    return sma, seq[-window:], (t0 + groups - window + 1 + steps) % window


class _MABNNormalize(torch.autograd.Function):
    """y = γ·r·x/√(χ̄²+ε) + β per group, with MABN's backward through the moving average of Ψ.

    Forward statistics (χ̄², r) come in as constants; the backward replaces the batch statistic
    Ψ = mean(ĝ·z) by its SMA over the last ``window`` normalization batches (paper Sec. 4.2) once past
    warm-up, and writes the current Ψ into ``ring_gz``. With Ψ of the current batch the result is the
    exact gradient of y = γ·x/√(mean(x²)+ε) + β.

    Written for few passes over the activations: with s = 1/√(χ̄²+ε), w = γ·r and D = Σ dy·x per group and
    channel (one reduction), Ψ = w·s·D/count, dγ = Σ_groups r·s·D, and dx = dy·(w·s) − x·(s²·Ψ̄) is one
    multiply and one fused multiply-add; the forward is one reduction and one fused multiply-add.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chi2_bar, r, use_sma, ring_gz, t0, window, eps):
        dt = chi2_bar.dtype
        inv = torch.rsqrt(chi2_bar + eps)  # (G, C)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = torch.addcmul(bias.to(dt).view(shape), x.to(dt), per_sample(inv * weight.to(dt) * r, x))
        ctx.save_for_backward(x, weight, inv, r, use_sma, t0)
        ctx.ring_gz, ctx.window = ring_gz, window
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, inv, r, use_sma, t0 = ctx.saved_tensors
        groups, dt = inv.shape[0], inv.dtype
        xd, dyd = x.to(dt), dy.to(dt)
        count = x.numel() // (groups * x.shape[1])  # samples x positions per normalization batch
        w = weight.to(dt) * r  # (G, C)
        dot = group_sum(spatial_dot(dyd, xd), groups)  # (G, C): Σ dy·x
        psi = w * inv * dot / count  # Ψ_t = mean(ĝ·z) per normalization batch
        ring = ctx.ring_gz
        sma, ring_next, slots = _window_means(ring, t0, psi, ctx.window)
        psi_bar = torch.where(use_sma, sma, psi)
        ring.index_copy_(0, slots, ring_next.to(ring.dtype))
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dyd * per_sample(w * inv, x)).addcmul_(xd, per_sample(-inv * inv * psi_bar, x)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (r * inv * dot).sum(dim=0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = dyd.sum(dim=(0, *range(2, x.dim()))).to(weight.dtype)
        return dx, dw, db, None, None, None, None, None, None, None


class MABN2d(nn.Module):
    """Moving Average Batch Normalization for (N, C, H, W) inputs.

    Normalizes by the second moment (no centring), replaces the forward statistic χ² and the backward
    statistic Ψ by simple moving averages over the last ``window`` normalization batches, and applies a
    BRN-like correction r = clip(√(χ̄²+ε)/√(v+ε), 1/r_max, r_max) (constant in backward) after
    max(renorm_iters, warmup_iters) normalization batches; v (``running_var``) is an EMA of χ̄² and the
    eval statistic: y = γ·x/√(v+ε) + β. Every counter counts normalization batches; ``group_size`` n splits
    the device batch into groups that behave exactly like consecutive calls (DESIGN.md's grouped contract).

    Buffers (all in ``state_dict``): ``running_var`` (C,), ``ring_x2`` and ``ring_gz`` (window, C) with the
    statistic of batch t in slot t mod window, ``num_batches_tracked`` (t of the last batch seen).
    ``ring_gz`` is written by the backward: a training-mode forward that never gets one (e.g. under
    ``torch.no_grad``) advances the counter and ``ring_x2`` but leaves its Ψ slot as it was, as the official
    layer does.
    """

    def __init__(self, num_features: int, *, window: int = 16, group_size: int | None = None,
                 eps: float = 1e-5, momentum: float = 0.02, warmup_iters: int = 100,
                 renorm_iters: int = 1000, r_max: float = 5.0):
        super().__init__()
        check_positive("num_features", num_features, integer=True)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (normalization batches in the moving average), got {window!r}")
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
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("ring_x2", torch.zeros(window, num_features))
        self.register_buffer("ring_gz", torch.zeros(window, num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window={self.window}, group_size={self.group_size}, eps={self.eps}, "
                f"momentum={self.momentum}, warmup_iters={self.warmup_iters}, "
                f"renorm_iters={self.renorm_iters}, r_max={self.r_max}")

    def eval_scale_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map of eval mode (what folding puts into the preceding conv)."""
        return self.weight * torch.rsqrt(self.running_var + self.eps), self.bias

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if x.shape[0] == 0:
            return empty_forward(x, self.weight, self.bias)
        dt = stat_dtype(x)
        if not self.training:
            scale, shift = self.eval_scale_shift()
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.addcmul(shift.view(shape).to(dt), x.to(dt), scale.view(shape).to(dt)).to(x.dtype)
        groups, _ = num_groups(x.shape[0], self.group_size)
        with torch.no_grad():
            chi2_bar, r, use_sma, t0 = self._update_forward_state(x.detach(), groups, dt)
        return _MABNNormalize.apply(x, self.weight, self.bias, chi2_bar, r, use_sma, self.ring_gz, t0,
                                    self.window, self.eps)

    def _update_forward_state(self, x: Tensor, groups: int, dt: torch.dtype):
        """χ̄², r and the SMA mask for each group; advances ring_x2, running_var and the counter."""
        m = self.window
        count = x.numel() // (groups * x.shape[1])
        chi2 = group_sum(spatial_sum_sq(x.to(dt)), groups) / count  # (G, C): χ²_t = mean(x²) per normalization batch
        t0 = self.num_batches_tracked.clone()
        t = (t0 + 1 + torch.arange(groups, device=x.device))[:, None]  # (G, 1), counted from 1
        sma, ring_next, slots = _window_means(self.ring_x2, t0, chi2, m)
        use_sma = (t > m) & (t >= self.warmup_iters)
        chi2_bar = torch.where(use_sma, sma, chi2)
        v_seq, v_end = sequential_ema(self.running_var.to(dt), chi2_bar, self.momentum)
        ratio = torch.sqrt(chi2_bar + self.eps) / torch.sqrt(v_seq + self.eps)
        r_on = t > max(self.renorm_iters, self.warmup_iters)
        r = torch.where(r_on, ratio.clamp(1.0 / self.r_max, self.r_max), torch.ones_like(ratio))
        self.ring_x2.index_copy_(0, slots, ring_next.to(self.ring_x2.dtype))
        self.running_var.copy_(v_end)
        self.num_batches_tracked.add_(groups)
        return chi2_bar, r, use_sma, t0
