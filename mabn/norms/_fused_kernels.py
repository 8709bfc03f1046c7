"""Triton kernels of the fused BN / BRN / MABN path (launched by ``_fused``; imported on first use).

Activations are seen as (N, C, S) with any strides (NCHW and NHWC both flatten to a view), in tiles of
BLOCK_M rows (sample, position) by BLOCK_C channels; statistics and per-(group, channel) coefficients are
(G, C) float32 tensors. The state kernels run one program per channel block and walk the G groups in
order, so rings, EMAs and counters take the same sequential updates as G consecutive calls.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(base, g, c, m0, n, C, S, sn, sc, ss, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of rows m0..m0+BLOCK_M of group g (rows = sample-in-group x position)."""
    m = m0 + tl.arange(0, BLOCK_M)
    i = m // S
    s = m - i * S
    row = (g * n + i).to(tl.int64) * sn + s.to(tl.int64) * ss
    off = row[:, None] + c.to(tl.int64)[None, :] * sc
    mask = (m < n * S)[:, None] & (c < C)[None, :]
    return base + off, mask


@triton.jit
def stats_kernel(x_ptr, out1_ptr, out2_ptr, cnt_ptr, t0_ptr, n, C, S, sn, sc, ss,
                 CENTERED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (group, channel): mean and biased variance (two passes) if CENTERED, else mean of x²."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = n * S
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for m0 in range(0, total, BLOCK_M):
        ptr, mask = _tile(x_ptr, g, c, m0, n, C, S, sn, sc, ss, BLOCK_M, BLOCK_C)
        xv = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        acc += xv if CENTERED else xv * xv
    first = tl.sum(acc, axis=0) / total
    tl.store(out1_ptr + g * C + c, first, mask=c < C)
    if CENTERED:
        acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for m0 in range(0, total, BLOCK_M):
            ptr, mask = _tile(x_ptr, g, c, m0, n, C, S, sn, sc, ss, BLOCK_M, BLOCK_C)
            xc = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) - first[None, :]
            xc = tl.where(mask, xc, 0.0)
            acc2 += xc * xc
        tl.store(out2_ptr + g * C + c, tl.sum(acc2, axis=0) / total, mask=c < C)
    if (g == 0) & (tl.program_id(1) == 0):  # the counter before this call, for the state kernel
        tl.store(t0_ptr, tl.load(cnt_ptr))


@triton.jit
def grad_stats_kernel(dy_ptr, x_ptr, mean_ptr, s1_ptr, s2_ptr, n, C, S, dsn, dsc, dss, sn, sc, ss,
                      HAS_MEAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (group, channel): Σ dy and Σ dy·(x − mean) (Σ dy·x without a mean)."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + g * C + c, mask=c < C, other=0.0) if HAS_MEAN else tl.zeros([BLOCK_C], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for m0 in range(0, n * S, BLOCK_M):
        dptr, mask = _tile(dy_ptr, g, c, m0, n, C, S, dsn, dsc, dss, BLOCK_M, BLOCK_C)
        xptr, _ = _tile(x_ptr, g, c, m0, n, C, S, sn, sc, ss, BLOCK_M, BLOCK_C)
        dyv = tl.load(dptr, mask=mask, other=0.0).to(tl.float32)
        xv = tl.where(mask, tl.load(xptr, mask=mask, other=0.0).to(tl.float32) - mean[None, :], 0.0)
        acc1 += dyv
        acc2 += dyv * xv
    tl.store(s1_ptr + g * C + c, tl.sum(acc1, axis=0), mask=c < C)
    tl.store(s2_ptr + g * C + c, tl.sum(acc2, axis=0), mask=c < C)


@triton.jit
def affine_kernel(out_ptr, x_ptr, dy_ptr, mean_ptr, a_ptr, b_ptr, c_ptr, N, n, C, S, osn, osc, oss,
                  sn, sc, ss, dsn, dsc, dss, HAS_MEAN: tl.constexpr, HAS_DY: tl.constexpr, HAS_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = (x − mean)·a + dy·b + c elementwise, a, b, c, mean per (group, channel)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = m // S
    s = (m - i * S).to(tl.int64)
    mask = (m < N * S)[:, None] & (c < C)[None, :]
    stat = (i // n)[:, None] * C + c[None, :]
    i, c64 = i.to(tl.int64), c.to(tl.int64)
    xv = tl.load(x_ptr + (i * sn + s * ss)[:, None] + c64[None, :] * sc, mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        xv -= tl.load(mean_ptr + stat, mask=mask, other=0.0)
    out = xv * tl.load(a_ptr + stat, mask=mask, other=0.0)
    if HAS_DY:
        dyv = tl.load(dy_ptr + (i * dsn + s * dss)[:, None] + c64[None, :] * dsc, mask=mask, other=0.0)
        out += dyv.to(tl.float32) * tl.load(b_ptr + stat, mask=mask, other=0.0)
    if HAS_C:
        out += tl.load(c_ptr + stat, mask=mask, other=0.0)
    optr = out_ptr + (i * osn + s * oss)[:, None] + c64[None, :] * osc
    tl.store(optr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window_mean(ring_ptr, new_ptr, g, t0, c, C, window):
    """SMA of the ``window`` batches ending at new batch g: old ring slots first, then new values (G, C)."""
    acc = tl.zeros_like(c).to(tl.float32)
    cm = c < C
    for j in range(g + 1, g + 1 + window):
        slot = (t0 + 1 + j) % window
        old = tl.load(ring_ptr + slot * C + c, mask=cm & (j < window), other=0.0)
        new = tl.load(new_ptr + (j - window) * C + c, mask=cm & (j >= window), other=0.0)
        acc += old + new
    return acc / window


@triton.jit
def _push_ring(ring_ptr, new_ptr, t0, start, G, c, C, window):
    """Write new values start..G-1 (the last min(G, window)) into their slots (t mod window); reads are done."""
    tl.debug_barrier()
    for g in range(start, G):
        val = tl.load(new_ptr + g * C + c, mask=c < C)
        tl.store(ring_ptr + ((t0 + 1 + g) % window) * C + c, val, mask=c < C)


@triton.jit
def mabn_state_kernel(chi2_ptr, ring_ptr, rv_ptr, cnt_ptr, t0_ptr, w_ptr, b_ptr, k_ptr, shift_ptr, inv_ptr,
                      r_ptr, G, C, window, ring_start, warmup, r_after, r_max, momentum, eps, BLOCK_C: tl.constexpr):
    """MABN forward state (Yan et al. 2020, Alg. 1, G groups in order): χ̄², r, v; k = γ·r/√(χ̄²+ε)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t0 = tl.load(t0_ptr)
    v = tl.load(rv_ptr + c, mask=cm, other=1.0)
    gamma = tl.load(w_ptr + c, mask=cm, other=1.0)
    beta = tl.load(b_ptr + c, mask=cm, other=0.0)
    for g in range(0, G):
        t = t0 + 1 + g
        chi2 = tl.load(chi2_ptr + g * C + c, mask=cm, other=1.0)
        sma = _window_mean(ring_ptr, chi2_ptr, g, t0, c, C, window)
        bar = tl.where((t > window) & (t >= warmup), sma, chi2)
        ratio = tl.sqrt(bar + eps) / tl.sqrt(v + eps)
        r = tl.where(t > r_after, tl.minimum(tl.maximum(ratio, 1.0 / r_max), r_max), 1.0)
        inv = 1.0 / tl.sqrt(bar + eps)
        tl.store(inv_ptr + g * C + c, inv, mask=cm)
        tl.store(r_ptr + g * C + c, r, mask=cm)
        tl.store(k_ptr + g * C + c, gamma * r * inv, mask=cm)
        tl.store(shift_ptr + g * C + c, beta, mask=cm)
        v = (1.0 - momentum) * v + momentum * bar
    tl.store(rv_ptr + c, v, mask=cm)
    _push_ring(ring_ptr, chi2_ptr, t0, ring_start, G, c, C, window)
    if tl.program_id(0) == 0:
        tl.store(cnt_ptr, t0 + G)


@triton.jit
def mabn_grad_kernel(s1_ptr, dot_ptr, psi_ptr, k_ptr, inv_ptr, r_ptr, w_ptr, ring_ptr, t0_ptr, dw_ptr, db_ptr,
                     G, C, count, window, ring_start, warmup, BLOCK_C: tl.constexpr):
    """MABN backward statistics (Alg. 2): Ψ into ring_gz, Ψ̄, dγ, dβ; dot_ptr becomes −s²·Ψ̄ (dx's x term).

    Each Σdy·x is read (first loop) before its slot is overwritten (second loop), a barrier between.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t0 = tl.load(t0_ptr)
    gamma = tl.load(w_ptr + c, mask=cm, other=1.0)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g in range(0, G):
        dot = tl.load(dot_ptr + g * C + c, mask=cm, other=0.0)
        inv = tl.load(inv_ptr + g * C + c, mask=cm, other=0.0)
        r = tl.load(r_ptr + g * C + c, mask=cm, other=0.0)
        tl.store(psi_ptr + g * C + c, gamma * r * inv * dot / count, mask=cm)  # Ψ_t = mean(ĝ·z)
        dw += r * inv * dot
        db += tl.load(s1_ptr + g * C + c, mask=cm, other=0.0)
    tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=cm)
    tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=cm)
    tl.debug_barrier()
    for g in range(0, G):
        t = t0 + 1 + g
        psi = tl.load(psi_ptr + g * C + c, mask=cm, other=0.0)
        sma = _window_mean(ring_ptr, psi_ptr, g, t0, c, C, window)
        bar = tl.where((t > window) & (t >= warmup), sma, psi)
        inv = tl.load(inv_ptr + g * C + c, mask=cm, other=0.0)
        tl.store(dot_ptr + g * C + c, -inv * inv * bar, mask=cm)
    _push_ring(ring_ptr, psi_ptr, t0, ring_start, G, c, C, window)


@triton.jit
def centered_state_kernel(mean_ptr, var_ptr, rm_ptr, rv_ptr, cnt_ptr, t0_ptr, w_ptr, b_ptr, k_ptr, shift_ptr,
                         inv_ptr, r_ptr, d_ptr, G, C, unbias, momentum, eps, r_max, d_max, warmup, r_end,
                         d_end, RENORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """BN / BRN forward state (Ioffe 2017, Alg. 1, G groups in order): r, d, running stats; k and shift."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t0 = tl.load(t0_ptr)
    mu = tl.load(rm_ptr + c, mask=cm, other=0.0)
    v = tl.load(rv_ptr + c, mask=cm, other=1.0)
    gamma = tl.load(w_ptr + c, mask=cm, other=1.0)
    beta = tl.load(b_ptr + c, mask=cm, other=0.0)
    for g in range(0, G):
        mean = tl.load(mean_ptr + g * C + c, mask=cm, other=0.0)
        var = tl.load(var_ptr + g * C + c, mask=cm, other=1.0)
        inv = 1.0 / tl.sqrt(var + eps)
        r = tl.full([BLOCK_C], 1.0, tl.float32)
        d = tl.zeros([BLOCK_C], dtype=tl.float32)
        if RENORM:
            t = (t0 + 1 + g).to(tl.float64)
            lim_r = (1.0 + (r_max - 1.0) * tl.minimum(tl.maximum((t - warmup) / r_end, 0.0), 1.0))
            lim_d = (d_max * tl.minimum(tl.maximum((t - warmup) / d_end, 0.0), 1.0))
            lim_r, lim_d = lim_r.to(tl.float32), lim_d.to(tl.float32)
            sigma = tl.sqrt(v + eps)
            r = tl.minimum(tl.maximum(tl.sqrt(var + eps) / sigma, 1.0 / lim_r), lim_r)
            d = tl.minimum(tl.maximum((mean - mu) / sigma, -lim_d), lim_d)
        k = gamma * r * inv
        tl.store(inv_ptr + g * C + c, inv, mask=cm)
        tl.store(r_ptr + g * C + c, r, mask=cm)
        tl.store(d_ptr + g * C + c, d, mask=cm)
        tl.store(k_ptr + g * C + c, k, mask=cm)
        tl.store(shift_ptr + g * C + c, beta + gamma * d, mask=cm)
        mu = (1.0 - momentum) * mu + momentum * mean
        v = (1.0 - momentum) * v + momentum * (var * unbias)
    tl.store(rm_ptr + c, mu, mask=cm)
    tl.store(rv_ptr + c, v, mask=cm)
    if tl.program_id(0) == 0:
        tl.store(cnt_ptr, t0 + G)


@triton.jit
def centered_grad_kernel(s1_ptr, s2_ptr, k_ptr, inv_ptr, r_ptr, d_ptr, dw_ptr, db_ptr, c0_ptr, b2_ptr, G, C,
                        count, BLOCK_C: tl.constexpr):
    """BN / BRN backward statistics: dγ, dβ, and dx's terms c0 = −k·Σdy/N, b2 = −k·s·Σdy·x̂/N."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g in range(0, G):
        s1 = tl.load(s1_ptr + g * C + c, mask=cm, other=0.0)
        inv = tl.load(inv_ptr + g * C + c, mask=cm, other=0.0)
        s2 = tl.load(s2_ptr + g * C + c, mask=cm, other=0.0) * inv  # Σ dy·x̂
        k = tl.load(k_ptr + g * C + c, mask=cm, other=0.0)
        dw += tl.load(r_ptr + g * C + c, mask=cm, other=0.0) * s2 + tl.load(d_ptr + g * C + c, mask=cm,
                                                                            other=0.0) * s1
        db += s1
        tl.store(c0_ptr + g * C + c, -k * s1 / count, mask=cm)
        tl.store(b2_ptr + g * C + c, -k * inv * s2 / count, mask=cm)
    tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=cm)
    tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=cm)
