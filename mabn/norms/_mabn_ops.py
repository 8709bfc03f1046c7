"""MABN's kernels (Yan et al. 2020, Alg. 1-2, grouped) and the torch.library ops declaring its state writes.

Eager mode runs the kernels directly (``MABNNormalize`` and ``forward_state``); under torch.compile the layer
calls the ops instead, whose schemas say which buffers each one writes (``mutates_args``), with fake
implementations for tracing and an autograd formula. Two compiler traps make the ops necessary:

- a buffer written inside an autograd.Function's backward through ``ctx`` (MABN's Ψ ring) is dropped by
  Dynamo, which traces that backward as a functional subgraph: gradients and ``ring_gz`` come out wrong;
- AOTAutograd's min-cut partitioner may recompute in the backward a value derived from a buffer that the
  forward then updates in place (a ``clone`` of the counter, r from ``running_var``), reading the updated
  buffer: the backward then uses the next step's statistics. Outputs of an opaque op are saved, never
  recomputed, so the forward statistics come out of ``mabn::forward_state``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._common import group_sum, per_sample, sequential_ema, spatial_dot, spatial_sum_sq, stat_dtype


def window_means(ring: Tensor, t0: Tensor, new: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
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


def ema_momentum(window: int) -> float:
    """α = 2/(window+1): the EMA with the center of mass (mean age (window−1)/2) of a window-batch SMA."""
    return 2.0 / (window + 1)


def moving_average(state: Tensor, t0: Tensor, new: Tensor, window: int, ema: bool) -> Tensor:
    """The moving average ending at each new normalization batch (G, C); advances ``state`` in place.

    SMA: ``state`` is the ring (window, C) of ``window_means``. EMA (``ema``): ``state`` (C,) is
    e_t = (1−α)·e_{t−1} + α·s_t with α = ``ema_momentum(window)``, seeded with e_1 = s_1 (at t0 = 0 the
    stored value is replaced by the first new statistic, so no zero-initialised bias; tensor ops, no sync).
    """
    if not ema:
        sma, ring_next, slots = window_means(state, t0, new, window)
        state.index_copy_(0, slots, ring_next.to(state.dtype))
        return sma
    seed = torch.where(t0 == 0, new[0], state.to(new.dtype))
    before, after = sequential_ema(seed, new, ema_momentum(window))
    state.copy_(after.to(state.dtype))
    return torch.cat([before[1:], after[None]])


def forward_state(x: Tensor, ring_x2: Tensor, running_var: Tensor, num_batches_tracked: Tensor, groups: int,
                  window: int, warmup_iters: int, renorm_iters: int, r_max: float, momentum: float,
                  eps: float, forward_avg: bool = True, ema: bool = False,
                  renorm: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """χ̄², r and the SMA mask (G, C), (G, C), (G, 1) of each group, and t0; advances the three buffers.

    Ablations (official layer: the defaults): ``forward_avg`` False normalizes by χ²_t of the current batch
    only (the average is still kept); ``ema`` averages with an EMA (``ring_x2`` is then the (C,) EMA);
    ``renorm`` False keeps r ≡ 1. The mask marks the averaging phase, t > window and t ≥ warmup.
    """
    dt = stat_dtype(x)
    count = x.numel() // (groups * x.shape[1])
    chi2 = group_sum(spatial_sum_sq(x.to(dt)), groups) / count  # (G, C): χ²_t = mean(x²) per group
    t0 = num_batches_tracked.clone()
    t = (t0 + 1 + torch.arange(groups, device=x.device))[:, None]  # (G, 1), counted from 1
    avg = moving_average(ring_x2, t0, chi2, window, ema)
    use_sma = (t > window) & (t >= warmup_iters)
    chi2_bar = torch.where(use_sma, avg, chi2) if forward_avg else chi2
    v_seq, v_end = sequential_ema(running_var.to(dt), chi2_bar, momentum)
    if renorm:
        ratio = torch.sqrt(chi2_bar + eps) / torch.sqrt(v_seq + eps)
        r_on = t > max(renorm_iters, warmup_iters)
        r = torch.where(r_on, ratio.clamp(1.0 / r_max, r_max), torch.ones_like(ratio))
    else:
        r = torch.ones_like(chi2_bar)
    running_var.copy_(v_end)
    num_batches_tracked.add_(groups)
    return chi2_bar, r, use_sma, t0


def normalize(x: Tensor, weight: Tensor, bias: Tensor, chi2_bar: Tensor, r: Tensor, eps: float):
    """y = γ·r·x/√(χ̄²+ε) + β per group (one fused multiply-add), and s = 1/√(χ̄²+ε) (G, C)."""
    dt = chi2_bar.dtype
    inv = torch.rsqrt(chi2_bar + eps)  # (G, C)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = torch.addcmul(bias.to(dt).view(shape), x.to(dt), per_sample(inv * weight.to(dt) * r, x))
    return y.to(x.dtype), inv


def push_psi(ring_gz: Tensor, psi: Tensor, t0: Tensor, use_sma: Tensor, window: int, backward_avg: bool = True,
             ema: bool = False) -> Tensor:
    """Write Ψ of the new normalization batches into ``ring_gz`` (with ``ema``: the (C,) EMA); return the Ψ̄
    the backward uses: the average past warm-up (paper Sec. 4.2, Alg. 2), Ψ_t itself without ``backward_avg``."""
    avg = moving_average(ring_gz, t0, psi, window, ema)
    return torch.where(use_sma, avg, psi) if backward_avg else psi


def grads(dy: Tensor, x: Tensor, weight: Tensor, inv: Tensor, r: Tensor, psi_bar_of, needs):
    """dx, dγ, dβ of MABN's backward; ``psi_bar_of(Ψ)`` pushes Ψ into the ring and returns Ψ̄ (G, C).

    With w = γ·r and D = Σ dy·x per group and channel (one reduction): Ψ = w·s·D/count, dγ = Σ_groups r·s·D,
    and dx = dy·(w·s) − x·(s²·Ψ̄) is one multiply and one fused multiply-add.
    """
    groups, dt = inv.shape[0], inv.dtype
    xd, dyd = x.to(dt), dy.to(dt)
    count = x.numel() // (groups * x.shape[1])  # samples x positions per normalization batch
    w = weight.to(dt) * r  # (G, C)
    dot = group_sum(spatial_dot(dyd, xd), groups)  # (G, C): Σ dy·x
    psi_bar = psi_bar_of(w * inv * dot / count)  # Ψ_t = mean(ĝ·z) per normalization batch
    dx = dw = db = None
    if needs[0]:
        dx = (dyd * per_sample(w * inv, x)).addcmul_(xd, per_sample(-inv * inv * psi_bar, x)).to(x.dtype)
    if needs[1]:
        dw = (r * inv * dot).sum(dim=0).to(weight.dtype)
    if needs[2]:
        db = dyd.sum(dim=(0, *range(2, x.dim()))).to(weight.dtype)
    return dx, dw, db


class MABNNormalize(torch.autograd.Function):
    """y = γ·r·x/√(χ̄²+ε) + β per group, with MABN's backward through the moving average of Ψ (eager path).

    Forward statistics (χ̄², r) come in as constants; the backward replaces the batch statistic
    Ψ = mean(ĝ·z) by its SMA over the last ``window`` normalization batches (paper Sec. 4.2) once past
    warm-up, and writes the current Ψ into ``ring_gz``. With Ψ of the current batch the result is the
    exact gradient of y = γ·x/√(mean(x²)+ε) + β. ``backward_avg`` and ``ema`` are the ablations of
    ``push_psi``; a ``sink`` dict (diagnostics) receives Ψ_t and Ψ̄ (references, no copy, no sync).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chi2_bar, r, use_sma, ring_gz, t0, window, eps, backward_avg=True,
                ema=False, sink=None):
        y, inv = normalize(x, weight, bias, chi2_bar, r, eps)
        ctx.save_for_backward(x, weight, inv, r, use_sma, t0)
        ctx.ring_gz, ctx.window, ctx.avg, ctx.sink = ring_gz, window, (backward_avg, ema), sink
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, inv, r, use_sma, t0 = ctx.saved_tensors

        def psi_bar_of(psi):
            psi_bar = push_psi(ctx.ring_gz, psi, t0, use_sma, ctx.window, *ctx.avg)
            if ctx.sink is not None:
                ctx.sink.update(psi=psi, psi_bar=psi_bar)
            return psi_bar

        dx, dw, db = grads(dy, x, weight, inv, r, psi_bar_of, ctx.needs_input_grad)
        return dx, dw, db, None, None, None, None, None, None, None, None, None, None


@torch.library.custom_op("mabn::forward_state",
                         mutates_args=("ring_x2", "running_var", "num_batches_tracked"))
def forward_state_op(x: Tensor, ring_x2: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                     groups: int, window: int, warmup_iters: int, renorm_iters: int, r_max: float,
                     momentum: float, eps: float, forward_avg: bool = True, ema: bool = False,
                     renorm: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``forward_state`` as an op: the forward's writes to ring_x2 (or the EMA), running_var and the counter."""
    return forward_state(x, ring_x2, running_var, num_batches_tracked, groups, window, warmup_iters,
                         renorm_iters, r_max, momentum, eps, forward_avg, ema, renorm)


@forward_state_op.register_fake
def _(x, ring_x2, running_var, num_batches_tracked, groups, window, warmup_iters, renorm_iters, r_max,
      momentum, eps, forward_avg=True, ema=False, renorm=True):
    stat = x.new_empty((groups, x.shape[1]), dtype=stat_dtype(x))
    return stat, torch.empty_like(stat), x.new_empty((groups, 1), dtype=torch.bool), torch.empty_like(
        num_batches_tracked)


@torch.library.custom_op("mabn::update_ring_gz", mutates_args=("ring_gz",))
def update_ring_gz_op(ring_gz: Tensor, psi: Tensor, t0: Tensor, use_sma: Tensor, window: int,
                      backward_avg: bool = True, ema: bool = False) -> Tensor:
    """``push_psi`` as an op: the backward's write to ring_gz (or the EMA), declared."""
    psi_bar = push_psi(ring_gz, psi, t0, use_sma, window, backward_avg, ema)
    return psi_bar if backward_avg else psi_bar.clone()  # an op's output may not be its input (Ψ̄ = Ψ_t)


@update_ring_gz_op.register_fake
def _(ring_gz, psi, t0, use_sma, window, backward_avg=True, ema=False):
    return torch.empty_like(psi)


@torch.library.custom_op("mabn::normalize", mutates_args=())
def normalize_op(x: Tensor, weight: Tensor, bias: Tensor, chi2_bar: Tensor, r: Tensor, use_sma: Tensor,
                 ring_gz: Tensor, t0: Tensor, window: int, eps: float, backward_avg: bool = True,
                 ema: bool = False) -> Tensor:
    """``MABNNormalize`` as an op; its backward (``_normalize_backward``) writes ``ring_gz``."""
    return normalize(x, weight, bias, chi2_bar, r, eps)[0]


@normalize_op.register_fake
def _(x, weight, bias, chi2_bar, r, use_sma, ring_gz, t0, window, eps, backward_avg=True, ema=False):
    return torch.empty_like(x)


def _normalize_setup(ctx, inputs, output):
    x, weight, _, chi2_bar, r, use_sma, ring_gz, t0, window, eps, *avg = inputs
    ctx.save_for_backward(x, weight, chi2_bar, r, use_sma, t0)
    # an attribute, not a saved tensor: the backward writes it, which a saved tensor's version check forbids
    ctx.ring_gz, ctx.window, ctx.eps, ctx.avg = ring_gz, window, eps, avg
    ctx.num_inputs = len(inputs)


def _normalize_backward(ctx, dy):
    x, weight, chi2_bar, r, use_sma, t0 = ctx.saved_tensors
    inv = torch.rsqrt(chi2_bar + ctx.eps)

    def psi_bar_of(psi):
        return update_ring_gz_op(ctx.ring_gz, psi, t0, use_sma, ctx.window, *ctx.avg)

    dx, dw, db = grads(dy, x, weight, inv, r, psi_bar_of, ctx.needs_input_grad)
    return (dx, dw, db) + (None,) * (ctx.num_inputs - 3)


normalize_op.register_autograd(_normalize_backward, setup_context=_normalize_setup)
